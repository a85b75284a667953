"""``ipa_rt doctor``: every check named in its JSON, CUDA rows skipped with their reason off a GPU, a real failure
turns the exit status non-zero."""

from __future__ import annotations

import json

import pytest
import torch

from ipa_rt import cli
from ipa_rt.kernels import fused_available

CHECKS = {
    "environment",
    "attention_vs_diffusers",
    "graph_vs_eager",
    "graphed_vae_decoder",
    "graphed_image_encoder",
    "engine_vs_torch",
}


def run(tmp_path, *argv):
    out = tmp_path / "doctor.json"
    code = cli.main(["doctor", *argv, "-o", str(out)])
    return code, json.loads(out.read_text())


def test_doctor_example_names_every_check(tmp_path, capsys):
    code, report = run(tmp_path, "--example", "--device", "cpu")
    rows = {r["name"]: r for r in report["checks"]}
    assert CHECKS <= set(rows) and code == 0 and report["ok"] and not report["failed"]
    assert rows["attention_vs_diffusers"]["status"] == "ok"
    assert rows["attention_vs_diffusers"]["max_error"] <= rows["attention_vs_diffusers"]["tolerance"]
    kernel_rows = [r for n, r in rows.items() if n.startswith("kernel_vs_reference[")]
    if fused_available(torch.device("cpu"), torch.float32, 64) is None:  # the interpreter: one row per shape
        assert kernel_rows and all(r["status"] == "ok" and r["max_error"] <= r["tolerance"] for r in kernel_rows)
    else:  # e.g. a CUDA box, whose test session leaves the interpreter off: skipped, with the reason
        assert (
            rows["kernel_vs_reference"]["status"] == "skipped"
            and "TRITON_INTERPRET" in rows["kernel_vs_reference"]["detail"]
        )
    for name in ("graph_vs_eager", "graphed_vae_decoder", "graphed_image_encoder"):
        assert rows[name]["status"] == "skipped" and "CUDA" in rows[name]["detail"]
    assert rows["engine_vs_torch"]["status"] == "skipped" and "--engine" in rows["engine_vs_torch"]["detail"]
    printed = capsys.readouterr().out
    assert "| attention_vs_diffusers | ok |" in printed and "all checks passed" in printed


def test_doctor_fails_when_a_result_is_wrong(tmp_path, monkeypatch):
    """A wrong attention result (forced: the SDPA path made to drift) is a failed check and exit status 1."""
    import ipa_rt.adapters.attention as attention

    real = attention.decoupled_attention_reference
    monkeypatch.setattr(attention, "decoupled_attention_reference", lambda *a, **k: real(*a, **k) * 1.01)
    monkeypatch.setenv("IPA_RT_DISABLE_TRITON", "1")
    code, report = run(tmp_path, "--example", "--device", "cpu")
    assert code == 1 and report["failed"] == ["attention_vs_diffusers"]
    (row,) = [r for r in report["checks"] if r["name"] == "attention_vs_diffusers"]
    assert row["status"] == "fail" and row["max_error"] > row["tolerance"]


def test_doctor_needs_something_to_check(tmp_path, models, capsys):
    with pytest.raises(SystemExit, match="give BASE --ip-adapter FILE, --engine DIR or --example"):
        cli.main(["doctor", "-o", str(tmp_path / "x.json")])
    assert cli.main(["doctor", str(models.base("sd15")), "-o", str(tmp_path / "x.json")]) == 2
    assert "needs --ip-adapter FILE" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
