"""ipa_rt's ComfyUI nodes inside the real application, headless and offline (end-to-end tier).

The pinned ComfyUI snapshot is copied to a temporary folder, the node pack is installed by its documented step,
``main.py --cpu`` is started on a loopback port, and the example workflows (ipa_rt/comfyui/workflows/) are queued
through ``POST /prompt`` on tiny random models written here; images come back through ``/history`` and ``/view``
and are compared with what ipa_rt's Python API gives for the same inputs (run in the same Python as the server,
one thread each, so the same arithmetic: bitwise), and, for the engine-as-MODEL node, with the torch backend.

ComfyUI needs a torchvision matching its torch, which the CPU wheel of torch this suite runs on lacks:
``IPA_RT_COMFYUI_PYTHON`` names the Python that has ComfyUI's requirements (.ci/run makes one), and
``IPA_RT_COMFYUI`` the snapshot (default ``../shared/comfyui/ComfyUI-0.3.64``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ipa_rt.comfyui.examples import LATENT, SIZE, fill

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT = Path(os.environ.get("IPA_RT_COMFYUI", REPO.parent / "shared" / "comfyui" / "ComfyUI-0.3.64"))
PYTHON = os.environ.get("IPA_RT_COMFYUI_PYTHON", sys.executable)
WORKFLOWS = REPO / "ipa_rt" / "comfyui" / "workflows"
# MKL's fp32 GEMM may round differently with its operands' memory alignment unless its Conditional Numerical
# Reproducibility is strict: two pipelines of equal weights at other addresses then differ in a last bit (measured on
# the Engine-from-MODEL graphs: 1 level in 16 of 196,608 values; bitwise with this set). Every process that runs a
# bitwise-compared side (the server, the Python API's reference) sets it.
CBWR = "AUTO,STRICT"
# the ONNX Runtime engine and torch differ in fp32 rounding (other kernels, other summation orders); through 4
# Euler steps of a random tiny UNet that stays within a few 8-bit levels of the decoded image
ENGINE_VS_TORCH_LEVELS = 3


def _unavailable() -> str | None:
    if not (SNAPSHOT / "main.py").is_file():
        return f"no ComfyUI snapshot at {SNAPSHOT} (set IPA_RT_COMFYUI)"
    probe = subprocess.run(
        [PYTHON, "-c", "import torchvision, aiohttp, torchsde, av, ipa_rt"], capture_output=True, text=True
    )
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"{PYTHON} cannot run ComfyUI ({last}); set IPA_RT_COMFYUI_PYTHON to a Python with its requirements"
    return None


REASON = _unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Comfy:
    """A running ComfyUI server and the HTTP calls a client makes of it."""

    def __init__(self, root: Path, port: int, proc: subprocess.Popen, log: Path) -> None:
        self.root, self.url, self.proc, self.log = root, f"http://127.0.0.1:{port}", proc, log

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.read()

    def post(self, graph: dict) -> tuple[int, dict]:
        body = json.dumps({"prompt": graph, "client_id": "ipa_rt-tests"}).encode()
        req = urllib.request.Request(self.url + "/prompt", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def run(self, graph: dict, timeout: float = 600) -> dict:
        status, answer = self.post(graph)
        assert status == 200, answer
        pid = answer["prompt_id"]
        end = time.time() + timeout
        while time.time() < end:
            history = json.loads(self.get(f"/history/{pid}"))
            if pid in history and history[pid]["status"].get("completed") is not None:
                if history[pid]["status"]["status_str"] != "success" or history[pid]["outputs"]:
                    return history[pid]
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            time.sleep(0.25)
        raise AssertionError(f"prompt {pid} did not finish in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def image(self, entry: dict, node: str) -> np.ndarray:
        info = entry["outputs"][node]["images"][0]
        query = urllib.parse.urlencode({k: info[k] for k in ("filename", "subfolder", "type")})
        return np.asarray(Image.open(io.BytesIO(self.get(f"/view?{query}"))).convert("RGB"))


def _error(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "error", entry["status"]
    return next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")


@pytest.fixture(scope="module")
def models(comfy) -> dict:
    found = comfy.work / "example" / "models"
    adapters = found / "IP-Adapter" / "models"
    return {
        "base": found / "model-sd15",
        "encoder": adapters / "image_encoder",
        "plain": adapters / "ip-adapter_sd15.safetensors",
        "plus": adapters / "ip-adapter-plus_sd15.bin",
        "input": comfy.root / "input",
    }


@pytest.fixture(scope="module")
def comfy(tmp_path_factory) -> Comfy:
    work = tmp_path_factory.mktemp("comfyui")
    root = work / "ComfyUI"
    shutil.copytree(SNAPSHOT, root, ignore=shutil.ignore_patterns("tests", "tests-unit", "__pycache__"))
    installed = subprocess.run([PYTHON, "-m", "ipa_rt.comfyui", "install", str(root)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    example = subprocess.run(
        [PYTHON, "-m", "ipa_rt.comfyui", "example", str(root), str(work / "example")], capture_output=True, text=True
    )  # the documented step: tiny models + filled workflows
    assert example.returncode == 0 and example.stdout.count("curl -s -X POST") == 4, example.stderr
    with _serve(root, work) as server:
        server.work = work
        yield server


@contextlib.contextmanager
def _serve(root: Path, work: Path) -> Iterator[Comfy]:
    """``main.py --cpu`` of the ComfyUI at ``root`` on a loopback port, once it answers for ipa_rt's sampler node."""
    (work / "frontend").mkdir(exist_ok=True)
    port = _free_port()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "IPA_RT_CACHE": str(work / "engines"),
        "HF_HUB_OFFLINE": "1",
        "IPA_RT_CPU_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "MKL_CBWR": CBWR,
    }
    log = work / "comfyui.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                PYTHON,
                "main.py",
                "--cpu",
                "--listen",
                "127.0.0.1",
                "--port",
                str(port),
                "--output-directory",
                str(work / "output"),
                "--front-end-root",
                str(work / "frontend"),
                "--disable-api-nodes",
            ],
            cwd=root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Comfy(root, port, proc, log)
    try:
        for _ in range(240):
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                server.get("/object_info/IpaRtSampler")
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        info = json.loads(server.get("/object_info/IpaRtSampler"))
        assert "IpaRtSampler" in info, log.read_text()[-3000:]
        yield server
    finally:
        proc.terminate()
        proc.wait(30)


def _workflow(name: str, models: dict, **loader) -> dict:
    return fill(
        name, str(models["base"]), [str(models["plain"]), str(models["plus"])], str(models["encoder"]), **loader
    )


def _reference(
    comfy: Comfy, models: dict, graph: dict, adapters: list[dict], load_spec: dict | None = None
) -> np.ndarray:
    """What the Python API gives for the workflow's loader (or ``load_spec``: LoadSpec's fields) and sampler
    inputs."""
    nodes = {n["class_type"]: n["inputs"] for n in graph.values()}
    s = nodes["IpaRtSampler"]
    if load_spec is None:
        load = nodes["IpaRtLoadPipeline"]
        load_spec = {
            "base": load["base"],
            "ip_adapters": load["ip_adapter"].splitlines(),
            "image_encoder": load["image_encoder"],
            "backend": load["backend"],
            "precision": load["precision"],
            "height": load["engine_height"],
            "width": load["engine_width"],
        }
    spec = {
        "load": load_spec,
        "adapters": adapters,
        "sample": {k: s[k] for k in ("positive", "negative", "seed", "steps", "cfg", "scheduler", "width", "height")},
    }
    path = comfy.work / f"ref-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(spec))
    out = path.with_suffix(".npy")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "IPA_RT_CACHE": str(comfy.work / "engines"), "IPA_RT_CPU_THREADS": "1"}
    env["MKL_CBWR"] = CBWR
    done = subprocess.run(
        [PYTHON, str(REPO / "tests" / "comfyui_reference.py"), str(path), str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return np.load(out)


def _adapter(
    models: dict, index: int, image: int = 0, weight: float = 1.0, weight_type: str = "linear", mask: bool = False
) -> dict:
    name = "reference.png" if image == 0 else "reference_2.png"
    entry = {
        "index": index,
        "image": str(models["input"] / name),
        "weight": weight,
        "weight_type": weight_type,
        "start_at": 0.0,
        "end_at": 1.0,
    }
    if mask:
        entry["mask"] = str(models["input"] / "mask.png")
    return entry


def test_sampler_workflow_equals_python_api(comfy, models):
    graph = _workflow("ipa_rt_sampler", models)
    entry = comfy.run(graph)
    got = comfy.image(entry, "6")
    want = _reference(comfy, models, graph, [_adapter(models, 0)])
    assert got.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow  # the fast tier keeps one workflow end to end (the sampler's) and the node checks
def test_two_adapters_with_mask_equal_python_api(comfy, models):
    graph = _workflow("ipa_rt_two_adapters_mask", models)
    entry = comfy.run(graph)
    got = comfy.image(entry, "10")
    want = _reference(
        comfy, models, graph, [_adapter(models, 0, 0, 1.0, mask=True), _adapter(models, 1, 1, 0.6, "style transfer")]
    )
    np.testing.assert_array_equal(got, want)
    single = comfy.image(comfy.run(_workflow("ipa_rt_sampler", models)), "6")
    assert np.abs(got.astype(int) - single).max() > 0  # the second adapter and the mask changed the image


@pytest.mark.slow  # the fast tier keeps one workflow end to end (the sampler's) and the node checks
def test_engine_model_with_ksampler(comfy, models):
    """KSampler on the engine MODEL equals KSampler on the torch MODEL (to fp32 rounding); a weight change is a
    tensor write: the second run loads and builds nothing, and weight 0 equals the image without IP-Adapter."""
    engines = comfy.work / "engines"
    graph = _workflow("ipa_rt_engine_model", models)
    first = comfy.run(graph)
    img = comfy.image(first, "12")
    manifests = {p: p.stat().st_mtime_ns for p in engines.rglob("manifest.json")}
    assert len(manifests) == 1  # one engine set built, by the loader node
    loads = comfy.log.read_text().count("ipa_rt: loaded")

    heavier = copy.deepcopy(graph)
    heavier["5"]["inputs"]["weight"] = 0.0
    zero = comfy.image(comfy.run(heavier), "12")
    assert {p: p.stat().st_mtime_ns for p in engines.rglob("manifest.json")} == manifests
    assert comfy.log.read_text().count("ipa_rt: loaded") == loads  # nothing reloaded or rebuilt
    assert np.abs(zero.astype(int) - img).max() > 0
    ramp = copy.deepcopy(graph)
    ramp["5"]["inputs"].update(weight_type="ease in", start_at=0.25, end_at=0.75)
    eased = comfy.image(comfy.run(ramp), "12")
    assert {p: p.stat().st_mtime_ns for p in engines.rglob("manifest.json")} == manifests
    assert comfy.log.read_text().count("ipa_rt: loaded") == loads
    assert np.abs(eased.astype(int) - img).max() > 0 and np.abs(eased.astype(int) - zero).max() > 0

    text_only = copy.deepcopy(graph)
    text_only["10"]["inputs"]["model"] = ["2", 0]
    np.testing.assert_array_equal(comfy.image(comfy.run(text_only), "12"), zero)

    torch_graph = _workflow("ipa_rt_engine_model", models, backend="torch")
    on_torch = comfy.image(comfy.run(torch_graph), "12")
    assert np.abs(on_torch.astype(int) - img).max() <= ENGINE_VS_TORCH_LEVELS


def _options(info: dict, node: str, name: str) -> list:
    """A combo input's options in ``/object_info`` (V3 combos: ``["COMBO", {"options": [...]}]``)."""
    spec = info[node]["input"]["required"][name]
    return spec[0] if isinstance(spec[0], list) else spec[1]["options"]


@pytest.mark.slow  # the fast tier keeps one workflow end to end (the sampler's) and the node checks
def test_model_folders_loader_equals_python_api(comfy, models):
    """The loader's dropdowns list ComfyUI's model folders (the ``ipadapter`` folder registered when the pack
    loaded); a single-file checkpoint (configs and tokenizer from the diffusers folder), the adapter, a one-file
    image encoder and a LoRA picked there give the Python API's image for the same files, bit for bit."""
    from ipa_rt.comfyui.examples import IN_FOLDERS

    info = json.loads(comfy.get("/object_info/IpaRtLoadFromFolders"))
    for key, (_, name) in IN_FOLDERS.items():
        assert name in _options(info, "IpaRtLoadFromFolders", key), key
    graph = _workflow("ipa_rt_model_folders", models)
    got = comfy.image(comfy.run(graph), "6")
    folder = comfy.root / "models"
    load = {
        "base": str(folder / "checkpoints" / IN_FOLDERS["checkpoint"][1]),
        "config": str(folder / "diffusers" / IN_FOLDERS["diffusers"][1]),
        "ip_adapters": [str(folder / "ipadapter" / IN_FOLDERS["ip_adapter"][1])],
        "image_encoder": str(folder / "clip_vision" / IN_FOLDERS["clip_vision"][1]),
        "lora": str(folder / "loras" / IN_FOLDERS["lora"][1]),
        "lora_strength": 1.0,
        "height": SIZE,
        "width": SIZE,
    }
    want = _reference(comfy, models, graph, [_adapter(models, 0)], load)
    np.testing.assert_array_equal(got, want)
    without_lora = copy.deepcopy(graph)
    without_lora["1"]["inputs"]["lora"] = "None"
    assert np.abs(comfy.image(comfy.run(without_lora), "6").astype(int) - got).max() > 0  # the LoRA was fused


def test_model_folders_loader_errors(comfy, models):
    neither = _workflow("ipa_rt_model_folders", models)
    neither["1"]["inputs"].update(checkpoint="None", diffusers="None")
    err = _error(comfy.run(neither))
    assert err["node_type"] == "IpaRtLoadFromFolders" and "checkpoint / diffusers" in err["exception_message"]
    for key in ("ip_adapter", "checkpoint", "lora"):  # checked at queue time (ComfyUI checks no V3 combo value)
        status, answer = comfy.post(_workflow("ipa_rt_model_folders", models, **{key: "not-there.safetensors"}))
        assert status == 400 and f"{key}: 'not-there.safetensors' is not in" in json.dumps(answer), answer
    from ipa_rt.comfyui.examples import IN_FOLDERS

    checkpoints = comfy.root / "models" / "checkpoints"  # files users get wrong: another kind, a broken download
    shutil.copyfile(models["plain"], checkpoints / "ipa_rt-an-adapter.safetensors")
    whole = (checkpoints / IN_FOLDERS["checkpoint"][1]).read_bytes()
    (checkpoints / "ipa_rt-truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    for name in ("ipa_rt-an-adapter.safetensors", "ipa_rt-truncated.safetensors"):
        err = _error(comfy.run(_workflow("ipa_rt_model_folders", models, checkpoint=name)))
        assert err["node_type"] == "IpaRtLoadFromFolders" and name in err["exception_message"], err
    assert comfy.run(_workflow("ipa_rt_model_folders", models))["status"]["status_str"] == "success"


def test_ipadapter_folder_is_registered_as_ipadapter_plus_does(comfy):
    """``models/ipadapter`` with ComfyUI's weight extensions; a folder registered before (extra_model_paths.yaml,
    ComfyUI_IPAdapter_plus) keeps its paths and gets the extensions."""
    code = (
        "import json, sys, folder_paths as f; from ipa_rt.comfyui.folders import register_ipadapter_folder as r; "
        "sys.argv[1] == 'yaml' and f.add_model_folder_path('ipadapter', '/elsewhere/ipadapter'); r(); r(); "
        "p, e = f.folder_names_and_paths['ipadapter']; print(json.dumps([p, sorted(e), f.models_dir]))"
    )
    missing = (
        "from ipa_rt.comfyui.folders import full_path; from ipa_rt import ConfigError\n"
        "try:\n    full_path('ipadapter', 'gone.safetensors', 'ip_adapter')\n"
        "except ConfigError as e:\n    print(e)"
    )
    done = subprocess.run([PYTHON, "-c", missing], cwd=comfy.root, capture_output=True, text=True)
    assert done.returncode == 0 and "ip_adapter: 'gone.safetensors' is not a file" in done.stdout, done.stderr
    for case in ("fresh", "yaml"):
        done = subprocess.run([PYTHON, "-c", code, case], cwd=comfy.root, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        paths, extensions, models_dir = json.loads(done.stdout.strip().splitlines()[-1])
        assert paths == (["/elsewhere/ipadapter"] if case == "yaml" else [os.path.join(models_dir, "ipadapter")])
        assert {".safetensors", ".bin", ".ckpt", ".pth"} <= set(extensions)


def _with_mask(graph: dict, mask: dict) -> dict:
    out = copy.deepcopy(graph)
    out["20"] = mask
    out["5"]["inputs"]["attention_mask"] = ["20", 0]
    return out


@pytest.mark.slow  # the fast tier keeps one workflow end to end (the sampler's) and the node checks
def test_masks_on_the_model_path(comfy, models):
    """Regional masks on the ipa_rt MODEL (torch backend) through KSampler: an all-zero mask gives the image
    without IP-Adapter and the half mask a third image, bit for bit as the masks' arithmetic says; one UNet call
    with the mask equals the call on the image side the ipa_rt Sampler prepared (tests/comfyui_model_check.py).
    An engine MODEL refuses masks, naming the input."""
    graph = _workflow("ipa_rt_engine_model", models, backend="torch")
    plain = comfy.image(comfy.run(graph), "12")
    text_only = copy.deepcopy(graph)
    text_only["10"]["inputs"]["model"] = ["2", 0]
    without = comfy.image(comfy.run(text_only), "12")
    zero = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": SIZE, "height": SIZE}}
    np.testing.assert_array_equal(comfy.image(comfy.run(_with_mask(graph, zero)), "12"), without)
    half_mask = {"class_type": "LoadImageMask", "inputs": {"image": "mask.png", "channel": "red"}}
    half = comfy.image(comfy.run(_with_mask(graph, half_mask)), "12")
    assert np.abs(half.astype(int) - plain).max() > 0 and np.abs(half.astype(int) - without).max() > 0

    spec = {
        "size": SIZE,
        "masked": {
            "base": str(models["base"]),
            "adapter": str(models["plain"]),
            "encoder": str(models["encoder"]),
            "image": str(models["input"] / "reference.png"),
            "mask": str(models["input"] / "mask.png"),
        },
    }
    checked = _model_check(comfy, spec)
    assert checked["masked_equal"] and checked["mask_changes"] > 0

    engine = _with_mask(_workflow("ipa_rt_engine_model", models), half_mask)
    err = _error(comfy.run(engine))
    assert err["node_type"] == "IpaRtApplyModel" and "attention_mask" in err["exception_message"]


def _model_check(comfy: Comfy, spec: dict) -> dict:
    path = comfy.work / f"check-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "IPA_RT_CACHE": str(comfy.work / "engines"), "IPA_RT_CPU_THREADS": "1"}
    env["MKL_CBWR"] = CBWR
    done = subprocess.run(
        [PYTHON, str(REPO / "tests" / "comfyui_model_check.py"), str(path)],
        cwd=comfy.root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def sdxl_models(comfy) -> dict:
    from ipa_rt import testing

    files = testing.write_example(comfy.work / "sdxl", family="sdxl")
    return {"base": files["base"], "adapter": files["adapter"], "encoder": files["image_encoder"]}


@pytest.mark.slow  # the fast tier keeps one workflow end to end (the sampler's) and the node checks
def test_sdxl_model_with_ksampler(comfy, models, sdxl_models):
    """SDXL on the ipa_rt MODEL: ComfyUI's SDXL model class makes ``y`` from the pooled text and the sizes; the
    MODEL reads ``text_embeds`` and ``time_ids`` back (one UNet call equals the Python API's, bit for bit, and the
    sizes round-trip in fp32/fp16/bf16); through KSampler the engine MODEL equals the torch MODEL to fp32
    rounding, weight 0 equals the image without IP-Adapter, and the weight is a tensor write (nothing rebuilt)."""
    spec = {
        "size": SIZE,
        "sdxl": {**{k: str(v) for k, v in sdxl_models.items()}, "image": str(models["input"] / "reference.png")},
    }
    checked = _model_check(comfy, spec)
    assert checked["sdxl_equal"] and checked["sizes_round_trip"] > 10 and checked["bad_y_refused"] == 2

    def workflow(**loader: str) -> dict:
        return fill(
            "ipa_rt_engine_model",
            str(sdxl_models["base"]),
            [str(sdxl_models["adapter"])],
            str(sdxl_models["encoder"]),
            **loader,
        )

    graph = workflow()
    img = comfy.image(comfy.run(graph), "12")
    loads = comfy.log.read_text().count("ipa_rt: loaded")
    zero = copy.deepcopy(graph)
    zero["5"]["inputs"]["weight"] = 0.0
    at_zero = comfy.image(comfy.run(zero), "12")
    assert comfy.log.read_text().count("ipa_rt: loaded") == loads
    text_only = copy.deepcopy(graph)
    text_only["10"]["inputs"]["model"] = ["2", 0]
    np.testing.assert_array_equal(comfy.image(comfy.run(text_only), "12"), at_zero)
    assert np.abs(at_zero.astype(int) - img).max() > 0
    on_torch = comfy.image(comfy.run(workflow(backend="torch")), "12")
    assert np.abs(on_torch.astype(int) - img).max() <= ENGINE_VS_TORCH_LEVELS


def _config(name: str) -> dict:
    return json.loads((REPO / "benchmarks" / "configs" / f"{name}.json").read_text())


# An SD1.5 checkpoint ComfyUI's own Load Checkpoint takes: its CLIP-L (49408 token rows) and VAE are built from
# ComfyUI's fixed configs, so they are full size; the UNet is detected from its shapes (comfy.supported_models.SD15:
# model_channels 320, context_dim 768, convolutional proj_in), so it is narrow: two levels of one layer; 8 heads and
# 32 norm groups, as the SD1.5 configs ipa_rt completes a UNet-only file's from (so the file's derived config is the
# folder's). Load CLIP Vision picks ViT-L/H/G by layer count: a full ViT-L (the smallest it takes), 768-wide embeds.
COMFY_SD15 = {
    "unet": dict(
        block_out_channels=(320, 320),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    "text": {**_config("clip_l_text"), "vocab_size": 49408},
    "vae": _config("sd15_vae"),
    "image_size": 224,  # the folder's feature_extractor: ViT-L's
}
VIT_L = dict(  # comfy/clip_vision_config_vitl.json's sizes (OpenAI CLIP ViT-L/14)
    hidden_size=1024,
    intermediate_size=4096,
    num_attention_heads=16,
    num_hidden_layers=24,
    projection_dim=768,
    image_size=224,
    patch_size=14,
    hidden_act="quick_gelu",
)
# An SDXL checkpoint Load Checkpoint takes: CLIP-L, OpenCLIP bigG and the VAE full size (ComfyUI's fixed configs);
# the UNet as narrow as SD1.5's above, in Segmind Vega's depths (transformer_depth [0, 0, 1, 1, 2, 2]: ComfyUI
# detects SDXL by model_channels 320, context 2048, adm 2816 and one of SDXL's, SSD-1B's, Vega's or KOALA's depths)
COMFY_SDXL = {
    "unet": dict(
        block_out_channels=(320, 320, 320),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(5, 5, 5),  # SDXL's 64-wide heads
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,  # bigG's pooled 1280 + 6 sizes x 256
        cross_attention_dim=2048,
        norm_num_groups=32,
    ),
    "text": {**_config("clip_l_text"), "vocab_size": 49408},
    "text_2": {**_config("clip_bigg_text"), "vocab_size": 49408},
    "vae": _config("sdxl_vae"),
    "image_size": 224,
}
FROM_MODEL = {  # models/<folder>/<name> of the files the Engine-from-MODEL tests use, per family
    "sd15": {
        "checkpoint": ("checkpoints", "ipa_rt-tiny-sd15-320.safetensors"),
        "diffusers": ("diffusers", "ipa_rt-tiny-sd15-320"),
        "ip_adapter": ("ipadapter", "ipa_rt-tiny-ip-adapter_sd15-320.safetensors"),
        "clip_vision": ("clip_vision", "ipa_rt-clip-vision-l-fp16.safetensors"),  # fp16, as ComfyUI's files are
        "lora": ("loras", "ipa_rt-tiny-lora_sd15-320-kohya.safetensors"),  # kohya keys: Load LoRA maps them
        "truncated": ("ipadapter", "ipa_rt-truncated.safetensors"),
    },
    "sdxl": {
        "checkpoint": ("checkpoints", "ipa_rt-tiny-sdxl-vega-320-fp16.safetensors"),  # fp16, as SDXL files are
        "diffusers": ("diffusers", "ipa_rt-tiny-sdxl-vega-320"),  # configs and tokenizers only
        "ip_adapter": ("ipadapter", "ipa_rt-tiny-ip-adapter_sdxl-320.safetensors"),
    },
}
FROM_MODEL_PX = 64  # 8 x 8 latents: the full-size VAE's decode stays cheap


def _write_from_model_files(comfy: Comfy, family: str, configs: dict) -> dict[str, str]:
    import torch
    from safetensors.torch import load_file, save_file

    from ipa_rt import testing
    from ipa_rt.testing.ldm import write_single_file

    def target(key: str) -> Path:
        folder, name = FROM_MODEL[family][key]
        (comfy.root / "models" / folder).mkdir(parents=True, exist_ok=True)
        return comfy.root / "models" / folder / name

    base = testing.write_base_model(comfy.work / f"base-{family}", family=family, configs=configs)
    write_single_file(base, target("checkpoint"), dtype=torch.float16 if family == "sdxl" else None)
    # the single file's configs and tokenizers (what the ipa_rt loader's `diffusers` input gives it), not its weights
    shutil.copytree(base, target("diffusers"), ignore=shutil.ignore_patterns("*.safetensors"))
    adapter = testing.write_adapter(target("ip_adapter"), "base", base, projection_dim=VIT_L["projection_dim"])
    if family == "sd15":
        encoder = testing.write_image_encoder(comfy.work / "encoder-l", **VIT_L)
        state = load_file(str(encoder / "model.safetensors"))
        save_file({k: v.half().contiguous() for k, v in state.items()}, str(target("clip_vision")))
        shutil.rmtree(encoder)
        testing.write_lora(target("lora"), base, fmt="kohya")
        target("truncated").write_bytes(adapter.read_bytes()[:1000])
    shutil.rmtree(base)
    return {k: name for k, (_, name) in FROM_MODEL[family].items()}


@pytest.fixture(scope="module")
def from_model_files(comfy) -> dict[str, str]:
    return _write_from_model_files(comfy, "sd15", COMFY_SD15)


@pytest.fixture(scope="module")
def from_model_sdxl_files(comfy, from_model_files) -> dict[str, str]:
    return {**from_model_files, **_write_from_model_files(comfy, "sdxl", COMFY_SDXL)}  # SD1.5's encoder file


def _from_model_graph(
    files: dict, backend: str = "torch", lora: bool = False, ipa_rt_loader: bool = False, family: str = "sd15"
) -> dict:
    """The example ``ipa_rt_engine_from_model`` (``_sdxl``) on the files above, as a user's graph is: ComfyUI's own
    MODEL, CLIP and VAE from Load Checkpoint, optionally through Load LoRA, and CLIP_VISION from Load CLIP Vision;
    CLIP and VAE are Load Checkpoint's in every graph, so graphs differ only in the MODEL. ``ipa_rt_loader``: the
    MODEL (and the encoding pipeline) of the ipa_rt loader on that file instead (LoRA fused by its ``lora`` input):
    the reference."""
    name = "ipa_rt_engine_from_model" + ("_sdxl" if family == "sdxl" else "")
    graph = json.loads((WORKFLOWS / f"{name}.api.json").read_text())
    graph["1"]["inputs"]["ckpt_name"] = files["checkpoint"]
    graph["2"]["inputs"]["clip_name"] = files["clip_vision"]
    size = {"engine_height": FROM_MODEL_PX, "engine_width": FROM_MODEL_PX}
    graph["3"]["inputs"].update(ip_adapter=files["ip_adapter"], backend=backend, **size)
    graph["10"]["inputs"].update(width=FROM_MODEL_PX, height=FROM_MODEL_PX)
    graph["11"]["inputs"].update(steps=4)
    if lora and not ipa_rt_loader:
        lora_node = {"model": ["1", 0], "clip": ["1", 1], "lora_name": files["lora"]}
        graph["30"] = {"class_type": "LoraLoader", "inputs": {**lora_node, "strength_model": 1.0, "strength_clip": 1.0}}
        graph["3"]["inputs"]["model"] = ["30", 0]
    if ipa_rt_loader:
        loader = {k: files[k] for k in ("checkpoint", "diffusers", "ip_adapter", "clip_vision")}
        loader.update(ip_adapter_2="None", lora=files["lora"] if lora else "None", lora_strength=1.0)
        loader.update(backend="torch", precision="fp32", engine_height=0, engine_width=0)
        graph["20"] = {"class_type": "IpaRtLoadFromFolders", "inputs": loader}
        graph["21"] = {"class_type": "IpaRtModel", "inputs": {"pipeline": ["20", 0]}}
        graph["5"]["inputs"]["pipeline"] = ["20", 0]
        graph["7"]["inputs"]["model"] = ["21", 0]
    return graph


def _loads(comfy: Comfy) -> int:
    return comfy.log.read_text().count("ipa_rt: loaded")


@pytest.mark.slow  # the fast tier keeps one workflow end to end (the sampler's) and the node checks
def test_engine_from_comfyui_model(comfy, from_model_files):
    """ComfyUI's own MODEL and CLIP_VISION through ipa_rt Engine from MODEL: on torch, the image of the ipa_rt
    loader's MODEL on the same file, bit for bit (the same weights through the same conversion, the same CLIP
    vision weights); as an ONNX Runtime engine within ENGINE_VS_TORCH_LEVELS of it. The weight is a tensor write
    (nothing loaded or built again), and the patched weights are written once, named by their content."""
    files, engines = from_model_files, comfy.work / "engines"
    reference = comfy.image(comfy.run(_from_model_graph(files, ipa_rt_loader=True)), "13")
    on_torch = comfy.image(comfy.run(_from_model_graph(files)), "13")
    np.testing.assert_array_equal(on_torch, reference)
    written = sorted(p.name for p in (engines / "comfyui-weights").iterdir())
    assert [n.split("-")[0] for n in written] == ["clip_vision", "unet"], written

    manifests = set(engines.rglob("manifest.json"))
    graph = _from_model_graph(files, backend="onnxruntime")
    engine = comfy.image(comfy.run(graph), "13")
    assert np.abs(engine.astype(int) - on_torch).max() <= ENGINE_VS_TORCH_LEVELS
    built = set(engines.rglob("manifest.json")) - manifests
    assert len(built) == 1  # one engine set, the UNet side only: no text encoder or VAE engine
    networks = json.loads(next(iter(built)).read_text())["networks"]
    assert sorted(networks) == ["image_encoder", "image_projection_0", "unet"], sorted(networks)

    loads, stamps = _loads(comfy), {p: p.stat().st_mtime_ns for p in engines.rglob("manifest.json")}
    zero = copy.deepcopy(graph)
    zero["6"]["inputs"]["weight"] = 0.0
    at_zero = comfy.image(comfy.run(zero), "13")
    assert _loads(comfy) == loads and {p: p.stat().st_mtime_ns for p in engines.rglob("manifest.json")} == stamps
    assert np.abs(at_zero.astype(int) - engine).max() > 0
    assert sorted(p.name for p in (engines / "comfyui-weights").iterdir()) == written


@pytest.mark.slow  # the fast tier keeps one workflow end to end (the sampler's) and the node checks
def test_engine_from_model_with_comfyui_lora(comfy, from_model_files):
    """A LoRA applied by ComfyUI's Load LoRA is baked into the weights the engine is made from (a new file, named
    by the patched weights) and gives the image of ipa_rt's own LoRA fusing of that file (the ipa_rt loader's lora
    input), bit for bit: measured here, ComfyUI's patched weights (strength x up @ down added in fp32) equal
    diffusers' fused ones exactly, all 32 patched tensors (so no tolerance). Once written, the source MODEL is
    unloaded from ComfyUI's memory manager with its weights restored (tests/comfyui_model_check.py)."""
    files, folder = from_model_files, comfy.work / "engines" / "comfyui-weights"
    plain = comfy.image(comfy.run(_from_model_graph(files)), "13")
    before = {p.name for p in folder.iterdir()}
    with_lora = comfy.image(comfy.run(_from_model_graph(files, lora=True)), "13")
    fused = comfy.image(comfy.run(_from_model_graph(files, lora=True, ipa_rt_loader=True)), "13")
    np.testing.assert_array_equal(with_lora, fused)
    assert np.abs(with_lora.astype(int) - plain).max() > 0  # the LoRA changed the image
    new = {p.name for p in folder.iterdir()} - before
    assert len(new) == 1 and next(iter(new)).startswith("unet-"), new  # the patched UNet; the encoder reused
    models = comfy.root / "models"
    spec = {"checkpoint": models / "checkpoints" / files["checkpoint"], "lora": models / "loras" / files["lora"]}
    checked = _model_check(comfy, {"size": FROM_MODEL_PX, "from_model": {k: str(v) for k, v in spec.items()}})
    assert checked["released"] and checked["lora_tensors_in_file"] > 0, checked


@pytest.mark.slow  # the fast tier keeps one workflow end to end (the sampler's) and the node checks
def test_engine_from_sdxl_checkpoint(comfy, from_model_sdxl_files):
    """SDXL from Load Checkpoint (ComfyUI detects the file as Segmind Vega, an SDXL) and Load CLIP Vision through
    ipa_rt Engine from MODEL, with ComfyUI's SDXL CLIP (its pooled output and sizes in ``y``) and VAE: on torch,
    the image of the ipa_rt loader's MODEL on the same fp16 file, bit for bit; weight 0 changes it, nothing is
    loaded again; an SD1.5 adapter on it is an execution error of the node naming the file, and the server keeps
    serving. SDXL engines through the MODEL are test_sdxl_model_with_ksampler's."""
    files = from_model_sdxl_files
    reference = comfy.image(comfy.run(_from_model_graph(files, ipa_rt_loader=True, family="sdxl")), "13")
    graph = _from_model_graph(files, family="sdxl")
    on_torch = comfy.image(comfy.run(graph), "13")
    np.testing.assert_array_equal(on_torch, reference)
    assert any(p.name.startswith("unet-sdxl-") for p in (comfy.work / "engines" / "comfyui-weights").iterdir())
    loads = _loads(comfy)
    graph["6"]["inputs"]["weight"] = 0.0
    assert np.abs(comfy.image(comfy.run(graph), "13").astype(int) - on_torch).max() > 0
    assert _loads(comfy) == loads
    sd15_adapter = FROM_MODEL["sd15"]["ip_adapter"][1]
    graph["3"]["inputs"]["ip_adapter"] = sd15_adapter
    err = _error(comfy.run(graph))
    assert err["node_type"] == "IpaRtEngineFromModel" and sd15_adapter in err["exception_message"], err
    assert "2048" in err["exception_message"], err["exception_message"]  # the SDXL UNet's context width


@pytest.mark.slow  # the fast tier keeps one workflow end to end (the sampler's) and the node checks
def test_engine_from_model_errors(comfy, from_model_files, models):
    """An adapter that does not fit the checkpoint and a truncated adapter file: one execution error each, from
    the node, naming the file; the node's UNet-only pipeline given to ipa_rt Engine as MODEL (which gives the
    pipeline's CLIP and VAE) is refused there; the server keeps serving."""
    from ipa_rt.comfyui.examples import IN_FOLDERS

    files = from_model_files
    wrong = _from_model_graph(files)
    wrong["3"]["inputs"]["ip_adapter"] = IN_FOLDERS["ip_adapter"][1]  # the 32-wide tiny model's adapter
    err = _error(comfy.run(wrong))
    assert err["node_type"] == "IpaRtEngineFromModel", err
    assert IN_FOLDERS["ip_adapter"][1] in err["exception_message"], err["exception_message"]
    truncated = _from_model_graph(files)
    truncated["3"]["inputs"]["ip_adapter"] = files["truncated"]
    err = _error(comfy.run(truncated))
    assert err["node_type"] == "IpaRtEngineFromModel" and files["truncated"] in err["exception_message"], err
    as_model = _from_model_graph(files)  # the UNet-only pipeline has no CLIP or VAE for ipa_rt Engine as MODEL
    as_model["21"] = {"class_type": "IpaRtModel", "inputs": {"pipeline": ["3", 1]}}
    as_model["8"]["inputs"]["clip"] = ["21", 1]
    err = _error(comfy.run(as_model))
    assert err["node_type"] == "IpaRtModel" and "is a UNet alone" in err["exception_message"], err
    assert comfy.run(_from_model_graph(files))["status"]["status_str"] == "success"  # still serving


def test_unsupported_patch_is_refused(comfy, models):
    graph = _workflow("ipa_rt_engine_model", models)
    graph["20"] = {"class_type": "TomePatchModel", "inputs": {"model": ["6", 0], "ratio": 0.3}}
    graph["10"]["inputs"]["model"] = ["20", 0]
    err = _error(comfy.run(graph))
    assert err["node_type"] == "KSampler"
    assert "patches" in err["exception_message"] and "attn1_patch" in err["exception_message"]
    assert comfy.run(_workflow("ipa_rt_sampler", models))["status"]["status_str"] == "success"  # still serving


def test_bad_inputs_are_execution_errors_naming_the_input(comfy, models):
    missing = _workflow("ipa_rt_sampler", models, ip_adapter="/nonexistent/ip-adapter.safetensors")
    err = _error(comfy.run(missing))
    assert err["node_type"] == "IpaRtLoadPipeline" and "ip_adapter[0]" in err["exception_message"]

    wrong = _workflow("ipa_rt_sampler", models)
    wrong["3"]["inputs"]["adapter_index"] = 3
    assert "adapter_index" in _error(comfy.run(wrong))["exception_message"]

    size = _workflow("ipa_rt_engine_model", models)
    size["9"]["inputs"].update(width=LATENT * 8 + 64, height=LATENT * 8 + 64)
    message = _error(comfy.run(size))["exception_message"]
    assert "built for" in message and "sample" in message

    status, answer = comfy.post({**_workflow("ipa_rt_sampler", models)})
    assert status == 200, answer
    backwards = _workflow("ipa_rt_sampler", models)
    backwards["4"]["inputs"].update(start_at=0.8, end_at=0.2)
    status, answer = comfy.post(backwards)
    assert status == 400 and "start_at" in json.dumps(answer)
    assert comfy.run(_workflow("ipa_rt_sampler", models))["status"]["status_str"] == "success"


def test_ui_workflows_match_the_live_node_schemas(comfy):
    """The UI-format examples are the API-format ones laid out for the frontend, against this server's schemas
    (``IPA_RT_WRITE_WORKFLOWS=1`` rewrites them)."""
    from ipa_rt.comfyui.workflow_ui import api_to_ui

    info = json.loads(comfy.get("/object_info"))
    for api in sorted(WORKFLOWS.glob("*.api.json")):
        ui = api_to_ui(json.loads(api.read_text()), info)
        path = api.with_name(api.name.replace(".api.json", ".ui.json"))
        if os.environ.get("IPA_RT_WRITE_WORKFLOWS"):
            path.write_text(json.dumps(ui, indent=1) + "\n")
        assert json.loads(path.read_text()) == ui, f"{path.name} is stale: rerun with IPA_RT_WRITE_WORKFLOWS=1"
        graph = json.loads(api.read_text())
        assert {n["type"] for n in ui["nodes"]} == {n["class_type"] for n in graph.values()}
        assert len(ui["links"]) == sum(isinstance(v, list) for n in graph.values() for v in n["inputs"].values())


# Loads a custom node's __init__.py as ComfyUI 0.3.64's nodes.load_custom_node does (module named by its path), with
# no ipa_rt installed (the editable finder and path hooks of an `pip install -e` dropped), and prints where ipa_rt
# came from and the node ids its comfy_entrypoint gives.
_LOAD_WITHOUT_INSTALL = """
import asyncio, importlib.util, json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
assert importlib.util.find_spec("ipa_rt") is None, "ipa_rt still importable"
node = sys.argv[1]
spec = importlib.util.spec_from_file_location(node.replace(".", "_x_"), node + "/__init__.py")
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
nodes = asyncio.run(asyncio.run(module.comfy_entrypoint()).get_node_list())
print(json.dumps({"ipa_rt": sys.modules["ipa_rt"].__file__, "nodes": [n.GET_SCHEMA().node_id for n in nodes]}))
"""


def _git_clone_of_this_checkout(work: Path, dest: Path) -> None:
    """``git clone`` of this checkout's working tree (tracked files and new, not ignored ones, uncommitted edits
    included): copied into a scratch repository, committed there, and cloned from it. The checkout's own git state
    is only read."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    src = work / "src"
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():  # a tracked file deleted in the working tree is not part of the clone
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    who = ["-c", "user.name=ipa_rt-tests", "-c", "user.email=tests@ipa-rt.invalid", "-c", "init.defaultBranch=main"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "working tree"]):
        subprocess.run(["git", *who, *args], cwd=src, check=True, capture_output=True)
    subprocess.run(["git", "clone", "-q", str(src), str(dest)], check=True, capture_output=True)


@pytest.mark.slow
def test_git_clone_into_custom_nodes(tmp_path):
    """The route ComfyUI users take: ``git clone`` of the repository into a fresh ``custom_nodes/`` (no installer),
    then ComfyUI lists ipa_rt's nodes from that folder. The clone's root ``__init__.py`` uses the installed ipa_rt
    (here the test Python's) and, with none installed, the clone's own ``ipa_rt/``; the registry metadata parses
    with ComfyUI's own ``comfy_config`` and ``requirements.txt`` installs the clone with the comfyui extra."""
    root = tmp_path / "ComfyUI"
    shutil.copytree(SNAPSHOT, root, ignore=shutil.ignore_patterns("tests", "tests-unit", "__pycache__"))
    node = root / "custom_nodes" / "ipa_rt"
    _git_clone_of_this_checkout(tmp_path, node)
    assert not (node / "build").exists() and (node / "__init__.py").is_file()
    lines = [line for line in (node / "requirements.txt").read_text().splitlines() if not line.startswith("#")]
    assert lines == [".[comfyui]"]  # ComfyUI-Manager runs pip per line, in the node folder

    alone = subprocess.run([PYTHON, "-c", _LOAD_WITHOUT_INSTALL, str(node)], cwd=root, capture_output=True, text=True)
    assert alone.returncode == 0, alone.stderr[-3000:]
    loaded = json.loads(alone.stdout.strip().splitlines()[-1])
    assert Path(loaded["ipa_rt"]).resolve() == (node / "ipa_rt" / "__init__.py").resolve()
    assert "IpaRtSampler" in loaded["nodes"]

    parsed = subprocess.run(
        [
            PYTHON,
            "-c",
            "import sys, json; from comfy_config.config_parser import extract_node_configuration as read;"
            " c = read(sys.argv[1]); t = c.tool_comfy;"
            " print(json.dumps([c.project.name, c.project.version, t.publisher_id, t.display_name]))",
            str(node),
        ],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert parsed.returncode == 0, parsed.stderr[-3000:]
    name, version, publisher, display = json.loads(parsed.stdout)
    assert name == "ipa_rt" and version.count(".") == 2 and publisher and display

    with _serve(root, tmp_path) as server:
        info = json.loads(server.get("/object_info"))
        ours = {k: v for k, v in info.items() if v.get("python_module") == "custom_nodes.ipa_rt"}
        assert set(loaded["nodes"]) <= set(ours), sorted(set(loaded["nodes"]) - set(ours))
        assert "ipa_rt_nodes" not in {p.name for p in (root / "custom_nodes").iterdir()}  # no dev installer here
        assert "ComfyUI nodes from" in server.log.read_text()
