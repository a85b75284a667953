"""Tier 3: the command line, end to end on the tiny fixtures."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image

from ipa_rt.cli import main


def test_help_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "ipa_rt", "generate", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "--ip-adapter" in out.stdout and "--example" in out.stdout


def test_generate_example_offline(tmp_path, capsys):
    """The default backend on a CPU is the fastest installed (OpenVINO here: engines built once into the cache), and
    the fast decoder works through it; the command says what runs."""
    from ipa_rt.cli import default_backend

    target = tmp_path / "out.png"
    assert main(["generate", "--example", "--vae", "taesd", "-o", str(target)]) == 0
    image = np.asarray(Image.open(target))
    assert image.shape == (32, 32, 3)
    assert image.std() > 0  # a real decode, not a blank file
    out = capsys.readouterr().out
    assert f"backend {default_backend('cpu')}, precision fp32, decoder AutoencoderTiny" in out and "wrote" in out


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
