"""The static denoising loop: preallocated buffers, one step as tensor math, CUDA graphs on CUDA.

Everything a step reads lives in a :class:`StaticState` whose tensors keep their storage for a :class:`Signature`
(the image keys/values and scales in the shared :class:`ImageContext`); one step, the step counter's increment
included, is captured once per signature and replayed, and live controls are in-place writes, so they never
recapture. Per-step tables hold a step capacity (a power of two, at least :data:`MIN_CAPACITY`), so a new step count
or strength replays the same graph; the states live in a :class:`~ipa_rt.runtime.graphs.GraphCache` bounded by
:data:`MAX_STATES` (docs/design.md, "The static loop and CUDA graphs").
"""

from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from .graphs import GraphCache, GraphPool, copy_into, graphs_on, static_copy
from .image_state import ImageContext
from .sampling import EagerPlan, Plan

MIN_CAPACITY = 64  # step tables hold at least this many steps: every usual step count shares one graph
MAX_STATES = 8  # signatures (buffer sets and graphs) a loop keeps before dropping the least recently used


def static_call(fn):
    """A pipeline entry point: no autograd, and never inference mode, even when the caller is in it. The buffers a
    call allocates (loop state, image keys/values, caches) are rewritten in place by later calls, which PyTorch
    refuses for tensors made under ``torch.inference_mode()`` once outside it."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False), torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


def step_capacity(steps: int) -> int:
    """Rows of the per-step tables for ``steps`` steps: a power of two, at least :data:`MIN_CAPACITY`."""
    return max(MIN_CAPACITY, 1 << max(0, steps - 1).bit_length())


@dataclass(frozen=True)
class Signature:
    """What a captured graph depends on: shapes and structure, never values (nor the step count: tables are
    sized to a capacity)."""

    latents: tuple[int, ...]
    text: tuple[int, ...]
    capacity: int  # rows of the per-step tables (step_capacity)
    kind: str  # scheduler program, prediction type and clipping: they shape the captured step
    cfg: bool
    tokens: tuple[int, ...]  # image tokens per segment (empty: no image prompt)
    masked: bool
    inpaint: int  # 0: none, 4: blend after each step, 9: extra UNet input channels
    noise: bool
    added: tuple[tuple[str, tuple[int, ...]], ...]
    timestep_cond: bool
    per_row: bool = False  # each row its own guidance and adapter scales (a batched call of several requests)
    control: tuple = ()  # ControlNet count, guess mode and control image shapes (empty: none)
    t2i: tuple = ()  # T2I-Adapter feature shapes (empty: none)

    @classmethod
    def of(cls, inp: StepInputs, ctx: ImageContext | None, unet_in: int, control, t2i) -> Signature:
        """The signature of a request's inputs as the loop runs them (image segments from the context)."""
        tokens = tuple(e - s for s, e in ctx.segments) if ctx is not None and ctx.kv is not None else ()
        keep_control = control is not None and inp.control_keep is not None
        return cls(
            latents=tuple(inp.latents.shape),
            text=tuple(inp.text.shape),
            capacity=step_capacity(inp.plan.steps),
            kind=f"{inp.plan.kind}:{getattr(inp.plan, 'prediction', '')}:{getattr(inp.plan, 'clip', None)}",
            cfg=inp.cfg,
            tokens=tokens,
            masked=ctx is not None and bool(ctx.masks),
            inpaint=0 if inp.inpaint_mask is None else (9 if unet_in == 9 else 4),
            noise=inp.noise is not None,
            added=tuple(sorted((k, tuple(v.shape)) for k, v in inp.added.items())),
            timestep_cond=inp.timestep_cond is not None,
            per_row=isinstance(inp.guidance, Tensor) or (ctx is not None and ctx.scale.ndim == 3),
            control=(control.guess_mode, *(tuple(x.shape) for x in control.images)) if keep_control else (),
            t2i=tuple(tuple(f.shape) for fs in t2i.features for f in fs) if inp.t2i_keep is not None else (),
        )


@dataclass
class StepInputs:
    """One request's tensors, copied into the static buffers before the loop."""

    plan: Plan | EagerPlan
    latents: Tensor  # initial latents, already scaled / noised for the mode
    text: Tensor
    added: dict[str, Tensor]
    timestep_cond: Tensor | None
    guidance: float | Tensor  # one number, or one per latent row (a batched call of several requests)
    cfg: bool
    noise: Tensor | None  # [S, *latents] noise each step draws (rows of steps that draw none are zeros)
    gate: Tensor  # [A, S] per-step adapter on/off (step ranges); [0, S] without adapters
    inpaint_mask: Tensor | None = None  # [B, 1, h, w] latent-resolution mask (1 = repaint)
    inpaint_latents: Tensor | None = None  # 9-ch: masked-image latents; 4-ch: clean image latents
    blend: Tensor | None = None  # 4-ch: [S, 2] add_noise coefficients for the image latents at t_{i+1}
    blend_noise: Tensor | None = None  # 4-ch: the initial noise add_noise mixes in
    control_keep: Tensor | None = None  # [C, S] ControlNet keep gate (control_guidance_start/end)
    t2i_keep: Tensor | None = None  # [S] T2I-Adapter gate (adapter_conditioning_factor)


# the step axis of each per-step table (sized to the capacity); the other request tensors keep their shape
_STEP_AXIS = {
    "noise": 0,
    "gate": 1,
    "timesteps": 0,
    "coef": 0,
    "in_scale": 0,
    "control_keep": 1,
    "t2i_keep": 0,
    "blend": 0,
}


def _request_tensors(inp: StepInputs) -> dict[str, Any]:
    """Every per-request tensor by its :class:`StaticState` field (None: this signature has no such buffer)."""
    plan = inp.plan
    return {
        "latents": inp.latents,
        "text": inp.text,
        "added": inp.added,
        "guidance": guidance_tensor(inp.guidance, inp.latents),
        "timestep_cond": inp.timestep_cond,
        "noise": inp.noise,
        "gate": inp.gate,
        "timesteps": plan.timesteps,
        "coef": plan.coef,
        "in_scale": plan.in_scale,
        "control_keep": inp.control_keep,
        "t2i_keep": inp.t2i_keep,
        "mask": inp.inpaint_mask,
        "inpaint_latents": inp.inpaint_latents,
        "blend": inp.blend,
        "blend_noise": inp.blend_noise,
    }


@dataclass
class StaticState:
    """The buffers of one signature (and its CUDA graph, once captured)."""

    sig: Signature
    idx: Tensor
    latents: Tensor
    prev_x0: Tensor
    text: Tensor
    added: dict[str, Tensor]
    timestep_cond: Tensor | None
    guidance: Tensor
    noise: Tensor | None
    gate: Tensor
    timesteps: Tensor
    coef: Tensor
    in_scale: Tensor | None
    mask: Tensor | None = None
    inpaint_latents: Tensor | None = None
    blend: Tensor | None = None
    blend_noise: Tensor | None = None
    control_keep: Tensor | None = None
    t2i_keep: Tensor | None = None
    graph: Any = None
    eager: bool = False  # the capture failed: this signature runs eagerly
    steps: int = 0  # steps of the request the buffers hold now (<= sig.capacity)
    plan: Plan | None = None  # the request's plan (its update rule shapes the step)

    def tensors(self) -> list[Tensor]:
        """Every static buffer of this state (what a captured step may read or write)."""
        out = [getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)]
        return out + list(self.added.values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def guidance_tensor(guidance: float | Tensor, latents: Tensor) -> Tensor:
    """The guidance scale as a tensor: 0-dim for one number (as diffusers multiplies by a float), ``[B, 1, ...]``
    broadcasting over ``latents`` for one value per row."""
    if not isinstance(guidance, Tensor):
        return torch.tensor(float(guidance), dtype=torch.float32, device=latents.device)
    g = guidance.to(device=latents.device, dtype=torch.float32)
    return g.reshape(-1, *[1] * (latents.ndim - 1)).expand(latents.shape[0], *[1] * (latents.ndim - 1))


def _buffer_for(name: str, value: Any, capacity: int) -> Any:
    """The static buffer of one request value: its copy, a step table with ``capacity`` rows on its step axis."""
    if name not in _STEP_AXIS or value is None:
        return static_copy(value)
    shape = list(value.shape)
    shape[_STEP_AXIS[name]] = capacity
    return torch.zeros(shape, dtype=value.dtype, device=value.device)


class DenoiseLoop:
    """Runs the denoising loop from static buffers; captures and replays CUDA graphs per signature."""

    def __init__(
        self,
        unet: torch.nn.Module,
        context: ImageContext | None,
        use_graphs: bool | None = None,
        control=None,
        t2i=None,
        pool: GraphPool | None = None,
    ) -> None:
        self.unet = unet
        self.context = context
        self.control = control  # a ControlStack (ControlNets run inside the step), or None
        self.t2i = t2i  # a T2IStack (weighted features summed inside the step), or None
        self.use_graphs = use_graphs
        self.states = GraphCache(MAX_STATES, pool)  # per Signature, least recently used first; its graph pool

    @property
    def captures(self) -> int:
        """Graph captures so far, for tests and the benchmark's "no recapture" check."""
        return self.states.captures

    # --- buffers ------------------------------------------------------------------------------------------------
    def _state(self, inp: StepInputs) -> StaticState:
        sig = Signature.of(inp, self.context, self.unet.config.in_channels, self.control, self.t2i)
        values = _request_tensors(inp)

        def make() -> StaticState:
            idx = torch.zeros(1, dtype=torch.long, device=inp.latents.device)
            buffers = {k: _buffer_for(k, v, sig.capacity) for k, v in values.items()}
            return StaticState(sig=sig, idx=idx, prev_x0=torch.zeros_like(inp.latents), **buffers)

        st = self.states.lookup(sig, make)
        # one request's values into the static storage (in place: the graph keeps reading the same memory)
        st.idx.zero_()
        st.prev_x0.zero_()
        for k, v in values.items():
            if v is not None:
                copy_into(getattr(st, k), v)
        st.steps, st.plan = inp.plan.steps, inp.plan
        return st

    # --- one step -------------------------------------------------------------------------------------------------
    def _guided(self, model_in, t, src: StaticState | StepInputs, cfg: bool, guidance, step: Tensor, channels=()):
        """ControlNets and T2I-Adapters (if any) and the UNet on the (CFG) batch, then classifier-free guidance
        as diffusers combines it. ``src``: the text conditions and control gates (static buffers or a request's);
        ``channels``: a 9-channel inpainting UNet's mask and masked-image latents (ControlNets see 4 channels)."""
        extra = {}
        if src.control_keep is not None:
            extra = self.control.residuals(model_in, t, src.text, src.added, src.control_keep, step, cfg)
        if src.t2i_keep is not None:
            extra["down_intrablock_additional_residuals"] = self.t2i.residuals(src.t2i_keep, step)
        out = self.unet(
            torch.cat([model_in, *channels], dim=1) if channels else model_in,
            t,
            encoder_hidden_states=src.text,
            timestep_cond=src.timestep_cond,
            added_cond_kwargs=src.added,
            return_dict=False,
            **extra,
        )[0]
        if not cfg:
            return out
        uncond, cond = out.chunk(2)
        if guidance.ndim:  # one value per row: in the output's dtype, as a 0-dim tensor or a float would act
            guidance = guidance.to(out.dtype)
        return uncond + guidance * (cond - uncond)

    @torch.no_grad()
    def _step(self, st: StaticState) -> None:
        """One denoising step from ``st``'s buffers, written back into them. Under ``no_grad`` whoever calls it: the
        UNet's parameters require grad, and a recorded graph would keep every step's activations alive."""
        plan: Plan = st.plan
        i1 = st.idx
        if self.context is not None:  # per-step adapter gate (step ranges)
            self.context.gate(st.gate.index_select(1, i1))
        x = st.latents
        model_in = torch.cat([x, x]) if st.sig.cfg else x
        if st.in_scale is not None:
            model_in = model_in / st.in_scale.index_select(0, i1)[0]
        t = st.timesteps.index_select(0, i1)
        channels = (st.mask, st.inpaint_latents) if st.sig.inpaint == 9 else ()
        out = self._guided(model_in, t, st, st.sig.cfg, st.guidance, i1, channels)
        noise = st.noise.index_select(0, i1)[0] if st.noise is not None else None
        c = st.coef.index_select(0, i1)[0]
        x_next, x0 = plan.update(c, x, out, noise, st.prev_x0)
        if st.sig.inpaint == 4:  # diffusers' blend: known region re-noised to the next timestep
            b = st.blend.index_select(0, i1)[0]
            proper = b[0] * st.inpaint_latents + b[1] * st.blend_noise
            mask = st.mask[: x.shape[0]]
            x_next = (1 - mask) * proper + mask * x_next
        st.latents.copy_(x_next)
        st.prev_x0.copy_(x0)
        st.idx.add_(1)

    # --- the loop ---------------------------------------------------------------------------------------------------
    def graphs_on(self, device: torch.device) -> bool:
        return graphs_on(self.use_graphs, device.type == "cuda")

    @torch.no_grad()
    def run(self, inp: StepInputs, progress=None, generator=None) -> Tensor:
        if isinstance(inp.plan, EagerPlan):
            return self._run_eager(inp, progress, generator)
        st = self._state(inp)
        if self.graphs_on(st.latents.device) and st.graph is None and not st.eager:
            self._capture(st)
        for _ in range(inp.plan.steps):
            if st.graph is not None:
                st.graph.replay()
            else:
                self._step(st)
            if progress is not None:
                progress.update()
        return st.latents.clone()

    @torch.no_grad()
    def _run_eager(self, inp: StepInputs, progress, generator) -> Tensor:
        """Host-driven loop around diffusers' own ``step`` for schedulers without a tensor program."""
        plan: EagerPlan = inp.plan  # type: ignore[assignment]
        sched = copy.deepcopy(plan.scheduler)
        params = set(inspect.signature(sched.step).parameters)
        extra = {k: v for k, v in (("eta", plan.eta), ("generator", generator)) if k in params}
        ctx = self.context
        x = inp.latents
        guidance = guidance_tensor(inp.guidance, x)
        nine = inp.inpaint_mask is not None and self.unet.config.in_channels == 9
        channels = (inp.inpaint_mask, inp.inpaint_latents) if nine else ()
        for i, t in enumerate(plan.timesteps):
            if ctx is not None:
                ctx.gate(inp.gate[:, i : i + 1])
            model_in = sched.scale_model_input(torch.cat([x, x]) if inp.cfg else x, t)
            step = torch.full((1,), i, dtype=torch.long, device=x.device)
            out = self._guided(model_in, t, inp, inp.cfg, guidance, step, channels)
            x = sched.step(out, t, x, **extra, return_dict=False)[0]
            if inp.blend_noise is not None:  # 4-channel inpainting, as diffusers does it
                proper = inp.inpaint_latents
                if i < plan.steps - 1:
                    proper = sched.add_noise(proper, inp.blend_noise, plan.timesteps[i + 1 : i + 2])
                mask = inp.inpaint_mask[: x.shape[0]]
                x = (1 - mask) * proper + mask * x
            if progress is not None:
                progress.update()
        return x

    def _capture(self, st: StaticState) -> None:
        """Capture one step (after warm-up steps that are undone); if the capture fails, this signature runs
        eagerly from now on, with one warning."""
        saved = (st.latents.clone(), st.prev_x0.clone())

        def restore() -> None:
            st.idx.zero_()
            st.latents.copy_(saved[0])
            st.prev_x0.copy_(saved[1])

        what = f"the denoising step for latents {list(st.sig.latents)}"
        try:
            self.states.capture(st, lambda: self._step(st), st.latents.device, what, reset=restore)
        finally:
            restore()

    def memory_stats(self) -> dict[str, Any]:
        """What the loop holds: signatures, graphs, static buffer bytes, graph pool growth, evictions."""
        graphs, eager = self.states.stats()
        return {
            "signatures": len(self.states),
            "graphs": graphs,
            "eager_signatures": eager,
            "static_buffer_bytes": sum(st.nbytes() for st in self.states.values()),
            "graph_pool_reserved_bytes": self.states.pool.reserved_bytes,
            "captures": self.states.captures,
            "evictions": self.states.evictions,
            "max_signatures": self.states.max_entries,
        }
