"""``ipa_rt doctor``: what this machine does with ipa_rt's optimisations, checked against their references.

Each check runs one optimisation next to the plain computation it replaces, on the user's own device, dtype and
model: ``attention_vs_diffusers``, ``kernel_vs_reference[d=.., N=..]`` (every distinct attention shape at the default
size; a head dim whose kernel failed its build-time self-test is reported as failed), ``graph_vs_eager``,
``graphed_vae_decoder`` / ``graphed_image_encoder`` and ``engine_vs_torch``. CUDA-only rows are skipped with the
reason; any failure makes the exit status non-zero; the report is a table and JSON, written atomically
(docs/guides/gpu.md, ``ipa_rt doctor``: what each check compares).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

FP32_RTOL = 1e-5  # same computation, other kernels or launch order (graph replay, SDPA backends)
LOW_RTOL = 5e-3  # fp16/bf16: the same computation in low precision
ENGINE_RTOL = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 3e-2}  # whole engine pipelines against the torch backend


@dataclass
class Check:
    name: str
    status: str  # "ok", "fail", "skipped" or "info"
    detail: str = ""
    max_error: float | None = None
    tolerance: float | None = None
    seconds: float | None = None


def rel_l2(out: Tensor, ref: Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    if not (torch.isfinite(out).all() and torch.isfinite(ref).all()):
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def _compare(name: str, out: Tensor, ref: Tensor, tol: float, seconds: float, detail: str = "") -> Check:
    err = rel_l2(out, ref)
    return Check(name, "ok" if err <= tol else "fail", detail or "relative L2", err, tol, round(seconds, 4))


def _guarded(name: str, fn: Callable[[], list[Check]]) -> list[Check]:
    """A check that raises is a failed check, reported with the error: the doctor itself never crashes."""
    try:
        return fn()
    except Exception as exc:
        return [
            Check(name, "fail", f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc) else ''}")
        ]


def environment(device: torch.device) -> Check:
    from . import __version__

    parts = [f"ipa_rt {__version__}", f"torch {torch.__version__}", f"python {platform.python_version()}"]
    for module in ("triton", "onnxruntime", "tensorrt", "diffusers"):
        try:
            parts.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            parts.append(f"{module} not installed")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        memory = f"{props.total_memory / 2**30:.0f} GiB"
        parts.append(f"{props.name} (sm_{props.major}{props.minor}, {memory}), CUDA {torch.version.cuda}")
    else:
        parts.append(f"CPU {platform.machine()}, {torch.get_num_threads()} threads")
    return Check("environment", "info", "; ".join(parts))


# --- checks on a torch pipeline --------------------------------------------------------------------------------
def attention_vs_diffusers(pipe) -> list[Check]:
    """The model's first cross-attention layer: ipa_rt's processor (as the pipeline chose it) against diffusers'."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    stack, unet = pipe.adapters, pipe.unet
    layer, name = 0, stack.layer_names[0]
    attn = unet.get_submodule(name.removesuffix(".processor"))
    g = torch.Generator().manual_seed(0)
    dev, dt = pipe.device, pipe.dtype
    shape = pipe.layer_shapes()[layer]
    x = torch.randn(2, shape.queries, attn.to_q.in_features, generator=g).to(dev, dt)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).to(dev, dt)
    tokens = [torch.randn(2, 1, t, unet.config.cross_attention_dim, generator=g).to(dev, dt) for t in shape.segments]
    scales = [0.7 + 0.2 * a for a in range(len(tokens))]
    ref_proc = IPAdapterAttnProcessor2_0(
        attn.to_q.out_features, unet.config.cross_attention_dim, num_tokens=list(shape.segments), scale=scales
    ).to(dev, dt)
    with torch.no_grad():
        for a in range(len(tokens)):
            ref_proc.to_k_ip[a].weight.copy_(stack.to_k_ip[layer][a].weight)
            ref_proc.to_v_ip[a].weight.copy_(stack.to_v_ip[layer][a].weight)
        ref, t_ref = _timed(lambda: ref_proc(attn, x, encoder_hidden_states=(text, [t[:, 0] for t in tokens])), dev)
        saved = stack.scale.clone()
        try:
            stack.context.set_scale(torch.tensor(scales).view(-1, 1).expand_as(stack.scale))
            stack.prepare(tokens)
            proc = stack.processors[layer]
            out, t_ours = _timed(lambda: proc(attn, x, encoder_hidden_states=text), dev)
        finally:
            stack.context.set_scale(saved)
            stack.prepare(None)
    kind = "fused kernel" if proc.fused else "SDPA"
    tol = FP32_RTOL if dt == torch.float32 else LOW_RTOL
    detail = (
        f"{name} ({kind}, {str(dt).removeprefix('torch.')}): {t_ours * 1e3:.2f} ms vs diffusers {t_ref * 1e3:.2f} ms"
    )
    return [_compare("attention_vs_diffusers", out, ref, tol, t_ours, detail)]


def kernel_checks(pipe) -> list[Check]:
    """The fused kernel at every distinct attention shape of the model, against the reference."""
    from .kernels import decoupled_kernel as k
    from .kernels.select import random_inputs, reference_error

    reason = k.kernel_supports(pipe.device, pipe.dtype, 64)
    if reason is not None:
        return [Check("kernel_vs_reference", "skipped", f"the fused kernel cannot run here: {reason}")]
    rows = [
        Check(f"kernel_self_test[d={d}]", "fail", f"fell back to SDPA at build: {why}")
        for d, why in sorted(pipe.kernel_fallbacks.items())
    ]
    for shape in sorted(set(pipe.layer_shapes()), key=lambda s: (s.head_dim, -s.queries)):
        if shape.head_dim in pipe.kernel_fallbacks:
            continue
        name = f"kernel_vs_reference[d={shape.head_dim}, heads={shape.heads}, N={shape.queries}]"

        def one(shape=shape, name=name) -> list[Check]:
            queries = shape.queries if pipe.device.type == "cuda" else min(shape.queries, 256)  # interpreter: small
            inputs, bounds = random_inputs(shape, 2, pipe.dtype, pipe.device, queries=queries)
            k.launch(*inputs)  # compile / warm up
            out, seconds = _timed(lambda: k.launch(*inputs), pipe.device)
            err, tol = reference_error(out, inputs, bounds)
            detail = (
                f"max abs error, {str(pipe.dtype).removeprefix('torch.')}, {queries} queries, {seconds * 1e6:.0f} µs"
            )
            return [Check(name, "ok" if err <= tol else "fail", detail, err, tol, round(seconds, 6))]

        rows += _guarded(name, one)
    return rows


def _reference_call(pipe, steps: int = 4) -> dict[str, Any]:
    from .testing import make_image

    h, w = pipe.default_size
    vsf = pipe.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, pipe.unet.config.in_channels, h // vsf, w // vsf, generator=g).to(pipe.dtype)
    images = [make_image(seed=a) for a in range(pipe.adapters.num_adapters)] if pipe.adapters is not None else None
    return dict(
        prompt="a photo of a cat",
        ip_adapter_image=images,
        latents=latents,
        num_inference_steps=steps,
        guidance_scale=7.5,
        output_type="latent",
    )


def graph_checks(pipe) -> list[Check]:
    """Graph replay against eager execution: the denoising loop, the VAE decoder, the CLIP image encoder."""
    if pipe.device.type != "cuda":
        names = ("graph_vs_eager", "graphed_vae_decoder", "graphed_image_encoder")
        return [Check(n, "skipped", "CUDA graphs need a CUDA device") for n in names]
    if pipe.backend == "onnxruntime":
        return [Check("graph_vs_eager", "skipped", "ONNX Runtime engines run on their own streams: never captured")]
    from .runtime.sampling import KINDS
    from .runtime.schedulers import make_scheduler

    rows = []
    saved_scheduler = pipe.scheduler
    if type(pipe.scheduler).__name__ not in KINDS:  # eager-only schedulers are never captured: check with DDIM
        pipe.scheduler = make_scheduler("ddim", pipe.scheduler)
    tol = FP32_RTOL if pipe.dtype == torch.float32 else LOW_RTOL
    try:
        call = _reference_call(pipe)
        pipe.loop.use_graphs = None
        graphed, t_graph = _timed(lambda: pipe(**call).images, pipe.device)
        graphed, t_graph = _timed(lambda: pipe(**call).images, pipe.device)  # the second call replays
        captured = sum(s.graph is not None for s in pipe.loop.states.values())
        pipe.loop.use_graphs = False
        eager, t_eager = _timed(lambda: pipe(**call).images, pipe.device)
        detail = f"{call['num_inference_steps']} steps: graphed {t_graph * 1e3:.1f} ms, eager {t_eager * 1e3:.1f} ms"
        row = _compare("graph_vs_eager", graphed, eager, tol, t_graph, detail)
        if not captured:
            row.status, row.detail = "fail", "the step was not captured (capture failed: see the warning) " + detail
        rows.append(row)
    finally:
        pipe.loop.use_graphs = None
        pipe.scheduler = saved_scheduler
    z = torch.randn(1, pipe.vae.config.latent_channels, *(s // pipe.vae_scale_factor for s in pipe.default_size))
    z = z.to(pipe.device, next(pipe.vae.parameters()).dtype)
    pipe.decoder(z)
    out, seconds = _timed(lambda: pipe.decoder(z), pipe.device)
    rows.append(_compare("graphed_vae_decoder", out, pipe.vae.decode(z, return_dict=False)[0], tol, seconds))
    runner = pipe.conditioner.runner
    if runner is None:
        rows.append(Check("graphed_image_encoder", "skipped", "no image encoder is loaded"))
    else:
        size = runner.encoder.config.image_size
        px = torch.randn(1, 3, size, size, device=pipe.device, dtype=next(runner.encoder.parameters()).dtype)
        runner("hidden_states", px)
        out, seconds = _timed(lambda: runner("hidden_states", px), pipe.device)
        want = runner.encoder(px, output_hidden_states=True).hidden_states[-2]
        rows.append(_compare("graphed_image_encoder", out, want, tol, seconds))
    return rows


# --- engines -----------------------------------------------------------------------------------------------------
def _source_folders(manifest: dict) -> dict[str, Any]:
    """The torch backend's arguments, recovered from the files an engine directory was built from."""
    roots: dict[str, Path] = {}
    files: dict[str, Path] = {}
    for role, record in manifest["sources"].items():
        prefix, _, rel = role.partition("/")
        path = Path(record["path"])
        files[prefix] = path
        roots.setdefault(prefix, path.parents[len(Path(rel).parts) - 1])
    missing = [str(files[p]) for p in files if not files[p].exists()]
    if missing:
        raise FileNotFoundError(f"source files of the engines moved or were deleted: {missing[:2]}")
    adapters = sorted(p for p in files if p.startswith("ip_adapter_"))
    return {
        "base": roots["base"],
        "ip_adapter": [files[p] for p in adapters],
        "image_encoder": roots.get("image_encoder"),
        "lora": [files[p] for p in sorted(files) if p.startswith("lora_")] or None,
        "controlnet": [roots[p] for p in sorted(roots) if p.startswith("controlnet_")] or None,
        "t2i_adapter": [roots[p] for p in sorted(roots) if p.startswith("t2i_adapter_")] or None,
    }


def engine_check(folder: Path, device: torch.device) -> list[Check]:
    from .export.build import DTYPES
    from .export.manifest import read_manifest
    from .pipeline import Pipeline

    manifest = read_manifest(folder)
    if manifest.get("controlnets") or manifest.get("t2i_adapters"):
        return [Check("engine_vs_torch", "skipped", "engines with ControlNets or T2I-Adapters need their images")]
    kwargs = _source_folders(manifest)
    engine = Pipeline.from_engine(folder, device=device)
    dtype = DTYPES[manifest["io_dtype"]]
    reference = Pipeline.from_pretrained(kwargs.pop("base"), device=device, dtype=dtype, **kwargs)
    for p in (engine, reference):
        p.set_progress_bar_config(disable=True)
    call = _reference_call(engine, steps=3)
    call["latents"] = call["latents"].to(dtype)
    got, seconds = _timed(lambda: engine(**call).images, device)
    want = reference(**call).images
    detail = f"{manifest['backend']} {manifest['dtype']} engines vs the torch backend, 3 steps with guidance"
    return [_compare("engine_vs_torch", got, want, ENGINE_RTOL[manifest["dtype"]], seconds, detail)]


# --- the report ----------------------------------------------------------------------------------------------
def run(pipe=None, engine: Path | None = None, device: torch.device | str = "cpu") -> list[Check]:
    device = torch.device(device)
    rows = [environment(device)]
    if pipe is not None:
        rows += _guarded("attention_vs_diffusers", lambda: attention_vs_diffusers(pipe))
        rows += _guarded("kernel_vs_reference", lambda: kernel_checks(pipe))
        rows += _guarded("graph_vs_eager", lambda: graph_checks(pipe))
    if engine is not None:
        rows += _guarded("engine_vs_torch", lambda: engine_check(Path(engine), device))
    else:
        rows.append(Check("engine_vs_torch", "skipped", "no engine directory given (--engine DIR)"))
    return rows


def table(rows: list[Check]) -> str:
    lines = ["| check | status | max error | tolerance | seconds | detail |", "|---|---|---|---|---|---|"]
    for r in rows:
        err = "" if r.max_error is None else f"{r.max_error:.2e}"
        tol = "" if r.tolerance is None else f"{r.tolerance:.1e}"
        sec = "" if r.seconds is None else f"{r.seconds:.4f}"
        lines.append(f"| {r.name} | {r.status} | {err} | {tol} | {sec} | {r.detail} |")
    return "\n".join(lines)


def write_report(rows: list[Check], path: Path) -> None:
    from .cache import atomic_write_bytes

    failed = [r.name for r in rows if r.status == "fail"]
    report = {"ok": not failed, "failed": failed, "checks": [asdict(r) for r in rows]}
    atomic_write_bytes(path, json.dumps(report, indent=1).encode())
