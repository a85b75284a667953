"""Schedulers compiled into tensor programs: per-step coefficient tables on the device.

``compile_plan`` takes the schedule from the diffusers scheduler itself and precomputes every per-step scalar with
the fp32 operations its ``step`` would run, so a step is pure tensor math indexed by a device step counter (no
host-side ``if`` on runtime values, nothing that freezes under CUDA graphs) with diffusers' numbers. Noise ``step``
draws (Euler ancestral, LCM, DDIM with ``eta > 0``) is drawn before the loop (docs/design.md, "Schedulers as tensor
programs").
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError

# diffusers class name -> plan kind
KINDS = {
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "LCMScheduler": "lcm",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
}
PREDICTIONS = ("epsilon", "v_prediction")


@dataclass
class Plan:
    """One scheduler, one step count, one strength: everything a step needs, as device tensors."""

    kind: str
    timesteps: Tensor  # [S] exactly what diffusers passes to the UNet
    coef: Tensor  # [S, K] fp32 per-step scalars
    in_scale: Tensor | None  # [S] divisor of scale_model_input (Euler family), None = identity
    noise_steps: list[int]  # steps whose update draws generator noise, in draw order
    init_noise_sigma: float
    prediction: str
    clip: float | None  # DDIM/LCM clip_sample range
    scheduler: Any = field(repr=False, default=None)  # the configured diffusers scheduler (add_noise, begin)
    blend: Tensor | None = field(repr=False, default=None)  # inpainting blend table, computed once when needed

    @property
    def steps(self) -> int:
        return self.timesteps.shape[0]

    def to(self, device: torch.device) -> Plan:
        self.timesteps = self.timesteps.to(device)
        self.coef = self.coef.to(device)
        self.in_scale = self.in_scale.to(device) if self.in_scale is not None else None
        return self

    def scale_input(self, x: Tensor, i: Tensor) -> Tensor:
        return x if self.in_scale is None else x / self.in_scale[i]

    def step(self, i: Tensor, x: Tensor, out: Tensor, noise: Tensor | None, prev_x0: Tensor | None) -> tuple:
        """``(x_next, x0)`` for the model output ``out`` at step ``i`` (a 0-dim device tensor)."""
        return self.update(self.coef[i], x, out, noise, prev_x0)

    def update(self, c: Tensor, x: Tensor, out: Tensor, noise: Tensor | None, prev_x0: Tensor | None) -> tuple:
        """``step`` with this step's coefficient row ``c`` already gathered (inside a captured graph)."""
        return _STEPS[self.kind](self, c, x, out, noise, prev_x0)

    @property
    def needs_noise(self) -> bool:
        """Whether the loop needs a noise table (LCM reads one at every step; the last row is zeros)."""
        return bool(self.noise_steps) or self.kind == "lcm"


def _x0_alpha(plan: Plan, sa: Tensor, sb: Tensor, x: Tensor, out: Tensor) -> Tensor:
    if plan.prediction == "epsilon":
        x0 = (x - sb * out) / sa
    else:  # v_prediction
        x0 = sa * x - sb * out
    return x0.clamp(-plan.clip, plan.clip) if plan.clip is not None else x0


def _step_ddim(plan: Plan, c: Tensor, x, out, noise, _prev):
    sa_t, sb_t, sa_prev, direction, std = c[0], c[1], c[2], c[3], c[4]
    x0 = _x0_alpha(plan, sa_t, sb_t, x, out)
    eps = out if plan.prediction == "epsilon" else sa_t * out + sb_t * x
    prev = sa_prev * x0 + direction * eps
    if noise is not None:
        prev = prev + std * noise
    return prev, x0


def _step_euler(plan: Plan, c: Tensor, x, out, noise, _prev):
    sigma, dt, sigma_up = c[0], c[1], c[2]
    sample = x.to(torch.float32)
    if plan.prediction == "epsilon":
        x0 = sample - sigma * out
    else:
        x0 = out * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
    derivative = (sample - x0) / sigma
    prev = sample + derivative * dt
    if noise is not None:  # ancestral
        prev = prev + noise * sigma_up
    return prev.to(out.dtype), x0


def _step_lcm(plan: Plan, c: Tensor, x, out, noise, _prev):
    sa_t, sb_t, c_out, c_skip, sa_prev, sb_prev = (c[k] for k in range(6))
    x0 = _x0_alpha(plan, sa_t, sb_t, x, out)
    denoised = c_out * x0 + c_skip * x
    # last step: sa_prev = 1, sb_prev = 0 and zero noise, so prev == denoised exactly, as diffusers returns
    prev = sa_prev * denoised + sb_prev * noise
    return prev, denoised


def _step_dpmpp_2m(plan: Plan, c: Tensor, x, out, _noise, prev_x0):
    alpha_s, sigma_s, ratio, a, half_a, inv_r0 = (c[k] for k in range(6))
    if plan.prediction == "epsilon":
        x0 = (x - sigma_s * out) / alpha_s
    else:
        x0 = alpha_s * x - sigma_s * out
    sample = x.to(torch.float32)
    d1 = inv_r0 * (x0 - prev_x0)  # first-order steps have inv_r0 = half_a = 0
    prev = ratio * sample - a * x0 - half_a * d1
    return prev.to(out.dtype), x0


_STEPS = {
    "ddim": _step_ddim,
    "euler": _step_euler,
    "euler_a": _step_euler,
    "lcm": _step_lcm,
    "dpmpp_2m": _step_dpmpp_2m,
}


def _check(scheduler: Any) -> str:
    name = type(scheduler).__name__
    if name not in KINDS:
        raise ConfigError(
            f"scheduler {name} has no tensor program; expected one of {sorted(KINDS)} (or run it eagerly)"
        )
    cfg = scheduler.config
    if cfg.get("prediction_type", "epsilon") not in PREDICTIONS:
        raise ConfigError(f"scheduler prediction_type {cfg.prediction_type!r}; expected one of {PREDICTIONS}")
    if cfg.get("thresholding", False):
        raise ConfigError("scheduler thresholding=True (dynamic thresholding) is not supported")
    kind = KINDS[name]
    if kind == "dpmpp_2m" and (
        cfg.algorithm_type != "dpmsolver++" or cfg.solver_order != 2 or cfg.solver_type != "midpoint"
    ):
        raise ConfigError(
            "DPMSolverMultistepScheduler is supported as DPM++ 2M (algorithm_type='dpmsolver++', solver_order=2, "
            f"solver_type='midpoint'); got {cfg.algorithm_type}, order {cfg.solver_order}, {cfg.solver_type}"
        )
    return kind


def retrieve_schedule(scheduler: Any, steps: int, strength: float) -> tuple[Any, int, Tensor]:
    """A configured copy of ``scheduler``, the first step index (img2img ``strength``, diffusers' rule) and the
    timesteps from it on."""
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(steps, device="cpu")
    init = min(int(steps * strength), steps)
    start = max(steps - init, 0) * sched.order
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start)
    timesteps = sched.timesteps[start:]
    if timesteps.shape[0] == 0:
        raise ConfigError(f"strength={strength} with {steps} steps leaves no denoising step; expected more")
    return sched, start, timesteps


@torch.no_grad()
def compile_plan(scheduler: Any, steps: int, strength: float = 1.0, eta: float = 0.0) -> Plan:
    """Precompute the per-step tables of ``scheduler`` for ``steps`` (and img2img ``strength``)."""
    kind = _check(scheduler)
    if kind != "ddim" and eta:
        raise ConfigError(f"eta={eta} applies to DDIM only; the scheduler is {type(scheduler).__name__}")
    sched, start, timesteps = retrieve_schedule(scheduler, steps, strength)
    n = timesteps.shape[0]
    cfg = sched.config
    clip = float(cfg.clip_sample_range) if cfg.get("clip_sample", False) else None
    rows: list[list[Tensor]] = []
    in_scale = None
    noise_steps: list[int] = []
    if kind == "ddim":
        acp = sched.alphas_cumprod
        for j, t in enumerate(timesteps):
            prev_t = t - cfg.num_train_timesteps // sched.num_inference_steps
            a_t = acp[t]
            a_prev = acp[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
            std = eta * sched._get_variance(t, prev_t) ** 0.5
            rows.append([a_t**0.5, (1 - a_t) ** 0.5, a_prev**0.5, (1 - a_prev - std**2) ** 0.5, torch.as_tensor(std)])
            if eta > 0:
                noise_steps.append(j)
    elif kind in ("euler", "euler_a"):
        sigmas = sched.sigmas.to(torch.float32)
        in_scale = torch.stack([(sigmas[start + j] ** 2 + 1) ** 0.5 for j in range(n)])
        for j in range(n):
            s, s_next = sigmas[start + j], sigmas[start + j + 1]
            if kind == "euler":
                rows.append([s, s_next - s * (0.0 + 1), torch.zeros(())])
            else:
                up = (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5
                down = (s_next**2 - up**2) ** 0.5
                rows.append([s, down - s, up])
                noise_steps.append(j)
    elif kind == "lcm":
        acp = sched.alphas_cumprod
        for j, t in enumerate(timesteps):
            last = start + j == len(sched.timesteps) - 1
            prev_t = sched.timesteps[start + j + 1] if not last else t
            a_t = acp[t]
            a_prev = acp[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
            c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
            sa_prev, sb_prev = (torch.ones(()), torch.zeros(())) if last else (a_prev.sqrt(), (1 - a_prev).sqrt())
            rows.append(
                [a_t.sqrt(), (1 - a_t).sqrt(), torch.as_tensor(c_out), torch.as_tensor(c_skip), sa_prev, sb_prev]
            )
            if not last:
                noise_steps.append(j)
    else:  # DPM++ 2M
        sigmas = sched.sigmas
        total = len(sched.timesteps)
        for j in range(n):
            k = start + j
            alpha_s, sigma_s = sched._sigma_to_alpha_sigma_t(sigmas[k])
            alpha_t, sigma_t = sched._sigma_to_alpha_sigma_t(sigmas[k + 1])
            lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
            lambda_s0 = torch.log(alpha_s) - torch.log(sigma_s)
            h = lambda_t - lambda_s0
            a = alpha_t * (torch.exp(-h) - 1.0)
            lower_final = k == total - 1 and (
                cfg.euler_at_final or (cfg.lower_order_final and total < 15) or cfg.final_sigmas_type == "zero"
            )
            if j == 0 or lower_final:  # first order (diffusers: lower_order_nums < 1, or the final step)
                half_a, inv_r0 = torch.zeros(()), torch.zeros(())
            else:
                alpha_s1, sigma_s1 = sched._sigma_to_alpha_sigma_t(sigmas[k - 1])
                lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
                r0 = (lambda_s0 - lambda_s1) / h
                half_a, inv_r0 = 0.5 * a, 1.0 / r0
            rows.append([alpha_s, sigma_s, sigma_t / sigma_s, a, half_a, inv_r0])
    coef = torch.stack([torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(()) for v in r]) for r in rows])
    return Plan(
        kind=kind,
        timesteps=timesteps,
        coef=coef,
        in_scale=in_scale,
        noise_steps=noise_steps,
        init_noise_sigma=float(sched.init_noise_sigma),
        prediction=cfg.get("prediction_type", "epsilon"),
        clip=clip,
        scheduler=sched,
    )


@dataclass
class EagerPlan:
    """A scheduler without a tensor program (PNDM, DDPM, Heun, ...): diffusers' own ``step`` drives an eager
    loop — same numbers, but host-side and never graph-captured."""

    scheduler: Any
    timesteps: Tensor
    eta: float
    kind: str = "eager"
    noise_steps: list[int] = field(default_factory=list)
    needs_noise: bool = False

    @property
    def steps(self) -> int:
        return self.timesteps.shape[0]

    @property
    def init_noise_sigma(self) -> float:
        return float(self.scheduler.init_noise_sigma)

    def to(self, device: torch.device) -> EagerPlan:
        return self


def make_plan(scheduler: Any, steps: int, strength: float = 1.0, eta: float = 0.0) -> Plan | EagerPlan:
    """The tensor program when the scheduler has one, else an eager plan around a configured copy of it."""
    if type(scheduler).__name__ in KINDS:
        return compile_plan(scheduler, steps, strength, eta)
    sched, _, timesteps = retrieve_schedule(scheduler, steps, strength)
    return EagerPlan(sched, timesteps, eta)
