"""Scheduler selection by name: one table, built from the base model's own scheduler config like diffusers."""

from __future__ import annotations

from typing import Any

import diffusers

from ..console import hushed
from ..errors import ConfigError

# name (case-insensitive) -> (diffusers class, config overrides)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "lcm": ("LCMScheduler", {}),
}


def make_scheduler(name_or_scheduler: Any, base_scheduler: Any) -> Any:
    """A scheduler from a short name, a diffusers class name, or an instance (returned as is)."""
    if not isinstance(name_or_scheduler, str):
        if hasattr(name_or_scheduler, "set_timesteps") and hasattr(name_or_scheduler, "step"):
            return name_or_scheduler
        raise ConfigError(f"scheduler is a {type(name_or_scheduler).__name__}; expected a name or a scheduler")
    key = name_or_scheduler.lower()
    if key in SCHEDULERS:
        cls_name, overrides = SCHEDULERS[key]
    elif name_or_scheduler.endswith("Scheduler") and hasattr(diffusers, name_or_scheduler):
        cls_name, overrides = name_or_scheduler, {}
    else:
        raise ConfigError(
            f"scheduler {name_or_scheduler!r} is unknown; expected one of {sorted(SCHEDULERS)} or a diffusers "
            "scheduler class name such as 'DDIMScheduler'"
        )
    with hushed("diffusers"):  # its note on the other scheduler's config keys it ignores is not the user's to act on
        return getattr(diffusers, cls_name).from_config(base_scheduler.config, **overrides)
