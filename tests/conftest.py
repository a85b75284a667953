"""Session fixtures: tiny random checkpoints written in the real formats, and diffusers as the oracle."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# pytest-xdist runs the suite in parallel processes (pyproject's addopts): one thread each, so two workers on two
# cores do not oversubscribe them (torch's and the CPU engines' thread pools spin while they wait)
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ.setdefault("IPA_RT_CPU_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the processes tests start (CLI, servers, the GPU kit) too

if not torch.cuda.is_available():  # run Triton kernels on the CPU; must be set before any kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:  # parity on a GPU compares exact fp32 products: no TF32 in matmuls or convolutions
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

from ipa_rt import testing as T

warnings.filterwarnings("ignore")
logging.getLogger("diffusers").setLevel(logging.ERROR)
logging.getLogger("transformers").setLevel(logging.ERROR)
try:
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
except ImportError:  # pragma: no cover
    pass

FAMILIES = ("sd15", "sdxl")
# parametrised per family: SD1.5's case in every run, SDXL's in the whole suite only (the fast tier, -m "not slow",
# runs each path once; tests/test_parity.py's two-adapter test keeps an SDXL case there)
FAMILY_CASES = ("sd15", pytest.param("sdxl", marks=pytest.mark.slow))
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the fused kernel runs (CPU: interpreter)
SIZE = 32  # pixels; latents are 16x16 with the tiny VAE
PARITY_RTOL = 1e-4  # issue requirement: relative L2 error of final latents, fp32 on CPU


@contextlib.contextmanager
def scoped_env(**values: str) -> Iterator[None]:
    """Environment variables set for a block (module fixtures cannot take ``monkeypatch``), restored after."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="session", autouse=True)
def kept_exports(tmp_path_factory) -> Iterator[None]:
    """Every engine build of the suite keeps its ONNX exports in one folder: builds that differ only in backend or
    precision (ONNX Runtime and OpenVINO engines of the same networks) export once. Exports are named by what they
    depend on (ipa_rt.export.export_cache), so sharing them changes no result."""
    base = tmp_path_factory.getbasetemp()
    # xdist: one folder for all workers (the base temp's parent is theirs in common); entries are written atomically
    folder = base.parent / "kept-exports" if os.environ.get("PYTEST_XDIST_WORKER") else base / "kept-exports"
    folder.mkdir(exist_ok=True)
    with scoped_env(IPA_RT_KEEP_EXPORTS="1", IPA_RT_EXPORT_DIR=str(folder)):
        yield


@dataclass
class Models:
    root: Path

    def base(self, family: str) -> Path:
        return self.root / family

    def adapter_dir(self, family: str) -> Path:
        return self.root / f"{family}-adapters"

    def adapter(self, family: str, variant: str, fmt: str = "safetensors", seed: int = 2) -> Path:
        suffix = "" if seed == 2 else f"-s{seed}"
        return self.adapter_dir(family) / f"{variant}{suffix}.{fmt}"


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Models:
    root = tmp_path_factory.mktemp("models")
    m = Models(root)
    for fam in FAMILIES:
        base = T.write_base_model(m.base(fam), family=fam)
        T.write_image_encoder(m.adapter_dir(fam) / "image_encoder")
        for variant in T.VARIANT_NAMES:
            state = T.adapter_state_dict(variant, base)
            for fmt in ("safetensors", "bin"):
                T.save_adapter(state, m.adapter(fam, variant, fmt))
        for variant in ("base", "plus"):
            T.write_adapter(m.adapter(fam, variant, seed=7), variant, base, seed=7)
    T.write_base_model(root / "sd15-lcm", family="sd15", time_cond_proj_dim=32, scheduler="LCMScheduler", seed=3)
    for fam in FAMILIES:
        T.write_base_model(root / f"{fam}-inpaint", family=fam, in_channels=9, seed=4)
    return m


@pytest.fixture(scope="session")
def images():
    return [T.make_image(seed=s) for s in range(3)]


def fixed_latents(batch: int = 1, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(seed))


def face_embeds(seed: int = 5, cfg: bool = True) -> torch.Tensor:
    ids = torch.randn(1, 1, 1, T.FACE_ID_DIM, generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.zeros_like(ids), ids]) if cfg else ids


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error; NaN or inf anywhere is an automatic failure (returns inf)."""
    if not (torch.isfinite(out).all() and torch.isfinite(ref).all()):
        return float("inf")
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def assert_parity(out: torch.Tensor, ref: torch.Tensor, tol: float = PARITY_RTOL) -> None:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    err = rel_l2(out, ref)
    assert err <= tol, f"relative L2 error {err:.3e} > {tol:.0e}"


def diffusers_pipe(models: Models, family: str, weight_names=None, image_encoder_folder="image_encoder", **kw):
    """The oracle: diffusers' own pipeline, loaded from the same files through its public API."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(kw.pop("base", models.base(family)), **kw)
    pipe.set_progress_bar_config(disable=True)
    if weight_names:
        pipe.load_ip_adapter(
            str(models.adapter_dir(family)),
            subfolder="",
            weight_name=list(weight_names),
            image_encoder_folder=image_encoder_folder,
        )
    return pipe


def ipa_pipe(models: Models, family: str, adapters=None, **kw):
    import ipa_rt

    pipe = ipa_rt.Pipeline.from_pretrained(kw.pop("base", models.base(family)), ip_adapter=adapters, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CALL = dict(num_inference_steps=3, height=SIZE, width=SIZE, output_type="latent")


def family_latents(pipe, defaults: dict, **kw) -> torch.Tensor:
    """A family pipeline's (Flux, Kolors, SD3) final latents for one prompt and seed: ``defaults`` (the test
    module's call) overridden by ``kw``; NaN never passes."""
    out = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), **(defaults | kw)).images
    assert torch.isfinite(out).all()
    return out


def assert_same_family_latents(ref, ours, defaults: dict, **kw) -> torch.Tensor:
    """diffusers' ``ref`` and ipa_rt's ``ours`` give bitwise the same latents for one call; returns ours."""
    a, b = family_latents(ref, defaults, **kw), family_latents(ours, defaults, **kw)
    assert torch.equal(a, b), f"max |diff| {(a - b).abs().max().item():.3g}"
    return b


def count_forwards(**modules) -> dict[str, int]:
    """Forward-call counters for the given modules (name=module); the dict updates as they run."""
    counts = dict.fromkeys(modules, 0)
    for name, module in modules.items():
        module.register_forward_hook(lambda *_, name=name: counts.__setitem__(name, counts[name] + 1))
    return counts


# --- batched calls (pipe.batch): row i against request i alone ---------------------------------------------
BATCH_RTOL = 1e-5  # the issue's bound; observed ~1e-6 (batch size changes the CPU convolutions' blocking only)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def alone(pipe, request: dict, **common) -> torch.Tensor:
    """One request through the ordinary call: its scale set on the pipeline, then ``pipe(...)``."""
    request = dict(request)
    pipe.set_ip_adapter_scale(request.pop("ip_adapter_scale", 1.0))
    seed = request.pop("seed")
    return pipe(**request, **common, generator=gen(seed)).images


def assert_rows_equal_alone(pipe, requests: list[dict], **common) -> None:
    batched = pipe.batch([{**{k: v for k, v in r.items() if k != "seed"}, **common, "generator": gen(r["seed"])}
                          for r in requests])  # fmt: skip
    assert len(batched) == len(requests)
    for r, out in zip(requests, batched, strict=True):
        assert_parity(out.images, alone(pipe, r, **common), tol=BATCH_RTOL)


def mixed_requests(images, two_adapters: bool = True) -> list[dict]:
    """Different references and scales side by side, a text-only request, a scale-0 request, a preset."""
    ref = (lambda a, b: [images[a], images[b]]) if two_adapters else (lambda a, b: [images[a]])
    scale = (lambda x, y: [x, y]) if two_adapters else (lambda x, y: x)
    return [
        dict(prompt="a cat", ip_adapter_image=ref(0, 1), ip_adapter_scale=scale(0.8, 0.3), seed=1, guidance_scale=7.5),
        dict(prompt="a dog on a hill", seed=2, guidance_scale=4.0),  # text only, next to image rows
        dict(prompt="a cow", ip_adapter_image=ref(2, 0), ip_adapter_scale=0.0, seed=3, guidance_scale=6.0),
        dict(prompt="", ip_adapter_image=ref(1, 2), ip_adapter_scale="style", seed=4, num_images_per_prompt=2),
    ]
