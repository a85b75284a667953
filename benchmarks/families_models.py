"""The families benchmark's models (``benchmarks/families.py``): each family's architecture at full width and reduced
depth (or tiny, ``--tiny``), random weights written by :mod:`ipa_rt.testing` in the real on-disk formats, and
diffusers' own pipeline with the adapter loaded as diffusers' documentation loads it. :data:`FAMILIES` is the one
table of what differs between the families."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ipa_rt import testing as T

CONFIGS = Path(__file__).resolve().parent / "configs"
VIT_L = dict(  # openai/clip-vit-large-patch14 (XLabs' Flux adapters read its 768-d projection)
    hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24, projection_dim=768,
    image_size=224, patch_size=14,
)  # fmt: skip
VIT_L_336 = dict(VIT_L, image_size=336)  # openai/clip-vit-large-patch14-336: Kolors-IP-Adapter-Plus' encoder
CHATGLM3 = dict(  # THUDM/chatglm3-6b-base's widths (Kolors' text encoder); its depth is --glm-layers (28 there)
    hidden_size=4096, num_attention_heads=32, kv_channels=128, multi_query_group_num=2, ffn_hidden_size=13696,
)  # fmt: skip
SIGLIP_SO400M = dict(  # google/siglip-so400m-patch14-384: the InstantX SD3.5 adapter's image encoder
    hidden_size=1152, intermediate_size=4304, num_attention_heads=16, num_hidden_layers=27, image_size=384,
    patch_size=14,
)  # fmt: skip
SD35_LARGE = dict(  # stabilityai/stable-diffusion-3.5-large transformer/config.json; depth is --blocks (38 there)
    sample_size=128, patch_size=2, attention_head_dim=64, num_attention_heads=38, caption_projection_dim=2432,
    joint_attention_dim=4096, pos_embed_max_size=192, qk_norm="rms_norm",
)  # fmt: skip
INSTANTX_RESAMPLER = dict(hidden_dim=1280, num_queries=64, timestep_in_dim=320)  # InstantX/SD3.5-Large-IP-Adapter


def _store(folder: Path, dtype: torch.dtype) -> None:
    """Rewrite a component's safetensors in ``dtype``, as the hub stores these networks (Kolors-diffusers: fp16,
    SD3.5: bf16); every system loads them in its own dtype (fp32 on the CPU), so the arithmetic is unchanged and
    the files, half the size, leave room on the disk for the engine builds."""
    from safetensors.torch import load_file, save_file

    for path in sorted(folder.glob("*.safetensors")):
        state = load_file(path)
        save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, path, {"format": "pt"})


_FLUX_FILES = {"base": "base", "adapter": "ip_adapter.safetensors", "encoder": "encoder"}


def _cached(root: Path, name: str, write: Callable[[Path, dict], None]) -> dict:
    """``{"base", "adapter", "encoder"}`` paths (``None``: none) under ``root/name``, written once: ``done`` marks a
    whole write and records the paths (empty in folders written before it did: Flux's)."""
    folder = root / name
    done = folder / "done"
    if not done.exists():
        files = {"base": folder / "base", "adapter": None, "encoder": None}
        write(folder, files)
        done.write_text(json.dumps({k: v and str(v.relative_to(folder)) for k, v in files.items()}))
    names = json.loads(done.read_text() or "null") or _FLUX_FILES
    return {k: v and folder / v for k, v in names.items()}


def write_flux(root: Path, double: int, single: int, tiny: bool) -> dict:
    """A FLUX.1-width (or tiny) folder, XLabs adapter and CLIP ViT-L/14 image encoder; written once per size."""

    def write(folder: Path, files: dict) -> None:
        files |= {k: folder / v for k, v in _FLUX_FILES.items()}
        if tiny:
            T.write_flux_model(files["base"])
            T.write_image_encoder(files["encoder"], **T.FLUX_ENCODER)
            T.write_flux_adapter(files["adapter"], files["base"])
            return
        transformer = dict(num_layers=double, num_single_layers=single, attention_head_dim=128, num_attention_heads=24,
                           axes_dims_rope=[16, 56, 56])  # fmt: skip
        vae = dict(latent_channels=16)  # FLUX.1's latent width: the transformer reads 64 channels per token
        T.write_flux_model(files["base"], joint_attention_dim=4096, configs={"transformer": transformer, "vae": vae})
        T.write_image_encoder(files["encoder"], **VIT_L)
        T.write_flux_adapter(files["adapter"], files["base"], encoder_dim=768)

    return _cached(root, "tiny" if tiny else f"flux-w3072-d{double}-s{single}", write)


def _plus_resampler(hidden: int, cross: int, width: int = 1280, heads: int = 20) -> dict[str, torch.Tensor]:
    """The h94 Plus Resampler at SDXL's / Kolors' size (1280 wide, 20 heads, depth 4, 16 queries) in the original
    (tencent) names; ``ipa_rt.testing`` writes a 64-wide one."""
    from ipa_rt.testing.unet import Rand, resampler_state

    r = Rand(3)
    sd = {"latents": torch.randn(1, 16, width, generator=r.g, device="cpu") / width**0.5}
    sd |= {"proj_in.weight": r.linear(width, hidden), "proj_in.bias": r.bias(width)}
    sd |= {"proj_out.weight": r.linear(cross, width), "proj_out.bias": r.bias(cross)}
    return sd | r.norm("norm_out", cross) | resampler_state(r, width, heads)


def write_kolors(root: Path, args: argparse.Namespace) -> dict:
    """Kolors: SDXL's UNet (``--layers``: its transformer depths per level) reading ChatGLM3-width states
    (``--glm-layers`` deep), Kolors-IP-Adapter-Plus on CLIP ViT-L/14-336; or the tiny ones."""
    layers = "-".join(map(str, args.layers))

    def write(folder: Path, files: dict) -> None:
        base, files["encoder"] = files["base"], folder / "image_encoder"
        files["adapter"] = folder / "Kolors-IP-Adapter-Plus" / "ip_adapter_plus_general.safetensors"
        if args.tiny:
            T.write_kolors_model(base)
            T.write_image_encoder(files["encoder"], **T.KOLORS_ENCODER)
            T.write_kolors_adapter(files["adapter"], base)
            return
        unet = {k: v for k, v in json.loads((CONFIGS / "sdxl_unet.json").read_text()).items() if k[0] != "_"}
        unet["transformer_layers_per_block"] = list(args.layers)
        unet["projection_class_embeddings_input_dim"] = 4096 + 6 * unet["addition_time_embed_dim"]  # Kolors' 5632
        vae = json.loads((CONFIGS / "sdxl_vae.json").read_text())  # SDXL's: 8x (not run: latents out)
        text = dict(CHATGLM3, num_layers=args.glm_layers)
        T.write_kolors_model(base, configs={"unet": unet, "vae": vae, "text": text})
        for part in ("unet", "text_encoder"):
            _store(base / part, torch.float16)
        T.write_image_encoder(files["encoder"], **VIT_L_336)
        state = T.kolors_adapter_state_dict(base, encoder=VIT_L_336)
        state["image_proj"] = _plus_resampler(VIT_L_336["hidden_size"], unet["cross_attention_dim"])
        T.save_adapter(state, files["adapter"])

    name = "tiny-kolors" if args.tiny else f"kolors-sdxl-t{layers}-glm{args.glm_layers}"
    return _cached(root, name, write)


def write_sd3(root: Path, args: argparse.Namespace) -> dict:
    """SD3.5-Large's transformer at ``--blocks`` of its 38 joint blocks, tiny CLIPs and T5 (T5's width: 4096) and a
    tiny VAE of 16 latent channels, SigLIP so400m in the folder, the InstantX adapter; or the tiny ones."""

    def write(folder: Path, files: dict) -> None:
        base, files["adapter"] = files["base"], folder / "SD3.5-Large-IP-Adapter" / "ip-adapter.bin"
        if args.tiny:
            T.write_sd3_model(base)
            T.write_sd3_adapter(files["adapter"], base)
            return
        transformer = dict(SD35_LARGE, num_layers=args.blocks)
        configs = {"transformer": transformer, "vae": dict(latent_channels=16), "encoder": SIGLIP_SO400M}
        T.write_sd3_model(base, configs=configs)
        _store(base / "transformer", torch.bfloat16)
        T.save_sd3_adapter(T.sd3_adapter_state_dict(base, **INSTANTX_RESAMPLER), files["adapter"])

    name = "tiny-sd3" if args.tiny else f"sd35-large-b{args.blocks}"
    return _cached(root, name, write)


def diffusers_flux(files: dict, dtype: torch.dtype, device: str) -> Any:
    import diffusers

    pipe = diffusers.FluxPipeline.from_pretrained(str(files["base"]), dtype=dtype).to(device)
    adapter = Path(files["adapter"])
    pipe.load_ip_adapter(str(adapter.parent), weight_name=adapter.name,
                         image_encoder_pretrained_model_name_or_path=str(files["encoder"]),
                         image_encoder_dtype=dtype)  # fmt: skip
    return pipe


def diffusers_kolors(files: dict, dtype: torch.dtype, device: str) -> Any:
    """As Kolors-IP-Adapter-Plus' model card: the image encoder registered, the adapter from its folder."""
    import diffusers
    from transformers import CLIPVisionModelWithProjection

    pipe = diffusers.KolorsPipeline.from_pretrained(str(files["base"]), dtype=dtype).to(device)
    encoder = CLIPVisionModelWithProjection.from_pretrained(str(files["encoder"]), dtype=dtype).to(device).eval()
    pipe.register_modules(image_encoder=encoder)
    adapter = Path(files["adapter"])
    pipe.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name, image_encoder_folder=None)
    return pipe


def diffusers_sd3(files: dict, dtype: torch.dtype, device: str) -> Any:
    """The folder carries SigLIP as ``image_encoder/`` (users pass it to ``from_pretrained``)."""
    import diffusers

    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(str(files["base"]), dtype=dtype).to(device)
    adapter = Path(files["adapter"])
    pipe.load_ip_adapter(str(adapter.parent), weight_name=adapter.name)
    return pipe


@dataclass(frozen=True)
class FamilyBench:
    """What differs between the families: the writer, diffusers' loader (files, dtype, device), the row label
    (``args``, latent side, image tokens), the defaults (size, text tokens), the docstring paragraph that describes
    it (by its first words), the results files' name, the arguments that set its reductions (recorded in the
    results' config), extra call arguments and whether the text length is the family's whatever ``--text`` says."""

    write: Callable[[Path, argparse.Namespace], dict]
    diffusers: Callable[[dict, torch.dtype, str], Any]
    label: Callable[[argparse.Namespace, int, int], str]
    size: int
    text: int
    doc: str
    results: str
    knobs: tuple[str, ...]
    call: dict = field(default_factory=dict)
    fixed_text: bool = False


def _flux_label(a: argparse.Namespace, latent: int, tokens: int) -> str:
    shape = f"{tokens} image + {a.text} text tokens"
    return f"flux tiny, {shape}" if a.tiny else f"FLUX.1 width, {a.double}+{a.single} blocks, {shape}"


def _kolors_label(a: argparse.Namespace, latent: int, tokens: int) -> str:
    shape = f"{a.size}² = {latent}² latents + {a.text} text tokens, CFG"
    if a.tiny:
        return f"kolors tiny, {shape}"
    depths, glm = "/".join(map(str, a.layers)), f"ChatGLM3 width, {a.glm_layers} of 28 layers"
    return f"Kolors (SDXL width, transformer depths {depths} of 1/2/10; {glm}), {shape}"


def _sd3_label(a: argparse.Namespace, latent: int, tokens: int) -> str:
    shape = f"{tokens} image + 77+{a.text} text tokens, CFG"
    return f"sd3 tiny, {shape}" if a.tiny else f"SD3.5-Large width, {a.blocks} of 38 blocks, {shape}"


FAMILIES: dict[str, FamilyBench] = {
    "flux": FamilyBench(lambda root, a: write_flux(root, a.double, a.single, a.tiny), diffusers_flux, _flux_label,
                   size=256, text=128, doc="**Flux.1**", results="families", knobs=("double", "single")),
    "kolors": FamilyBench(write_kolors, diffusers_kolors, _kolors_label, size=512, text=256, doc="**Kolors**",
                     results="families-kolors", knobs=("layers", "glm_layers"), call={"guidance_scale": 5.0},
                     fixed_text=True),  # diffusers' KolorsPipeline pads to 256 (its max_sequence_length is unused)
    "sd3": FamilyBench(write_sd3, diffusers_sd3, _sd3_label, size=224, text=128, doc="**Stable Diffusion 3.5**",
                  results="families-sd3", knobs=("blocks",), call={"guidance_scale": 7.0}),
}  # fmt: skip
