"""Every command run as a user types it: ``ipa_rt COMMAND ...`` (the console script, or ``python -m ipa_rt``) in a
process of its own with an engine cache of its own, on the example models; what each command wrote or answered is
read back. One engine folder, built by ``ipa_rt build``, serves ``inspect``, ``generate --engine`` and ``doctor``.
The in-process tests of each command (their options and errors) are in test_cli, test_engines, test_doctor,
test_demo, test_serve and test_benchmarks."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import PARITY_RTOL
from PIL import Image
from user_commands import DEMO_CLIENT, SERVE_CLIENT, ask, free_port, listening_on, run, running, user_env

from ipa_rt.cli import build_parser

PYTHON_M = [sys.executable, "-m", "ipa_rt"]
SCRIPT = Path(sys.executable).parent / "ipa_rt"  # pip's console script beside this Python (pip install -e .)
IPA_RT = [str(SCRIPT)] if SCRIPT.is_file() else PYTHON_M
COMMANDS = ("generate", "build", "inspect", "demo", "doctor", "bench", "serve")
SIZE = 32  # pixels: the example's tiny networks (latents 16x16)
BACKEND_NAMES = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO", "tensorrt": "TensorRT"}


def ipa_rt(argv: list[str], cwd: Path, command: list[str] = IPA_RT) -> subprocess.CompletedProcess:
    """One command, its cache in ``cwd``; a failure shows what the command said."""
    done = run(command, argv, cwd, user_env(cwd / "cache"), timeout=600)
    assert done.returncode == 0, f"ipa_rt {' '.join(argv)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    return done


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG", im.format
        return np.asarray(im.convert("RGB"))


def words(text: str) -> str:
    """Help text with argparse's line wrapping undone."""
    return " ".join(text.split())


def command_help() -> dict[str, str]:
    """Each command's line in ``ipa_rt --help``, as the parser holds it."""
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {action.dest: words(action.help) for action in sub._choices_actions}


# --- --help ---------------------------------------------------------------------------------------------------
def test_help_lists_every_command_with_what_it_does(tmp_path):
    helps = command_help()
    assert set(helps) == set(COMMANDS), "a command without a test here, or one gone"
    out = words(ipa_rt(["--help"], tmp_path).stdout)
    for command in COMMANDS:
        assert f"{command} {helps[command]}" in out, f"`ipa_rt --help` does not list {command}: {out}"
    # build's line names every backend its --backend takes, and the model families it builds engines for
    build = next(a for a in build_parser()._actions if a.dest == "command").choices["build"]
    backends = next(a for a in build._actions if a.dest == "backend").choices
    assert all(BACKEND_NAMES[b] in helps["build"] for b in backends), helps["build"]
    assert all(family in helps["build"] for family in ("SD1.5", "SDXL", "Flux", "Kolors", "SD3.5")), helps["build"]


@pytest.mark.slow  # seven processes, each importing torch: the fast tier keeps `ipa_rt --help`
@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_answers_help(command, tmp_path):
    """``python -m ipa_rt COMMAND --help``: bench's and serve's go to their own parsers, and say so."""
    out = ipa_rt([command, "--help"], tmp_path, command=PYTHON_M).stdout
    assert re.match(rf"usage: ipa_rt {command}\b", out), out[:300]


# --- the commands on the example models: slow (each starts torch, a server starts Ray or uvicorn) ---------------
@pytest.fixture(scope="module")
def example(tmp_path_factory) -> dict[str, Path]:
    """The example's files (tiny SD1.5 model, adapter with its image encoder, reference image), written once."""
    from ipa_rt.testing import write_example

    return write_example(tmp_path_factory.mktemp("example"))


@pytest.fixture(scope="module")
def engine(example, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``ipa_rt build`` of the example at 32x32 on its default backend: the folder and what the command said."""
    work = tmp_path_factory.mktemp("build")
    folder = work / "engines"
    argv = ["build", str(example["base"]), "--ip-adapter", str(example["adapter"]), "--height", str(SIZE)]
    done = ipa_rt([*argv, "--width", str(SIZE), "-o", str(folder)], work)
    return folder, done


@pytest.mark.slow
def test_build_writes_engines_and_their_manifest(engine, example):
    from ipa_rt.export.manifest import read_manifest

    folder, done = engine
    manifest = read_manifest(folder)
    assert manifest["backend"] == "onnxruntime"  # build's default
    assert (manifest["shapes"]["height"], manifest["shapes"]["width"]) == (SIZE, SIZE)
    assert [a["origin"] for a in manifest["adapters"]] == [str(example["adapter"])]
    for name, net in manifest["networks"].items():
        assert net["files"], name
        for file, record in net["files"].items():
            assert (folder / file).stat().st_size == record["size"], (name, file)
    # one progress line per network, and where the engines went
    assert all(f"] {name}: " in done.stdout for name in manifest["networks"]), done.stdout
    assert f"engines written to '{folder}'" in done.stdout


@pytest.mark.slow
def test_inspect_names_what_it_read(engine, example):
    from ipa_rt.export.manifest import read_manifest

    folder, _ = engine
    manifest = read_manifest(folder)
    out = ipa_rt(["inspect", str(folder)], folder.parent).stdout
    assert f"{manifest['backend']} engines for a {manifest['family'].upper()} model" in out
    assert f"images {SIZE}x{SIZE}" in out and str(example["adapter"]) in out
    assert all(f"  {name} (" in out for name in manifest["networks"]), out
    assert "every engine file is intact" in out


@pytest.mark.slow
def test_generate_example_writes_a_png_of_the_size_asked(tmp_path):
    """README's first command, with a size other than the example's default."""
    out = tmp_path / "out.png"
    said = ipa_rt(["generate", "--example", "--height", "48", "--width", str(SIZE), "-o", str(out)], tmp_path).stdout
    pixels = read_png(out)
    assert pixels.shape == (48, SIZE, 3) and pixels.std() > 0  # decoded noise, not a blank image
    assert f"wrote {out}" in said


@pytest.mark.slow
def test_generate_from_the_built_engines(engine, example, tmp_path):
    folder, _ = engine
    out = tmp_path / "engine.png"
    argv = ["generate", "--engine", str(folder), "--ip-image", str(example["image"]), "--prompt", "a cat"]
    said = ipa_rt([*argv, "--steps", "2", "-o", str(out)], tmp_path).stdout
    pixels = read_png(out)
    assert pixels.shape == (SIZE, SIZE, 3) and pixels.std() > 0
    assert "backend onnxruntime" in said and f"wrote {out}" in said


@pytest.mark.slow
def test_doctor_checks_the_model_and_the_engines(engine, example, tmp_path):
    folder, _ = engine
    report = tmp_path / "doctor.json"
    argv = ["doctor", str(example["base"]), "--ip-adapter", str(example["adapter"]), "--engine", str(folder)]
    said = ipa_rt([*argv, "--device", "cpu", "-o", str(report)], tmp_path).stdout
    result = json.loads(report.read_text())
    rows = {r["name"]: r for r in result["checks"]}
    assert result["ok"] and not result["failed"] and "all checks passed" in said
    assert rows["environment"]["status"] == "info"  # versions and device: reported, not checked
    checks = [r for r in rows.values() if r["status"] != "info"]
    assert all(r["status"] in ("ok", "skipped") and r["detail"] for r in checks), checks  # a skip says why
    for row in checks:
        assert row["status"] == "skipped" or row["max_error"] <= row["tolerance"], row
    assert rows["attention_vs_diffusers"]["status"] == rows["engine_vs_torch"]["status"] == "ok"  # a CPU checks these
    assert all(f"| {name} | {row['status']} |" in said for name, row in rows.items())  # the table printed


@pytest.mark.slow
def test_bench_writes_its_results(tmp_path):
    """The default (CPU) profile on tiny models, two systems: the JSON, with each row's error against diffusers."""
    systems = ["diffusers fp32", "ipa_rt torch fp32"]
    argv = ["bench", "--tiny", "--sizes", str(SIZE), "--reps", "1", "--cfg-steps", "2", "--cfg-sizes", str(SIZE),
            "--no-plus", "--systems", *systems, "--work", str(tmp_path / "work"), "--out", str(tmp_path)]  # fmt: skip
    ipa_rt(argv, tmp_path)
    result = json.loads((tmp_path / "tiny-cpu.json").read_text())
    assert result["complete"] and {r["system"] for r in result["rows"]} == set(systems)
    assert all(r["median_ms"] > 0 for r in result["rows"]), result["rows"]
    ours = [r for r in result["rows"] if r["system"] == systems[1]]
    assert ours and all(r["latent_rel_l2"] <= PARITY_RTOL for r in ours), ours  # diffusers' output, measured
    assert (tmp_path / "tiny-cpu.md").read_text().startswith("# ipa_rt bench")


@pytest.fixture
def ray_dir() -> Iterator[Path]:
    """Ray's own folder for this server: test_serve's ``ray.init(address="auto")`` finds the newest cluster through
    /tmp/ray, and must not find this one; short, as Ray's socket paths must be."""
    folder = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_serve_answers_a_generation_over_http(tmp_path, ray_dir):
    port = free_port()
    argv = [*IPA_RT, "serve", "--example", "--port", str(port), "--num-replicas", "1"]
    env = user_env(tmp_path / "cache", RAY_TMPDIR=str(ray_dir))
    body = {"prompt": "a cat", "steps": 2, "seed": 1, "height": 48, "width": SIZE}
    with running(argv, tmp_path, env, "Ctrl-C stops", port) as server:
        got = ask(sys.executable, SERVE_CLIENT, server, json.dumps(body))
    assert got["content_type"] == "image/png" and got["format"] == "PNG", got
    assert got["size"] == [body["width"], body["height"]] and any(lo < hi for lo, hi in got["extrema"]), got
    assert server.proc.returncode == 0, server.said()[-3000:]  # Ctrl-C: a clean shutdown


@pytest.mark.slow
def test_demo_serves_its_page_and_a_frame_over_its_socket(tmp_path):
    port = free_port()
    argv = [*IPA_RT, "demo", "--example", "--port", str(port)]
    with running(argv, tmp_path, user_env(tmp_path / "cache"), f"http://127.0.0.1:{port}", port) as server:
        got = ask(sys.executable, DEMO_CLIENT, server)
        bound = listening_on(port)
    assert bound == {"127.0.0.1"}, bound  # no --host: this machine only (the page has no login)
    assert "reachable from other machines" not in server.said()
    assert got["page_has_scale_slider"], got
    hello, (first, moved) = got["hello"], got["frames"]
    assert hello["scales"] and hello["runtime"] in server.said()  # the adapter's slider, and the backend it names
    height, width = hello["size"]
    for frame in (first, moved):
        assert frame["format"] == "JPEG" and frame["size"] == [width, height] and frame["latency_ms"] > 0, frame
        assert any(lo < hi for lo, hi in frame["extrema"]), frame
    assert moved["params"]["scales"] == got["moved"] and moved["id"] > first["id"]
