"""benchmarks/sdcpp_anchor.py: stable-diffusion.cpp's command line, its log's times, the prepared copy of the
bench's folder, and (with ``$IPA_RT_SDCPP``, a built sd-cli) a real run."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
import textwrap
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))  # the scripts import their siblings (optimum_anchor's stats, models)

import sdcpp_anchor as A  # noqa: E402

# A real sd-cli log (this build, the bench's random full-size SD1.5 folder, f32, LCM, 1 step, 512², 2 threads on a
# 2-core AMD EPYC), as run_once writes it: each line stamped with its arrival (s since the start); progress bars
# redraw with "\r" inside one line. Lines between these were left out.
LOG = (
    "+     0.003 [DEBUG] main.cpp:689  - version: stable-diffusion.cpp version unknown, commit unknown\n"
    "+     0.005 [DEBUG] main.cpp:690  - System Info: \n"
    "+     0.005    SSE3 = 1 |    SSSE3 = 1 |    AVX = 1 |    AVX2 = 1 |    F16C = 1 |    FMA = 1 |    BMI2 = 1 |"
    "    AVX512 = 1 |    AVX512_VBMI = 1 |    AVX512_VNNI = 1 |    AVX512_BF16 = 1 |    OPENMP = 1 |    REPACK = 1 | \n"
    "+     0.020 [INFO ] stable-diffusion.cpp:908  - Version: SD 1.x \n"
    "+     0.053 [DEBUG] clip_tokenizer.cpp:66   - vocab size: 49408\n"
    "+     0.121 [INFO ] stable-diffusion.cpp:5628 - generate_image 512x512\n"
    "+     0.121 [INFO ] stable-diffusion.cpp:4380 - sampling using LCM method\n"
    "+     1.966 [INFO ] model_loader.cpp:1304 - loading tensors completed, taking 1.82s (read: 1.81s, memcpy: 0.00s,"
    " convert: 0.00s, copy_to_backend: 0.00s)\n"
    "+    15.497 \r  |##################################################| 4/4 - 706.92MB/s\x1b[K\n"
    "+    15.497 [INFO ] model_loader.cpp:1304 - loading tensors completed, taking 0.02s (read: 0.01s, memcpy: 0.00s,"
    " convert: 0.00s, copy_to_backend: 0.00s)\n"
    "+    15.570 [INFO ] stable-diffusion.cpp:2213 - IP-Adapter: 4 image tokens, strength 1.00\n"
    '+    15.570 [DEBUG] bpe_tokenizer.cpp:208  - split prompt "a photo of a cat" to 5 tokens ["a</w>", "photo</w>",'
    ' "of</w>", "a</w>", "cat</w>", ]\n'
    "+    16.798 [INFO ] model_loader.cpp:1304 - loading tensors completed, taking 1.23s (read: 1.09s, memcpy: 0.00s,"
    " convert: 0.00s, copy_to_backend: 0.00s)\n"
    "+    18.362 [INFO ] stable-diffusion.cpp:5296 - get_learned_condition completed, taking 2.79s\n"
    "+    28.607 [INFO ] model_loader.cpp:1304 - loading tensors completed, taking 10.23s (read: 5.27s, memcpy: 0.00s,"
    " convert: 3.60s, copy_to_backend: 0.00s)\n"
    "+    74.146 \r  |==================================================| 1/1 - 55.78s/it\x1b[K\n"
    "+    74.199 [INFO ] stable-diffusion.cpp:5711 - sampling completed, taking 55.84s\n"
    "+    74.406 [INFO ] model_loader.cpp:1304 - loading tensors completed, taking 0.20s (read: 0.06s, memcpy: 0.00s,"
    " convert: 0.11s, copy_to_backend: 0.00s)\n"
    "+   217.392 [INFO ] stable-diffusion.cpp:5391 - decode_first_stage completed, taking 143.07s\n"
    "+   217.392 [INFO ] stable-diffusion.cpp:5861 - generate_image completed in 217.15s\n"
    "+   218.379 [INFO ] main.cpp:490  - save result image 0 to '/tmp/sdcpp-work/runs/f32@512/out.png' (success)\n"
)

PREPARED = {
    "model": Path("/w/model"),
    "clip_vision": Path("/w/clip_vision.safetensors"),
    "ip_adapter": Path("/w/ip-adapter.safetensors"),
    "taesd": Path("/w/taesd.safetensors"),
    "image": Path("/w/reference.png"),
}


def _flag(cmd: list[str], name: str) -> str:
    assert cmd.count(name) == 1, f"{name} given {cmd.count(name)} times in {cmd}"
    return cmd[cmd.index(name) + 1]


def test_command_line_lcm_with_taesd():
    cmd = A.command("/bin/sd-cli", PREPARED, "/w/out.png", wtype="q8_0", taesd=True, size=512, threads=2, seed=7)
    assert cmd[0] == "/bin/sd-cli" and cmd[-1] == "-v"  # -v: the log lines parse_log reads
    expected = {
        "-m": "/w/model",
        "--type": "q8_0",
        "--clip_vision": "/w/clip_vision.safetensors",
        "--ip-adapter": "/w/ip-adapter.safetensors",
        "--ip-adapter-image": "/w/reference.png",
        "--ip-adapter-strength": "1",
        "--taesd": "/w/taesd.safetensors",
        "-p": "a photo of a cat",
        "--sampling-method": "lcm",
        "--steps": "4",
        "--cfg-scale": "1",
        "-W": "512",
        "-H": "512",
        "-s": "7",
        "-t": "2",
        "-o": "/w/out.png",
    }
    assert {k: _flag(cmd, k) for k in expected} == expected
    assert len(cmd) == 1 + 2 * len(expected) + 1  # nothing else


def test_command_line_cfg_without_taesd():
    cmd = A.command("sd-cli", PREPARED, "o.png", wtype="f32", **A.CFG25, size=256, extra=["--diffusion-fa"])
    assert cmd[-2:] == ["--diffusion-fa", "-v"]
    assert "--taesd" not in cmd  # the full VAE decodes
    assert (_flag(cmd, "--sampling-method"), _flag(cmd, "--steps"), _flag(cmd, "--cfg-scale")) == (
        "dpm++2m",
        "25",
        "7.5",
    )
    assert (_flag(cmd, "--type"), _flag(cmd, "-W"), _flag(cmd, "-H")) == ("f32", "256", "256")
    assert (_flag(cmd, "-s"), _flag(cmd, "-t")) == (str(A.SEED), str(A.THREADS))


def test_configurations():
    assert A.parse_config("f32") == ("f32", False)
    assert A.parse_config("q4_0+taesd") == ("q4_0", True)
    assert all(A.parse_config(c)[0] in A.TYPES for c in A.CONFIGS)
    for bad in ("", "+taesd", "q8_0+vae", "f16+taesd+x"):
        with pytest.raises(ValueError):
            A.parse_config(bad)


def test_parse_a_real_log():
    got = A.parse_log(LOG)
    assert got["load_ms"] == pytest.approx(1000 * (1.82 + 0.02 + 1.23 + 10.23 + 0.20))  # every model's lazy load
    assert got["condition_ms"] == pytest.approx(2790)
    assert got["sampling_ms"] == pytest.approx(55840)
    assert got["decode_ms"] == pytest.approx(143070)
    assert got["generate_ms"] == pytest.approx(217150)
    assert got["ip_adapter_tokens"] == 4  # the base adapter's 4 image tokens: the adapter ran
    assert got["step_s"] == pytest.approx(55.78)  # the sampling bar's s/it, not the loaders' MB/s
    assert got["startup_ms"] == pytest.approx(121)  # to the "generate_image 512x512" line
    assert got["reference_ms"] == pytest.approx(15570 - 121)  # that line to the IP-Adapter's
    assert {"AVX2", "AVX512", "AVX512_VNNI", "AVX512_BF16"} <= set(got["cpu_features"])


def test_parse_a_log_without_stamps_or_adapter():
    unstamped = "\n".join(A.STAMP.sub("", line, count=1) for line in LOG.split("\n") if "IP-Adapter" not in line)
    got = A.parse_log(unstamped)
    assert got["sampling_ms"] == pytest.approx(55840)  # sd.cpp's own times need no stamps
    assert "ip_adapter_tokens" not in got and "reference_ms" not in got and "startup_ms" not in got
    fast = "+ 1.0 \r  |============>                                     | 1/4 - 2.50it/s\x1b[K"  # under 1 s a step
    assert A.parse_log(fast)["step_s"] == pytest.approx(0.4)


def test_find_binary(tmp_path, monkeypatch):
    monkeypatch.delenv(A.ENV, raising=False)
    exe, why = A.find_binary(None)
    assert exe is None and A.ENV in why and "build.sh" in why
    exe, why = A.find_binary(tmp_path / "nothing")
    assert exe is None and "does not exist" in why
    plain = tmp_path / "sd-cli"
    plain.write_text("")
    assert "not executable" in A.find_binary(plain)[1]
    plain.chmod(plain.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv(A.ENV, str(plain))
    assert A.find_binary(None) == (plain, "")  # the environment's, when no path is given


# ---- the prepared copy, on the tiny random folder ----


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from models import write_models

    return write_models(tmp_path_factory.mktemp("tiny"), "sd15", full=False, variant="base")


def _digests(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_prepare_the_copy(tiny, tmp_path):
    from safetensors.torch import load_file

    root = Path(tiny["base"]).parent
    before = _digests(root)
    prepared = A.prepare(tiny, tmp_path / "inputs")
    assert _digests(root) == before  # the bench's folder is never written
    assert not any(tmp_path.rglob("*.tmp"))

    original = load_file(str(Path(tiny["base"]) / "text_encoder" / "model.safetensors"))
    converted = load_file(str(prepared["model"] / "text_encoder" / "model.safetensors"))  # a valid safetensors file
    assert not any(k.startswith("text_model.") for k in original)  # transformers 5's layout: what sd.cpp misses
    assert set(converted) == {"text_model." + k for k in original}
    table = converted["text_model.embeddings.token_embedding.weight"]
    rows = original["embeddings.token_embedding.weight"]
    assert table.shape == (A.CLIP_VOCAB, rows.shape[1]) and rows.shape[0] < A.CLIP_VOCAB
    assert table[: len(rows)].equal(rows)  # the real rows first, then repeated
    assert table[len(rows)].equal(rows[0]) and table[-1].equal(rows[(A.CLIP_VOCAB - 1) % len(rows)])
    for k, v in original.items():
        if k != "embeddings.token_embedding.weight":
            assert converted["text_model." + k].equal(v), k
    assert prepared["changes"] == {"renamed_keys": len(original), "token_rows": [len(rows), A.CLIP_VOCAB]}

    # the rest is linked, not copied: sd.cpp reads the diffusers folder's unet/ and vae/ and these files as they are
    weights = "diffusion_pytorch_model.safetensors"
    links = {
        prepared["model"] / "unet" / weights: Path(tiny["base"]) / "unet" / weights,
        prepared["model"] / "vae" / weights: Path(tiny["base"]) / "vae" / weights,
        prepared["clip_vision"]: Path(tiny["image_encoder"]) / "model.safetensors",
        prepared["taesd"]: Path(tiny["taesd"]) / weights,
    }
    for link, target in links.items():
        assert link.is_symlink() and link.resolve() == target.resolve()
    assert prepared["ip_adapter"].resolve() == Path(tiny["adapter"]).resolve()
    assert prepared["image"].resolve() == Path(tiny["image"]).resolve()

    # a second prepare of the same files does nothing; a marker that does not match (other sources or sizes or times,
    # another format) is prepared again
    copy = prepared["model"] / "text_encoder" / "model.safetensors"
    stamp = copy.stat().st_mtime_ns
    assert A.prepare(tiny, tmp_path / "inputs")["changes"] == prepared["changes"]
    assert copy.stat().st_mtime_ns == stamp
    marker = tmp_path / "inputs" / A.PREPARED
    assert json.loads(marker.read_text())["sources"]["format"] == A.FORMAT
    marker.write_text('{"sources": {}, "changes": {}}')
    A.prepare(tiny, tmp_path / "inputs")
    assert copy.stat().st_mtime_ns != stamp


def test_a_text_encoder_already_in_sd_cpp_layout_is_left_alone(tiny, tmp_path):
    from safetensors.torch import load_file

    once = tmp_path / "once.safetensors"
    A.convert_text_encoder(Path(tiny["base"]) / "text_encoder" / "model.safetensors", once)
    twice = tmp_path / "twice.safetensors"
    assert A.convert_text_encoder(once, twice) == {"renamed_keys": 0, "token_rows": None}
    a, b = load_file(str(once)), load_file(str(twice))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_prepare_names_what_is_missing(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        A.prepare({**tiny, "taesd": tmp_path / "nowhere"}, tmp_path / "inputs")


# ---- measure() around a stand-in sd-cli: a script that prints the real log above and writes the image ----


def _fake_sdcpp(tmp_path: Path) -> Path:
    exe = tmp_path / "fake-sd-cli"
    log = "".join(A.STAMP.sub("", line, count=1) + "\n" for line in LOG.split("\n") if line)  # as sd-cli prints it
    body = f"""\
        import sys
        argv = sys.argv[1:]
        if "--version" in argv:
            print("stable-diffusion.cpp version fake, commit 0000000")
            sys.exit(0)
        if argv[argv.index("--type") + 1] == "q4_0":
            print("[ERROR] stable-diffusion.cpp:1 - a failure sd.cpp reports", flush=True)
            sys.exit(3)
        sys.stdout.write({log!r})
        open(argv[argv.index("-o") + 1], "wb").write(b"png")
        """
    exe.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    exe.chmod(0o755)
    return exe


def test_measure_rows_and_recorded_errors(tiny, tmp_path):
    exe = _fake_sdcpp(tmp_path)
    errors: dict = {}
    workloads = {"LCM 4 steps end to end": A.LCM4, "25 steps CFG end to end": A.CFG25}
    rows = A.measure(
        exe, tiny, 64, 2, ["f32", "q4_0+taesd", "q8_0+taesd"], workloads, work=tmp_path / "w", errors=errors
    )
    assert [(r["system"], r["workload"]) for r in rows] == [
        ("stable-diffusion.cpp f32", "LCM 4 steps end to end"),
        ("stable-diffusion.cpp f32", "25 steps CFG end to end"),
        ("stable-diffusion.cpp q8_0+taesd", "LCM 4 steps end to end"),
        ("stable-diffusion.cpp q8_0+taesd", "25 steps CFG end to end"),
    ]
    assert list(errors) == ["stable-diffusion.cpp q4_0+taesd@64"]  # recorded, not raised: the others ran
    assert errors["stable-diffusion.cpp q4_0+taesd@64"]["error"].startswith("sd-cli exited with 3")
    assert "a failure sd.cpp reports" in errors["stable-diffusion.cpp q4_0+taesd@64"]["detail"]
    for r in rows:
        assert r["n"] == 2 and 0 < r["median_ms"] <= r["p90_ms"] and r["size"] == 64
        assert r["peak_rss_mb"] > 1 and r["cpu_s"] > 0  # the child's own, from wait4
        assert r["sampling_ms"] == pytest.approx(55840) and r["ip_adapter_tokens"] == 4
        assert r["compute_ms"] == pytest.approx(217150 - 1000 * (1.82 + 0.02 + 1.23 + 10.23 + 0.20))
        assert 0 < r["cpu_share"] <= 1.05  # the stand-in is one thread, the row says 2: at most ~half
        assert r["warmup_s"] > 0 and r["version"].startswith("stable-diffusion.cpp version fake")
    assert rows[1]["steps"] == 25 and "dpm++2m" in rows[1]["command"]
    assert rows[2]["decoder"].startswith("TAESD") and "--taesd" in rows[2]["command"]
    assert (tmp_path / "w" / "runs" / "f32@64" / "warmup.log").is_file()
    assert "--steps 1 " in " ".join(A.command(exe, A.prepare(tiny, tmp_path / "w" / "inputs"), "o", steps=1))


def test_a_run_without_the_adapter_is_an_error(tiny, tmp_path):
    exe = _fake_sdcpp(tmp_path)
    exe.write_text(exe.read_text().replace("IP-Adapter: 4 image tokens", "no adapter here"))
    errors: dict = {}
    assert A.measure(exe, tiny, 64, 1, ["f32"], work=tmp_path / "w", errors=errors, warmup=False) == []
    assert "no IP-Adapter tokens" in errors["stable-diffusion.cpp f32@64"]["error"]


def test_main_skips_without_a_binary(tmp_path, monkeypatch):
    monkeypatch.delenv(A.ENV, raising=False)
    out = tmp_path / "rows.json"
    assert A.main(["--out", str(out)]) == 0
    done = json.loads(out.read_text())
    assert done["rows"] == [] and A.ENV in done["skipped"]


# ---- the real thing ----


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get(A.ENV), reason=f"no stable-diffusion.cpp binary: set {A.ENV} (build.sh)")
def test_sdcpp_end_to_end(tmp_path):
    """One real sd-cli run on the full-size random folder ($IPA_RT_SDCPP_MODELS: one write_models wrote, else
    written here: ~1 min, 6 GB), q8_0 with TAESD, 1 LCM step at 128²."""
    from PIL import Image

    if os.environ.get("IPA_RT_SDCPP_MODELS"):
        root = Path(os.environ["IPA_RT_SDCPP_MODELS"])
        files = {
            "base": root / "model-sd15",
            "adapter": root / "IP-Adapter" / "models" / "ip-adapter-base_sd15.safetensors",
            "image_encoder": root / "IP-Adapter" / "models" / "image_encoder",
            "image": root / "reference.png",
            "taesd": root / "taesd",
        }
    else:
        from models import write_models

        files = write_models(tmp_path / "models", "sd15", full=True, variant="base")
    errors: dict = {}
    one_step = {"sampler": "lcm", "steps": 1, "cfg_scale": 1.0}
    work = tmp_path / "work"
    rows = A.measure(A.find_binary()[0], files, 128, 1, ["q8_0+taesd"], {"LCM 1 step": one_step}, work=work,
                     errors=errors, warmup=False)  # fmt: skip
    assert errors == {}
    (row,) = rows
    assert row["system"] == "stable-diffusion.cpp q8_0+taesd" and row["ip_adapter_tokens"] == 4
    assert row["median_ms"] > row["generate_ms"] > row["sampling_ms"] > 0 and row["peak_rss_mb"] > 500
    with Image.open(work / "runs" / "q8_0+taesd@128" / "out.png") as image:
        assert image.size == (128, 128)


def test_peak_memory_is_the_childs_own_not_the_bench_process(tmp_path):
    """Linux carries the peak resident memory of the process a child was forked from into the child's ru_maxrss at
    exec: sd-cli started straight from the bench (GBs resident) reported the bench's 5.8 GB instead of its own 3.0
    GB. run_once starts it through a small launcher, so a tiny child here reads tens of MB whatever this process
    holds."""
    held = bytearray(400 << 20)  # this process: 400 MB more resident than the child will ever be
    held[::4096] = b"\x01" * len(held[::4096])
    run = A.run_once([sys.executable, "-S", "-c", "pass"], tmp_path / "log.txt", timeout_s=60)
    assert run["returncode"] == 0 and 0 < run["peak_rss_mb"] < 100, run
    del held
