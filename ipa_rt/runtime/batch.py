"""Several requests in one UNet batch (``pipe.batch([...])``), each giving what it gives alone.

Per request, everything before the loop runs as for a single call (prompt encoding, image embeddings, initial latents
and the scheduler's noise from its own generator, in diffusers' order); the rows are then laid out in the CFG order
diffusers uses for one call (every request's unconditional rows, then every request's conditional rows) and the loop
runs once, the adapter and guidance scales with a row axis (docs/guides/serving.md, "Batched requests": what requests
share, text-only rows at scale 0).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import ConfigError, ScaleError
from . import request as rq
from .loop import static_call
from .text import PromptEmbeds

# what every request of one batch must share: they shape the loop (the rest is per request)
SHARED = ("num_inference_steps", "height", "width", "strength", "eta", "output_type", "ip_adapter_combine")
UNBATCHED = {  # call arguments a batched request cannot carry yet, and why
    "cross_attention_kwargs": "regional masks (ip_adapter_masks) are per call",
    "mask_image": "inpainting is per call",
    "control_image": "ControlNet inputs are per call",
    "adapter_image": "T2I-Adapter inputs are per call",
}


def _check(pipe, requests: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if getattr(pipe, "video", False):
        raise ConfigError("batch() runs still-image pipelines; call an AnimateDiffPipeline once per clip")
    if pipe.control is not None or pipe.t2i is not None:
        raise ConfigError("batch() does not take pipelines with ControlNets or T2I-Adapters yet; call them per request")
    if isinstance(requests, Mapping) or not isinstance(requests, Sequence) or not requests:
        raise ConfigError(f"batch() takes a non-empty list of requests (dicts of call arguments); got {requests!r}")
    params = inspect.signature(type(pipe).__call__).parameters
    defaults = {k: p.default for k, p in params.items() if k != "self"}  # pipe(...)'s arguments
    first = {**defaults, **requests[0]} if isinstance(requests[0], Mapping) else {}
    out = []
    for i, r in enumerate(requests):
        if not isinstance(r, Mapping):
            raise ConfigError(f"request [{i}] is a {type(r).__name__}; expected a dict of call arguments")
        unknown = sorted(set(r) - set(defaults) - {"ip_adapter_scale"})
        if unknown:
            raise ConfigError(f"request [{i}] has unknown argument(s) {unknown}; expected arguments of pipe(...)")
        for key, why in UNBATCHED.items():
            if r.get(key) is not None:
                raise ConfigError(f"request [{i}] passes {key}, which batch() cannot take ({why}): call it alone")
        args = {**defaults, **r}
        for key in SHARED:
            if args[key] != first[key]:
                raise ConfigError(
                    f"request [{i}] has {key}={args[key]!r} but request [0] has {first[key]!r}"
                    f"; a batch shares {', '.join(SHARED)} (group requests by them)"
                )
        out.append(args)
    return out


def _halves(parts: Sequence[Tensor], cfg: bool) -> Tensor:
    """Per-request CFG batches ``[neg_i; pos_i]`` → ``[neg_0 .. neg_n; pos_0 .. pos_n]`` (without CFG: stacked)."""
    if not cfg:
        return torch.cat(list(parts))
    negatives, positives = zip(*(p.chunk(2) for p in parts), strict=True)
    return torch.cat([*negatives, *positives])


def _merge_conditions(conds: list, reqs: list[rq.Request], cfg: bool) -> tuple | None:
    """One conditioner result for all rows: requests without an image prompt get zero embeddings (their rows have
    scale 0, so the image branch adds exact zeros)."""
    template = next((c for c in conds if c is not None), None)
    if template is None:
        return None
    embeds, clips = [], []
    for a in range(len(template[0])):
        rows_e, rows_c = [], []
        for i, (c, r) in enumerate(zip(conds, reqs, strict=True)):
            rows = r.copies * (2 if cfg else 1)
            e = c[0][a] if c is not None else template[0][a][:1].new_zeros(rows, *template[0][a].shape[1:])
            if e.shape[1:] != template[0][a].shape[1:]:
                raise ConfigError(
                    f"request [{i}] gives IP-Adapter {a} embeddings of shape {list(e.shape[1:])}, another request "
                    f"{list(template[0][a].shape[1:])}: a batch needs the same number of reference images per adapter"
                )
            rows_e.append(e)
            clip = template[1][a]
            if clip is not None:
                rows_c.append(c[1][a] if c is not None else clip[:1].new_zeros(rows, *clip.shape[1:]))
        embeds.append(_halves(rows_e, cfg))
        clips.append(_halves(rows_c, cfg) if rows_c else None)
    return embeds, clips, ("batch", tuple(c[2] if c is not None else None for c in conds))


def _scale_rows(pipe, args: dict[str, Any], has_image: bool, index: int) -> Tensor:
    """``[A, L]`` scales of one request: its ``ip_adapter_scale``, else the pipeline's; zeros without an image."""
    stack = pipe.adapters
    if not has_image:
        return torch.zeros_like(stack.scale)
    if "ip_adapter_scale" not in args:
        if pipe.image_scale is not None:
            raise ScaleError("per-image scales need regional masks, which batch() does not take; set a plain scale")
        return stack.scale
    try:
        table, per_image = pipe.scale_tables(args["ip_adapter_scale"])
    except ScaleError as exc:
        raise ScaleError(f"request [{index}] ip_adapter_scale: {exc}") from None
    if per_image is not None:
        raise ScaleError(f"request [{index}] ip_adapter_scale has per-image lists, which need regional masks")
    return table.to(stack.scale.device)


@static_call
def run_batch(pipe, requests: Sequence[Mapping[str, Any]]) -> list[Any]:
    """``pipe.batch(requests)``'s work: each request's images (or latents), in order."""
    arguments = _check(pipe, requests)
    reqs = [rq.resolve(pipe, rq.Request(**{k: v for k, v in a.items() if k != "ip_adapter_scale"})) for a in arguments]
    for i, r in enumerate(reqs):
        if (r.mode, r.cfg) != (reqs[0].mode, reqs[0].cfg):
            raise ConfigError(
                f"request [{i}] is {r.mode} with guidance {'on' if r.cfg else 'off'}, request [0] {reqs[0].mode} with "
                f"guidance {'on' if reqs[0].cfg else 'off'}; a batch shares both (guidance on: guidance_scale > 1)"
            )
    parts = [rq.request_parts(pipe, r) for r in reqs]
    merged = _merge(pipe, parts)
    inputs = rq.step_inputs(pipe, merged)
    copies = [r.copies for r in reqs]
    generators = [r.generator for r, n in zip(reqs, copies, strict=True) for _ in range(n)]
    eager_generator = generators if all(g is not None for g in generators) else None  # eager schedulers' draws
    steps = merged.plan.steps
    with tqdm(total=steps, **{"desc": f"denoising {len(reqs)} requests", **pipe.progress_bar_config}) as bar:
        if pipe.adapters is None:
            out = pipe.loop.run(inputs, progress=bar, generator=eager_generator)
        else:
            has_image = [p.conditions is not None for p in parts]
            tables = [
                _scale_rows(pipe, a, h, i).expand(n, -1, -1)
                for i, (a, h, n) in enumerate(zip(arguments, has_image, copies, strict=True))
            ]
            table = torch.cat(tables * 2 if merged.req.cfg else tables)  # the CFG halves read the same rows
            with pipe.adapters.context.per_row(table):
                out = pipe.loop.run(inputs, progress=bar, generator=eager_generator)
    output_type = reqs[0].output_type
    images = out if output_type == "latent" else pipe.decode(out, output_type)
    starts = [sum(copies[:i]) for i in range(len(copies))]
    return [images[s : s + n] for s, n in zip(starts, copies, strict=True)]


def _merge(pipe, parts: list[rq.Parts]) -> rq.Parts:
    """The requests' parts as one: rows in the CFG order diffusers uses for one call, guidance one value per row."""
    for i, p in enumerate(parts):
        if (p.setup.height, p.setup.width) != (parts[0].setup.height, parts[0].setup.width):
            raise ConfigError(
                f"request [{i}] makes {p.setup.width}x{p.setup.height} images, request [0] "
                f"{parts[0].setup.width}x{parts[0].setup.height}; pass height= and width= (img2img: images of one size)"
            )
    reqs = [p.req for p in parts]
    cfg, copies = reqs[0].cfg, [r.copies for r in reqs]
    if pipe.engine_manifest is not None:
        rq.check_engine_shapes(pipe.engine_manifest, reqs[0].height, reqs[0].width, sum(copies))
    first = parts[0]
    text = PromptEmbeds(
        _halves([p.text.embeds for p in parts], cfg),
        _halves([p.text.pooled for p in parts], cfg) if first.text.pooled is not None else None,
    )
    latents = torch.cat([p.setup.latents for p in parts])
    guidance = torch.tensor([r.guidance for r, n in zip(reqs, copies, strict=True) for _ in range(n)])
    return rq.Parts(
        req=dataclasses.replace(reqs[0], copies=sum(copies), guidance=guidance),
        text=text,
        conditions=_merge_conditions([p.conditions for p in parts], reqs, cfg) if pipe.adapters else None,
        masks=None,
        plan=first.plan,
        setup=type(first.setup)(latents, first.setup.height, first.setup.width),
        noise=torch.cat([p.noise for p in parts], dim=1) if first.noise is not None else None,
        timestep_cond=torch.cat([p.timestep_cond for p in parts]) if first.timestep_cond is not None else None,
    )
