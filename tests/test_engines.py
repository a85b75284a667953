"""ipa_rt build: every network exported and run in ONNX Runtime, engine pipelines against diffusers and the torch
backend, the engine directory's cache and manifest, and each way an engine dir can be bad."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    CALL,
    assert_parity,
    assert_rows_equal_alone,
    diffusers_pipe,
    fixed_latents,
    ipa_pipe,
    mixed_requests,
    rel_l2,
    scoped_env,
)

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("polygraphy")

import ipa_rt
from ipa_rt import cli
from ipa_rt.errors import ConfigError, EngineError, ImageInputError
from ipa_rt.export import BuildRequest, OrtEngine, all_contracts, build_engines
from ipa_rt.export.manifest import MANIFEST, check_engine_dir, read_manifest, sha256_file

# fp32 on the CPU: ONNX Runtime's kernels and PyTorch's differ only in summation order and fusion (observed
# ~1e-6 relative); the bound for a whole engine pipeline is 1e-3, each network is held to 1e-4.
NETWORK_RTOL = 1e-4
ENGINE_RTOL = 1e-3
ADAPTERS = {"sd15": ("base", "plus"), "sdxl": ("base",)}


SDXL_OPTIONS = {"height": 32, "width": 32, "batch": 2}  # batch: up to two requests (or prompts) per call


def sd15_build(models, out: Path) -> list[str]:
    """The CLI build of the SD1.5 engines: both adapters, 32x32, up to three requests (or prompts) per call."""
    argv = ["build", str(models.base("sd15")), "--height", "32", "--width", "32", "--batch", "3", "-o", str(out)]
    return argv + [a for v in ADAPTERS["sd15"] for a in ("--ip-adapter", str(models.adapter("sd15", v)))]


@pytest.fixture(scope="module")
def engines(models, tmp_path_factory):
    """SD1.5 engines built through the CLI; SDXL engines built transparently by from_pretrained(backend=...)."""
    root = tmp_path_factory.mktemp("engines")
    out = {"sd15": root / "sd15", "cache": root / "cache"}
    assert cli.main(sd15_build(models, out["sd15"])) == 0
    with scoped_env(IPA_RT_CACHE=str(out["cache"])):
        ipa_rt.Pipeline.from_pretrained(
            models.base("sdxl"),
            [models.adapter("sdxl", v) for v in ADAPTERS["sdxl"]],
            backend="onnxruntime",
            engine_options=SDXL_OPTIONS,
        )
    (out["sdxl"],) = [p for p in out["cache"].iterdir() if (p / "manifest.json").is_file()]  # exactly one was built
    return out


def snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_ino, p.stat().st_size) for p in folder.rglob("*") if p.is_file()}


def fresh(x: torch.Tensor, rows: int, gen: torch.Generator) -> torch.Tensor:
    shape = (rows, *x.shape[1:])
    if x.dtype == torch.int64:
        return torch.randint(0, 500, shape, generator=gen)
    return torch.randn(shape, generator=gen, dtype=x.dtype)


def assert_networks_match_torch(pipe, folder: Path) -> None:
    """Each engine in ``folder`` against its contract's torch module, on fresh inputs at the smallest and largest
    batch; the UNet also with a zero scale (an input: the text-only UNet, no new export)."""
    import onnx

    manifest = read_manifest(folder)
    contracts = all_contracts(pipe, 1, manifest["shapes"]["height"], manifest["shapes"]["width"])
    assert sorted(c.name for c in contracts) == sorted(manifest["networks"])
    gen = torch.Generator().manual_seed(11)
    for contract in contracts:
        path = folder / next(iter(manifest["networks"][contract.name]["files"]))
        onnx.checker.check_model(str(path))
        engine = OrtEngine(path)
        assert [n for n, _ in engine.inputs] == list(contract.inputs)
        for rows in (contract.batch[0], contract.batch[2]):
            feeds = {k: fresh(v, rows, gen) if k in contract.batched else v.clone() for k, v in contract.inputs.items()}
            if "time_ids" in feeds:
                feeds["time_ids"] = contract.inputs["time_ids"][:1].repeat(rows, 1)
            with torch.no_grad():
                want = contract.module(*feeds.values())
            want = want if isinstance(want, tuple) else (want,)
            got = engine(feeds)
            for g, w in zip(got, want, strict=True):
                assert rel_l2(g, w.float()) <= NETWORK_RTOL, (contract.name, rows)
            if contract.name == "unet":
                zero = dict(feeds, ip_scale=torch.zeros_like(feeds["ip_scale"]))
                with torch.no_grad():
                    want0 = contract.module(*zero.values())
                got0 = engine(zero)[0]
                assert rel_l2(got0, want0) <= NETWORK_RTOL and rel_l2(got0, got[0]) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_every_network_matches_pytorch_in_onnxruntime(models, engines, family):
    pipe = ipa_pipe(models, family, [models.adapter(family, v) for v in ADAPTERS[family]])
    pipe.set_ip_adapter_scale(0.6 if family == "sdxl" else [0.6, {"up": 1.2}])
    assert read_manifest(engines[family])["request"]["exporter"] == "torchscript"  # the default
    assert_networks_match_torch(pipe, engines[family])


@pytest.mark.slow
def test_dynamo_exporter_builds_networks_that_match_pytorch(models, tmp_path):
    """The other exporter (torch.export + onnxscript), on the example's smaller UNet: the same contracts, the same
    parity, and the manifest says which exporter made the engines."""
    from ipa_rt import testing as T

    base = T.write_base_model(tmp_path / "base", configs={"unet": T.EXAMPLE_UNET})
    adapter = T.write_adapter(tmp_path / "ip.safetensors", "plus", base)
    T.write_image_encoder(tmp_path / "image_encoder")
    req = BuildRequest(str(base), [str(adapter)], height=32, width=32, exporter="dynamo")
    build_engines(req, tmp_path / "out")
    assert read_manifest(tmp_path / "out")["request"]["exporter"] == "dynamo"
    pipe = ipa_pipe(models, "sd15", [adapter], base=base)
    pipe.set_ip_adapter_scale(0.8)
    assert_networks_match_torch(pipe, tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_engine_pipeline_matches_diffusers_and_scale_changes_rebuild_nothing(models, images, engines, family):
    variants = ADAPTERS[family]
    ref = diffusers_pipe(models, family, [f"{v}.safetensors" for v in variants])
    torch_pipe = ipa_pipe(models, family, [models.adapter(family, v) for v in variants])
    before = snapshot(engines[family])
    pipe = ipa_rt.Pipeline.from_engine(engines[family])
    pipe.set_progress_bar_config(disable=True)
    sessions = [id(e.engine) for e in (pipe.unet, pipe.vae, *pipe.text_encoders, pipe.image_encoder)]
    prompt_images = [images[0]] * len(variants)
    scales = [[0.7, 0.7], [0.3, {"down": {"block_2": [0.0, 1.5]}}]] if len(variants) > 1 else [[0.7], [1.6]]
    for scale in scales:  # the second value: a live change on the same pipeline and engines
        for p in (ref, torch_pipe, pipe):
            p.set_ip_adapter_scale(scale)
        call = dict(CALL, latents=fixed_latents())
        want = ref("a cat", ip_adapter_image=prompt_images, **call).images
        same_backend = torch_pipe("a cat", ip_adapter_image=prompt_images, **call).images
        got = pipe("a cat", ip_adapter_image=prompt_images, **call).images
        assert_parity(got, want, ENGINE_RTOL)
        assert_parity(got, same_backend, ENGINE_RTOL)
    assert sessions == [id(e.engine) for e in (pipe.unet, pipe.vae, *pipe.text_encoders, pipe.image_encoder)]
    assert snapshot(engines[family]) == before  # nothing rebuilt, nothing rewritten
    images_np = pipe("a cat", ip_adapter_image=prompt_images, num_inference_steps=2, output_type="np").images
    assert images_np.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(images_np)).all()


@pytest.mark.slow
def test_engine_img2img_and_text_only_match_torch_backend(models, images, engines):
    """The VAE encoder engine (posterior moments, sampled with the user's generator) and calls without images."""
    pipe = ipa_rt.Pipeline.from_engine(engines["sd15"])
    ours = ipa_pipe(models, "sd15", [models.adapter("sd15", v) for v in ADAPTERS["sd15"]])
    for p in (pipe, ours):
        p.set_progress_bar_config(disable=True)
    kw = dict(image=images[1].resize((32, 32)), strength=0.6, num_inference_steps=4, output_type="latent")
    got = pipe("a dog", ip_adapter_image=[images[0]] * 2, generator=torch.Generator().manual_seed(3), **kw).images
    want = ours("a dog", ip_adapter_image=[images[0]] * 2, generator=torch.Generator().manual_seed(3), **kw).images
    assert_parity(got, want, ENGINE_RTOL)
    got = pipe("a dog", latents=fixed_latents(), **CALL).images
    want = ours("a dog", latents=fixed_latents(), **CALL).images
    assert_parity(got, want, ENGINE_RTOL)


@pytest.mark.slow
def test_text_only_then_image_call_feed_the_same_token_buffers(models, images, engines):
    """A graph captured during a text-only call must see the next image call's tokens: the UNet engine is fed the
    very same token buffers in both calls (zeros, then the image tokens), and the image call equals diffusers."""
    pipe = ipa_rt.Pipeline.from_engine(engines["sd15"])
    pipe.set_progress_bar_config(disable=True)
    assert not pipe.loop.graphs_on(torch.device("cuda"))
    assert not any(g.enabled is not False for g in pipe.graphed_calls())
    fed: list[dict[str, int]] = []
    run = pipe.unet.engine.__call__

    class Spy:
        prepare = pipe.unet.engine.prepare

        def __call__(self, feeds, copy=True):
            fed.append({k: v.data_ptr() for k, v in feeds.items() if k.startswith("ip_tokens_")})
            return run(feeds, copy)

    pipe.unet.engine = Spy()
    pipe("a cat", latents=fixed_latents(), **CALL)
    text_only = fed[-1]
    ref = diffusers_pipe(models, "sd15", [f"{v}.safetensors" for v in ADAPTERS["sd15"]])
    want = ref("a cat", ip_adapter_image=[images[0]] * 2, latents=fixed_latents(), **CALL).images
    got = pipe("a cat", ip_adapter_image=[images[0]] * 2, latents=fixed_latents(), **CALL).images
    assert fed[-1] == text_only and len(text_only) == len(ADAPTERS["sd15"])
    assert_parity(got, want, ENGINE_RTOL)


@pytest.mark.slow
def test_doctor_checks_an_engine_against_the_torch_backend(engines, tmp_path):
    """``ipa_rt doctor --engine DIR`` rebuilds the torch backend from the manifest's source files and compares."""
    out = tmp_path / "doctor.json"
    assert cli.main(["doctor", "--engine", str(engines["sd15"]), "--device", "cpu", "-o", str(out)]) == 0
    (row,) = [r for r in json.loads(out.read_text())["checks"] if r["name"] == "engine_vs_torch"]
    assert row["status"] == "ok" and row["max_error"] <= row["tolerance"] == 1e-3


@pytest.mark.slow
def test_second_identical_build_rewrites_nothing(models, engines, capsys):
    before = snapshot(engines["sd15"])
    start = time.perf_counter()
    assert cli.main(sd15_build(models, engines["sd15"])) == 0
    assert time.perf_counter() - start < 30  # hashing, no export (a UNet export alone takes about a minute here)
    assert "up to date" in capsys.readouterr().out
    assert snapshot(engines["sd15"]) == before


@pytest.mark.slow
def test_from_pretrained_reuses_cached_engines(models, engines, monkeypatch):
    import ipa_rt.export.writer as writer

    def no_export(*_a, **_k):
        raise AssertionError("an engine was exported again")

    monkeypatch.setattr(writer, "export_onnx", no_export)
    monkeypatch.setenv("IPA_RT_CACHE", str(engines["cache"]))
    before = snapshot(engines["cache"] / engines["sdxl"].name)
    pipe = ipa_rt.Pipeline.from_pretrained(
        models.base("sdxl"),
        models.adapter("sdxl", "base"),
        backend="onnxruntime",
        engine_options=SDXL_OPTIONS,
    )
    assert pipe.backend == "onnxruntime" and pipe.engine_manifest["shapes"]["height"] == 32
    assert snapshot(engines["cache"] / engines["sdxl"].name) == before
    assert len([p for p in engines["cache"].iterdir() if (p / "manifest.json").is_file()]) == 1


def copy_engines(engines, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(engines["sd15"], dst)
    return dst


@pytest.mark.slow
def test_truncated_engine_file(engines, tmp_path, capsys):
    folder = copy_engines(engines, tmp_path)
    unet = folder / "onnx" / "unet.onnx"
    data = unet.read_bytes()
    unet.write_bytes(data[: len(data) // 2])
    with pytest.raises(EngineError, match=r"(?s)unet.onnx.*truncated.*--rebuild"):
        ipa_rt.Pipeline.from_engine(folder)
    assert cli.main(["inspect", str(folder)]) == 2
    assert "truncated" in capsys.readouterr().err
    unet.write_bytes(b"\0" * len(data))  # right size, garbage inside: the recorded sha256 refuses it before loading
    with pytest.raises(EngineError, match=r"(?s)unet.onnx.*not the one.*sha256.*--rebuild"):
        ipa_rt.Pipeline.from_engine(folder)


@pytest.mark.slow
def test_edited_source_weights(models, engines, tmp_path):
    folder = copy_engines(engines, tmp_path)
    weights = tmp_path / "adapter.safetensors"
    shutil.copy(models.adapter("sd15", "base"), weights)
    manifest = json.loads((folder / MANIFEST).read_text())
    role = next(r for r in manifest["sources"] if r.startswith("ip_adapter_0/"))
    st = weights.stat()  # the same bytes, moved: the manifest follows the file to its new place
    manifest["sources"][role].update(path=str(weights), size=st.st_size, mtime_ns=st.st_mtime_ns)
    assert manifest["sources"][role]["sha256"] == sha256_file(weights)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    ipa_rt.Pipeline.from_engine(folder)  # unchanged: loads
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one weight byte edited
    weights.write_bytes(bytes(data))
    with pytest.raises(EngineError, match=r"adapter.safetensors.*changed since.*--rebuild"):
        ipa_rt.Pipeline.from_engine(folder)


@pytest.mark.slow
def test_tensorrt_engine_for_other_gpu_or_version(engines, tmp_path):
    folder = copy_engines(engines, tmp_path)
    manifest = read_manifest(folder)
    manifest.update(backend="tensorrt", gpu={"name": "NVIDIA H100 80GB HBM3", "capability": "9.0"})
    manifest["versions"]["tensorrt"] = "10.9.0"
    with pytest.raises(EngineError, match=r"(?s)another machine.*gpu.*H100.*tensorrt: 10.9.0.*--rebuild"):
        check_engine_dir(folder, manifest, torch.device("cpu"))


@pytest.mark.slow
def test_build_refuses_other_engines_without_rebuild(models, engines):
    before = snapshot(engines["sd15"])
    req = BuildRequest(
        str(models.base("sd15")), [str(models.adapter("sd15", v)) for v in ADAPTERS["sd15"]], height=64, width=32
    )
    with pytest.raises(EngineError, match=r"(?s)holds other engines.*request.height: 32 -> 64.*--rebuild"):
        build_engines(req, engines["sd15"])
    assert snapshot(engines["sd15"]) == before


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"backend": "tvm"}, "backend 'tvm' is unknown"),
        ({"dtype": "bf16"}, "dtype 'bf16' is not supported by onnxruntime"),
        ({"height": 30}, "height is 30; expected a positive multiple of 8"),
        ({"batch": 0}, "batch is 0"),
        ({"exporter": "jit"}, "exporter 'jit' is unknown; expected one of"),
        ({"ip_adapter": []}, "at least one IP-Adapter"),
        ({"ip_adapter": ["/nonexistent/ip.safetensors"]}, "does not exist"),
        ({"base": "/nonexistent/base"}, "neither a local path nor a reachable hub id|model_index.json"),
    ],
)
def test_bad_build_arguments_write_nothing(models, tmp_path, change, pattern):
    req = BuildRequest(str(models.base("sd15")), [str(models.adapter("sd15", "base"))], height=32, width=32)
    for key, value in change.items():
        setattr(req, key, value)
    with pytest.raises(ConfigError, match=pattern):
        build_engines(req, tmp_path / "out")
    leftovers = [p.name for p in (tmp_path / "out").rglob("*")] if (tmp_path / "out").exists() else []
    assert leftovers in ([], [".ipa_rt.lock"])  # refused before anything was exported


def test_failed_build_leaves_no_partial_engine_dir(models, tmp_path, monkeypatch):
    """A failure mid-build (here the third network) of a first build leaves nothing: no manifest, no engine file, no
    temporary folder, no folder."""
    import ipa_rt.export.writer as writer

    calls = []

    def flaky(contract, path, *a, **kw):
        calls.append(contract.name)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"onnx")
        return Path(path)

    monkeypatch.setattr(writer, "export_onnx", flaky)
    monkeypatch.setenv("IPA_RT_KEEP_EXPORTS", "0")  # fake exports must never be kept for the suite's real builds
    req = BuildRequest(str(models.base("sd15")), [str(models.adapter("sd15", "base"))], height=32, width=32)
    with pytest.raises(RuntimeError, match="disk full"):
        build_engines(req, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_concurrent_builds_wait_for_the_lock(models, engines):
    """A second build waits while the first holds the lock, then finds the engines up to date."""
    from ipa_rt.export.manifest import build_lock

    adapters = [str(models.adapter("sd15", v)) for v in ADAPTERS["sd15"]]
    req = BuildRequest(str(models.base("sd15")), adapters, height=32, width=32, batch=3)  # as sd15_build
    events = []
    with build_lock(engines["sd15"]):
        worker = threading.Thread(target=lambda: events.append(build_engines(req, engines["sd15"])))
        worker.start()
        time.sleep(0.5)
        assert events == [] and worker.is_alive()  # blocked on the lock
    worker.join(timeout=60)
    assert events == [engines["sd15"]]


@pytest.mark.slow
@pytest.mark.parametrize("what", ["manifest_missing", "manifest_corrupt", "manifest_format"])
def test_not_an_engine_dir(engines, tmp_path, what):
    folder = copy_engines(engines, tmp_path)
    if what == "manifest_missing":
        (folder / MANIFEST).unlink()
    elif what == "manifest_corrupt":
        (folder / MANIFEST).write_text("{not json")
    else:
        (folder / MANIFEST).write_text(json.dumps({"format": 99}))
    with pytest.raises(EngineError, match=r"manifest.json"):
        ipa_rt.Pipeline.from_engine(folder)


@pytest.mark.slow
def test_engine_call_errors(engines, images):
    pipe = ipa_rt.Pipeline.from_engine(engines["sd15"])
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ConfigError, match=r"8 image tokens \(2 images\).*built for 4.*ip_adapter_combine"):
        pipe("x", ip_adapter_image=[[images[0], images[1]], images[0]], **CALL)
    out = pipe(  # averaging several images keeps the token count the engine was built for
        "x", ip_adapter_image=[[images[0], images[1]], images[0]], ip_adapter_combine="average", **CALL
    ).images
    assert torch.isfinite(out).all()
    with pytest.raises(ConfigError, match=r"built for 32x32 images; this call asks for 64x64: .*--height H --width W"):
        pipe("x", ip_adapter_image=[images[0]] * 2, **dict(CALL, height=64, width=64))
    with pytest.raises(ConfigError, match=r"built for up to 3 image\(s\) per call; this call makes 4 .*--batch B"):
        pipe(["x", "y"], ip_adapter_image=[images[0]] * 2, num_images_per_prompt=2, **CALL)
    with pytest.raises(ConfigError, match=r"built for up to 3 image\(s\) per call; this call makes 4 .*--batch B"):
        pipe.batch([dict(prompt=p, num_images_per_prompt=2, **CALL) for p in ("x", "y")])
    with pytest.raises(ConfigError, match=r"the image_encoder engine .* was built for pixel_values of shape "):
        pipe.image_encoder(torch.zeros(9, 3, 32, 32))  # more reference images than the encoder engine takes
    masks = [torch.ones(1, 1, 32, 32), torch.ones(1, 1, 32, 32)]
    with pytest.raises(ConfigError, match="regional ip_adapter_masks"):
        pipe("x", ip_adapter_image=[images[0]] * 2, cross_attention_kwargs={"ip_adapter_masks": masks}, **CALL)
    with pytest.raises(ImageInputError):
        pipe("x", ip_adapter_image=[images[0]], **CALL)
    with pytest.raises(ConfigError, match="from_engine"):
        pipe.to("meta")


@pytest.mark.slow
def test_cli_inspect_and_generate_from_engine(engines, images, tmp_path, capsys):
    assert cli.main(["inspect", str(engines["sd15"])]) == 0
    text = capsys.readouterr().out
    assert "onnxruntime engines for a SD15 model" in text and "[1] plus: 16 image tokens" in text
    assert "the scale is an engine input" in text and "status: every engine file is intact" in text
    assert "TensorRT engines need TensorRT >=10.0,<12 (10.x and 11.x; networks built strongly typed)" in text
    ref = tmp_path / "ref.png"
    images[0].save(ref)
    out = tmp_path / "out.png"
    argv = ["generate", "--engine", str(engines["sd15"]), "--prompt", "a cat", "--steps", "2", "-o", str(out)]
    argv += ["--ip-image", str(ref), "--ip-image", str(ref), "--scale", "0.5", "--device", "cpu"]
    assert cli.main(argv) == 0
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (32, 32)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_engine_batched_rows_equal_requests_alone(engines, images, family):
    """Different references and scales in one engine call: ip_scale is a [rows, adapters, layers] engine input."""
    pipe = ipa_rt.Pipeline.from_engine(engines[family])
    pipe.set_progress_bar_config(disable=True)
    requests = mixed_requests(images, two_adapters=len(ADAPTERS[family]) == 2)
    assert_rows_equal_alone(pipe, requests[: pipe.engine_manifest["shapes"]["batch"]], **CALL)


def test_tensorrt_profile_and_missing_tensorrt(models):
    """The TensorRT optimisation profile comes from the contract; without TensorRT a build says so."""
    pipe = ipa_pipe(models, "sd15", [models.adapter("sd15", "base")])
    unet = all_contracts(pipe, 3, 32, 32)[0]
    prof = unet.profile()
    assert prof["sample"] == ((1, 4, 16, 16), (6, 4, 16, 16), (6, 4, 16, 16))
    # the scale: a row per UNet row (each request of a batched call its own), values never a build parameter
    assert prof["ip_scale"] == ((1, 1, 16), (6, 1, 16), (6, 1, 16))
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        req = BuildRequest(str(models.base("sd15")), [str(models.adapter("sd15", "base"))], backend="tensorrt")
        with pytest.raises(ConfigError, match=r"'tensorrt' needs tensorrt, .*pip install 'ipa_rt\[tensorrt\]'"):
            build_engines(req, "/nonexistent/never-written")  # before any work: nothing written


FP16_ENGINE_RTOL = 2e-2  # an fp16 engine against the fp16 torch pipeline: both ~1e-3 per network from fp32
LOW_PRECISION_INPUTS = {"timestep", "ip_scale", "conditioning_scales"}  # fp32 by contract in every engine


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT engines need a CUDA GPU")
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_tensorrt_engine_pipeline_matches_diffusers(models, images, tmp_path, dtype):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (NVIDIA's index is unreachable here)")
    req = BuildRequest(
        str(models.base("sdxl")), [str(models.adapter("sdxl", "base"))], "tensorrt", height=32, width=32, dtype=dtype
    )
    folder = build_engines(req, tmp_path / "trt")
    pipe = ipa_rt.Pipeline.from_engine(folder, device="cuda")
    torch_dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    ref = diffusers_pipe(models, "sdxl", ["base.safetensors"], torch_dtype=torch_dtype).to("cuda")
    for p in (pipe, ref):
        p.set_ip_adapter_scale(0.7)
    call = dict(CALL, latents=fixed_latents().cuda().to(torch_dtype))
    want = ref("a cat", ip_adapter_image=images[0], **call).images
    got = pipe("a cat", ip_adapter_image=[images[0]], **call).images
    assert_parity(got.float(), want.float(), ENGINE_RTOL if dtype == "fp32" else FP16_ENGINE_RTOL)
    assert pipe.loop.captures == 1  # the UNet engine runs inside the captured step


@pytest.mark.slow
def test_fp16_engines_are_strongly_typed_and_match_torch(models, images, tmp_path):
    """What a strongly typed TensorRT build (the only kind in TensorRT 11) needs from the ONNX, checked on the CPU:
    an fp16 SDXL export whose every graph passes ONNX Runtime's full type check (no mixed-type node), whose float
    inputs are fp16 (scales and timesteps fp32), whose normalisations compute in fp32, whose force_upcast VAE is fp32
    — and whose engine pipeline matches the fp16 torch pipeline."""
    import onnx

    req = BuildRequest(str(models.base("sdxl")), [str(models.adapter("sdxl", "base"))], height=32, width=32)
    req.dtype = "fp16"
    folder = build_engines(req, tmp_path / "fp16")
    manifest = read_manifest(folder)
    assert (manifest["io_dtype"], manifest["vae_dtype"]) == ("fp16", "fp32")
    float_types = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16"}
    for name, info in manifest["networks"].items():
        path = folder / next(iter(info["files"]))
        OrtEngine(path)  # ONNX Runtime type-checks every node on load
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
        typed = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
        want = "fp32" if name.startswith("vae") else "fp16"
        for i in model.graph.input:
            kind = float_types.get(i.type.tensor_type.elem_type)
            assert kind in (None, "fp32" if i.name in LOW_PRECISION_INPUTS else want), (name, i.name, kind)
        norms = [n for n in model.graph.node if n.op_type.endswith("Normalization")]
        assert all(typed.get(n.input[0]) == onnx.TensorProto.FLOAT for n in norms), name
        assert norms or name.startswith("image_projection"), name
    pipe = ipa_rt.Pipeline.from_engine(folder)
    ours = ipa_pipe(models, "sdxl", models.adapter("sdxl", "base"), dtype=torch.float16)
    for p in (pipe, ours):
        p.set_progress_bar_config(disable=True)
    call = dict(CALL, latents=fixed_latents().half())
    got = pipe("a cat", ip_adapter_image=[images[0]], **call).images
    want = ours("a cat", ip_adapter_image=[images[0]], **call).images
    assert got.dtype == torch.float16
    assert_parity(got.float(), want.float(), FP16_ENGINE_RTOL)


def test_tensorrt_build_is_strongly_typed_without_precision_flags(tmp_path, monkeypatch):
    """The polygraphy calls of a TensorRT build, recorded and bound against the installed polygraphy's signatures:
    a strongly typed network on every supported TensorRT, no FP16/BF16 builder flags (TensorRT 11 has none), one
    profile, the shared timing cache. Versions outside 10.x-11.x are refused with what to install."""
    import inspect

    import polygraphy.backend.trt as ptrt

    from ipa_rt.export import engines as eng

    calls = {}

    def recorder(name, fn, result=None):
        def record(*args, **kwargs):
            inspect.signature(fn).bind(*args, **kwargs)  # the real API accepts these arguments
            calls[name] = kwargs
            return result if result is not None else name

        return record

    monkeypatch.setattr(ptrt, "network_from_onnx_path", recorder("network", ptrt.network_from_onnx_path))
    monkeypatch.setattr(ptrt, "CreateConfig", recorder("config", ptrt.CreateConfig, "cfg"))
    monkeypatch.setattr(ptrt, "engine_from_network", recorder("engine", ptrt.engine_from_network))
    monkeypatch.setattr(ptrt, "save_engine", recorder("save", ptrt.save_engine))
    monkeypatch.setattr(
        ptrt, "Profile", lambda: type("P", (), {"add": lambda self, *a, **k: calls.setdefault("profile", k)})()
    )
    cache = tmp_path / "cache" / "tensorrt-11.1.0-H100-sm9.0.timing-cache"
    for version in ("10.8.0", "11.1.0"):
        monkeypatch.setattr(eng, "tensorrt_version", lambda version=version: version)
        eng.build_trt_engine(tmp_path / "unet.onnx", tmp_path / "unet.plan", {"sample": ((1,), (2,), (4,))}, cache)
        assert calls["network"] == {"strongly_typed": True}
        assert not {"fp16", "bf16", "tf32", "int8", "fp8"} & set(calls["config"])
        assert calls["config"]["builder_optimization_level"] == 3 and calls["config"]["profiles"]
        assert calls["engine"]["save_timing_cache"] == str(cache) and calls["profile"]["max"] == (4,)
    for bad, message in (("9.3.0", r"TensorRT 9.3.0 is installed; ipa_rt supports TensorRT >=10.0,<12"),
                         (None, r"needs TensorRT >=10.0,<12 .*not installed")):  # fmt: skip
        monkeypatch.setattr(eng, "tensorrt_version", lambda bad=bad: bad)
        with pytest.raises(ConfigError, match=message):
            eng.build_trt_engine(tmp_path / "unet.onnx", tmp_path / "unet.plan", {}, cache)
    path = eng.timing_cache_path(tmp_path, "10.8.0", {"name": "NVIDIA H100 80GB HBM3", "capability": "9.0"})
    assert path == tmp_path / "tensorrt-10.8.0-NVIDIA-H100-80GB-HBM3-sm9.0.timing-cache"


@pytest.mark.slow
def test_engine_without_guidance_and_the_demo_sweep(models, images, engines, tmp_path):
    """LCM without CFG feeds the UNet engine one row (the dynamic batch's minimum); the demo runs on engines."""
    pipe = ipa_rt.Pipeline.from_engine(engines["sd15"], scheduler="lcm")
    ours = ipa_pipe(models, "sd15", [models.adapter("sd15", v) for v in ADAPTERS["sd15"]], scheduler="lcm")
    for p in (pipe, ours):
        p.set_progress_bar_config(disable=True)
        p.set_ip_adapter_scale([0.8, 0.4])
    call = dict(CALL, latents=fixed_latents(), guidance_scale=1.0, num_inference_steps=4)
    gen = torch.Generator().manual_seed  # LCM re-noises between steps: both runs draw from the same seed
    got = pipe("a cat", ip_adapter_image=[images[0]] * 2, generator=gen(4), **call).images
    want = ours("a cat", ip_adapter_image=[images[0]] * 2, generator=gen(4), **call).images
    assert_parity(got, want, ENGINE_RTOL)
    ref = tmp_path / "ref.png"
    images[0].save(ref)
    out = tmp_path / "sweep.gif"
    argv = ["demo", "--engine", str(engines["sd15"]), "--sweep", "0,1", "--ip-image", str(ref), "-o", str(out)]
    assert cli.main([*argv, "--device", "cpu"]) == 0
    assert out.is_file() and (tmp_path / "sweep-sheet.png").is_file()
