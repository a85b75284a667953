"""Every extra works alone: each one installed into a clean venv of its own (torch and ``ipa_rt[EXTRA]`` from this
checkout, nothing else), its feature's example run as a user types it, and a backend whose package the extra does
not bring answered with one of ipa_rt's errors naming the extra to install, never a traceback.

Minutes per extra (a venv, torch and the extra's packages), so these run where asked: ``IPA_RT_TEST_EXTRAS=1``
(``.ci/run`` sets it for a step of its own after the suite); ``IPA_RT_EXTRAS_VENVS`` keeps the venvs between runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import user_commands
from user_commands import DEMO_CLIENT, SERVE_CLIENT, ask, free_port, running, user_env

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # first, as README says: the CPU wheel, which the range in pyproject.toml then keeps

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("IPA_RT_TEST_EXTRAS") != "1",
        reason="installs each extra into a venv of its own (minutes each): IPA_RT_TEST_EXTRAS=1 runs it (.ci/run does)",
    ),
]


@dataclass(frozen=True)
class Missing:
    """A command the extra cannot run, and the extra its error must name."""

    argv: tuple[str, ...]
    extra: str


@dataclass(frozen=True)
class Extra:
    name: str  # "" for the bare install
    example: tuple[str, ...]  # the feature's own example: `ipa_rt ARGS` (a server: started, then asked)
    missing: tuple[Missing, ...] = ()
    server: str | None = None  # "demo" or "serve": the example keeps running until asked and stopped
    env: tuple[tuple[str, str], ...] = ()  # set for the example


OPENVINO = Missing(("generate", "--example", "--backend", "openvino", "-o", "x.png"), "openvino")
ONNX = Missing(("generate", "--example", "--backend", "onnxruntime", "-o", "x.png"), "onnx")
TENSORRT = Missing(("build", "BASE", "--ip-adapter", "ADAPTER", "--backend", "tensorrt", "-o", "eng"), "tensorrt")
SERVE = Missing(("serve", "--example"), "serve")
DEMO = Missing(("demo", "--example"), "demo")

EXTRAS = [
    Extra("", ("generate", "--example", "-o", "out.png"), (OPENVINO, ONNX, SERVE, DEMO)),
    Extra("openvino", ("generate", "--example", "--backend", "openvino", "-o", "out.png"), (TENSORRT, SERVE)),
    Extra("onnx", ("generate", "--example", "--backend", "onnxruntime", "-o", "out.png"), (OPENVINO, DEMO)),
    Extra("video", ("generate", "--example", "--frames", "4", "-o", "out.mp4"), (ONNX,)),
    # the fused kernel checked against its reference on this CPU, through Triton's interpreter
    Extra("kernels", ("doctor", "--example"), (OPENVINO,), env=(("TRITON_INTERPRET", "1"),)),
    Extra("demo", ("demo", "--example"), (OPENVINO, SERVE), server="demo"),
    Extra("serve", ("serve", "--example", "--num-replicas", "1"), (OPENVINO,), server="serve"),
]


def venv_for(extra: str) -> Path:
    """A venv holding torch and ``ipa_rt[extra]`` only (created once; kept under ``$IPA_RT_EXTRAS_VENVS``)."""
    root = Path(os.environ.get("IPA_RT_EXTRAS_VENVS") or Path(tempfile.gettempdir()) / "ipa_rt-extras")
    venv = root / (extra or "bare")
    python = venv / "bin" / "python"
    marker = venv / "ipa_rt-extra.json"
    spec = f"{ROOT}[{extra}]" if extra else str(ROOT)
    if not marker.exists() or json.loads(marker.read_text()) != {"spec": spec}:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        for args in ([TORCH], ["-e", spec]):
            done = subprocess.run([str(python), "-m", "pip", "install", "-q", *args], capture_output=True, text=True)
            assert done.returncode == 0, f"pip install {' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr}"
        marker.write_text(json.dumps({"spec": spec}))
    return venv


def run(venv: Path, argv: tuple[str, ...], cwd: Path, timeout: float = 600, extra_env: tuple = ()):
    """``ipa_rt ARGS`` from the venv, as its user types it: none of the suite's settings, a cache of its own."""
    env = user_env(cwd / "cache", bin_dir=venv / "bin", clean=True, **dict(extra_env))
    return user_commands.run([str(venv / "bin" / "ipa_rt")], argv, cwd, env, timeout)


def serve_and_ask(venv: Path, extra: Extra, cwd: Path) -> dict:
    """Start the extra's server as a user does, wait for it, ask it once with the venv's Python; stop it."""
    port = free_port()
    argv = [str(venv / "bin" / "ipa_rt"), *extra.example, "--port", str(port)]
    ready = "Ctrl-C stops" if extra.server == "serve" else f"http://127.0.0.1:{port}"
    env = user_env(cwd / "cache", clean=True)
    with running(argv, cwd, env, ready, port) as server:
        if extra.server == "demo":
            return ask(venv / "bin" / "python", DEMO_CLIENT, server)
        body = json.dumps({"prompt": "a cat", "steps": 2, "seed": 1})
        return ask(venv / "bin" / "python", SERVE_CLIENT, server, body)


@pytest.mark.parametrize("extra", EXTRAS, ids=[e.name or "bare" for e in EXTRAS])
def test_extra_alone_runs_its_example_and_names_what_is_missing(extra: Extra, tmp_path):
    venv = venv_for(extra.name)
    if extra.server:
        said = serve_and_ask(venv, extra, tmp_path)
        if extra.server == "demo":  # the page with its slider, and a frame for the moved slider
            assert said["page_has_scale_slider"] and said["frames"][-1]["params"]["scales"] == said["moved"], said
        else:
            assert said["format"] == "PNG" and said["bytes"] > 0, said
    else:
        done = run(venv, extra.example, tmp_path, extra_env=extra.env)
        assert done.returncode == 0, f"ipa_rt {' '.join(extra.example)}:\n{done.stdout}\n{done.stderr}"
        assert "Traceback" not in done.stderr
        out = [a for a in extra.example if a.startswith("out.")]
        assert not out or (tmp_path / out[0]).stat().st_size > 0
        if extra.example[0] == "doctor":  # the kernel's rows ran, and passed
            checks = json.loads((tmp_path / "ipa_rt-doctor.json").read_text())["checks"]
            kernel = [c for c in checks if c["name"].startswith("kernel_vs_reference")]
            assert kernel and all(c["status"] == "ok" for c in kernel), kernel
    files = None
    for missing in extra.missing:
        argv = missing.argv
        if "BASE" in argv:  # a real model for the command to reach the backend's import
            files = files or json.loads(
                subprocess.run(
                    [str(venv / "bin" / "python"), "-c", WRITE_EXAMPLE, str(tmp_path / "model")],
                    capture_output=True, text=True, check=True,
                ).stdout
            )  # fmt: skip
            argv = tuple(files["base"] if a == "BASE" else files["adapter"] if a == "ADAPTER" else a for a in argv)
        done = run(venv, argv, tmp_path, timeout=300)
        said = done.stdout + done.stderr
        assert done.returncode == 2, f"ipa_rt {' '.join(argv)} in the {extra.name or 'bare'} venv:\n{said}"
        assert "Traceback" not in said and f"pip install 'ipa_rt[{missing.extra}]'" in said, said


WRITE_EXAMPLE = """
import json, sys
from ipa_rt.testing import write_example
files = write_example(sys.argv[1])
print(json.dumps({k: str(v) for k, v in files.items()}))
"""
