"""Tier 3: the command line, end to end on the tiny fixtures."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ipa_rt.cli import main


def test_help_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "ipa_rt", "generate", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "--ip-adapter" in out.stdout and "--example" in out.stdout


def test_generate_example_offline(tmp_path, capsys):
    """The example runs on PyTorch by default (a first image in seconds); an engine backend builds its engines once
    into the cache, and the fast decoder works through it; the command says what runs."""
    target = tmp_path / "out.png"
    cpu = ["--device", "cpu"]  # OpenVINO runs on the CPU, and so does this test on a CUDA machine
    assert main(["generate", "--example", *cpu, "-o", str(target)]) == 0
    assert "backend torch, precision float32, decoder AutoencoderKL" in capsys.readouterr().out
    assert main(["generate", "--example", *cpu, "--backend", "openvino", "--vae", "taesd", "-o", str(target)]) == 0
    image = np.asarray(Image.open(target))
    assert image.shape == (32, 32, 3)
    assert image.std() > 0  # a real decode, not a blank file
    out = capsys.readouterr().out
    assert "backend openvino, precision fp32, decoder AutoencoderTiny" in out and "wrote" in out


@pytest.mark.slow
def test_example_console_is_quiet(tmp_path):
    """What a newcomer sees, line by line: ipa_rt's own lines and the denoising bar, no third-party chatter
    (torchvision fallbacks, transformers' bars for the files the example writes); -v brings it back."""
    env = dict(os.environ, IPA_RT_CACHE=str(tmp_path / "cache"))
    env.pop("IPA_RT_VERBOSE", None)
    cmd = [sys.executable, "-m", "ipa_rt", "generate", "--example", "-o", str(tmp_path / "a.png")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [part for line in (out.stdout + out.stderr).splitlines() for part in line.split("\r") if part.strip()]
    assert lines and all(line.startswith(("ipa_rt", "denoising", "wrote")) for line in lines), lines
    loud = subprocess.run([*cmd, "-v"], capture_output=True, text=True, env=env, timeout=300)
    assert loud.returncode == 0 and "Writing model shards" in loud.stderr  # transformers' bars, when asked for


def test_generate_two_adapters(models, images, tmp_path):
    refs = []
    for i, im in enumerate(images[:2]):
        refs.append(tmp_path / f"ref{i}.png")
        im.save(refs[-1])
    target = tmp_path / "two.png"
    argv = ["generate", str(models.base("sd15")), "--ip-adapter", str(models.adapter("sd15", "base"))]
    argv += [
        "--ip-adapter",
        str(models.adapter("sd15", "plus")),
        "--ip-image",
        str(refs[0]),
        "--ip-image",
        str(refs[1]),
    ]
    argv += ["--scale", "0.5", "--scale", "0.9", "--prompt", "a cat", "--steps", "2", "--seed", "3"]
    argv += ["--height", "32", "--width", "32", "--scheduler", "ddim", "--backend", "torch", "-o", str(target)]
    assert main(argv) == 0
    first = np.asarray(Image.open(target))
    assert main(argv) == 0  # same seed, same bytes
    assert np.array_equal(first, np.asarray(Image.open(target)))


def test_generate_bad_input_exits_2_and_writes_nothing(models, tmp_path, capsys):
    target = tmp_path / "never.png"
    argv = ["generate", str(models.base("sd15")), "--ip-adapter", str(tmp_path / "missing.bin"), "-o", str(target)]
    assert main(argv) == 2
    assert "missing.bin" in capsys.readouterr().err
    assert not target.exists()
    argv = ["generate", str(models.base("sd15")), "--backend", "torch", "--precision", "bf16", "-o", str(target)]
    assert main(argv) == 2
    assert "--precision bf16 applies to --backend openvino" in capsys.readouterr().err
    assert not target.exists()
