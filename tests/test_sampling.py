"""Schedulers as tensor programs: every step equals diffusers' own ``step`` (fp32, CPU)."""

from __future__ import annotations

import copy

import diffusers
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

import ipa_rt
from ipa_rt.runtime.sampling import compile_plan
from ipa_rt.testing import SCHEDULER_CONFIG

STEP_RTOL = 1e-5  # issue requirement: relative error per step
CASES = [
    ("DDIMScheduler", {}, 0.0),
    ("DDIMScheduler", {}, 0.7),
    ("DDIMScheduler", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 0.0),
    ("DDIMScheduler", {"clip_sample": True}, 0.0),
    ("EulerDiscreteScheduler", {}, 0.0),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "timestep_spacing": "trailing"}, 0.0),
    ("EulerAncestralDiscreteScheduler", {}, 0.0),
    ("LCMScheduler", {}, 0.0),
    ("DPMSolverMultistepScheduler", {}, 0.0),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, 0.0),
    ("DPMSolverMultistepScheduler", {"prediction_type": "v_prediction"}, 0.0),
]
CONFIG = {k: v for k, v in SCHEDULER_CONFIG.items() if k != "skip_prk_steps"}


@pytest.mark.parametrize(("steps", "strength"), [(4, 1.0), (25, 1.0), (10, 0.6), (3, 0.35)])
@pytest.mark.parametrize(("name", "extra", "eta"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_step_matches_diffusers(name, extra, eta, steps, strength):
    plan = compile_plan(getattr(diffusers, name).from_config({**CONFIG, **extra}), steps, strength, eta=eta)
    ref = copy.deepcopy(plan.scheduler)  # diffusers' scheduler, configured exactly as the plan's
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x_ref, x_ours, prev_x0 = x.clone(), x.clone(), torch.zeros_like(x)
    g_ref, g_ours = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    noises = iter([randn_tensor(x.shape, generator=g_ours, dtype=x.dtype) for _ in plan.noise_steps])
    kw = {"eta": eta} if name == "DDIMScheduler" else {}
    for j, t in enumerate(plan.timesteps):
        i = torch.tensor(j)
        out_ref = torch.tanh(ref.scale_model_input(x_ref, t) * 0.7 + 0.01 * j)  # a stand-in "model"
        out_ours = torch.tanh(plan.scale_input(x_ours, i) * 0.7 + 0.01 * j)
        x_ref = ref.step(out_ref, t, x_ref, generator=g_ref, return_dict=False, **kw)[0]
        noise = next(noises) if j in plan.noise_steps else (torch.zeros_like(x) if plan.kind == "lcm" else None)
        x_ours, prev_x0 = plan.step(i, x_ours, out_ours, noise, prev_x0)
        err = ((x_ours - x_ref).norm() / x_ref.norm()).item()
        assert err <= STEP_RTOL, f"step {j}: relative error {err:.2e}"
    assert torch.isfinite(x_ours).all()


def test_unsupported_scheduler_is_a_clear_error():
    sched = diffusers.PNDMScheduler.from_config(CONFIG)
    with pytest.raises(ipa_rt.ConfigError, match=r"PNDMScheduler has no tensor program"):
        compile_plan(sched, 4)
    with pytest.raises(ipa_rt.ConfigError, match=r"eta=0.5 applies to DDIM only"):
        compile_plan(diffusers.EulerDiscreteScheduler.from_config(CONFIG), 4, eta=0.5)
