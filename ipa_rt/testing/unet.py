"""SD1.5 / SDXL (UNet) checkpoints of :mod:`ipa_rt.testing`: diffusers model folders (with locally generated CLIP
tokenizer files), a ``CLIPVisionModelWithProjection`` folder, and IP-Adapter files of every variant in the h94 layout
as ``.safetensors`` (flat keys) or ``.bin`` (nested dict).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..cache import atomic_path
from ..console import hushed

VARIANT_NAMES = ("base", "plus", "full", "faceid", "faceid_plus")
FACE_ID_DIM = 512  # InsightFace ArcFace embedding size, as the real FaceID checkpoints expect
LORA_RANK = 4

TEXT_CONFIG = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=77,
    projection_dim=32,
    hidden_act="quick_gelu",
)
ENCODER_CONFIG = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=3,
    projection_dim=24,
    image_size=32,
    patch_size=8,  # 16 patches + CLS = 17 tokens (ViT-H/14 at 224 px has 257)
)
VAE_CONFIG = dict(
    block_out_channels=[16, 32],
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)
SD15_UNET = dict(  # SD1.5's block layout (16 cross-attention layers, as the real one), tiny widths
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=2,
    norm_num_groups=8,
)
# `ipa_rt generate --example`: two levels, one layer each (4 cross-attention layers): the dynamo ONNX exporter's
# cost grows with the module count, and this halves the example's engine build (measured 51 s -> 25 s, 2 cores)
EXAMPLE_UNET = dict(
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
SDXL_UNET = dict(  # SDXL's block layout (attention-free first level, 1/1/2 transformers), tiny widths
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids x 8 + text_encoder_2 projection_dim
    cross_attention_dim=64,  # text_encoder (32) + text_encoder_2 (32) hidden sizes
    norm_num_groups=8,
)
SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    clip_sample=False,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    prediction_type="epsilon",
)


def quiet(fn: Callable) -> Callable:
    """The files these helpers write are ipa_rt's: no transformers progress bars or notes about them."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with hushed(bars=True):
            return fn(*args, **kwargs)

    return wrapper


def clean_configs(configs: dict[str, Any] | None) -> dict[str, Any]:
    """Per-component overrides without their ``_comment``-style keys (the benchmarks' config files carry some)."""
    return {
        k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} if isinstance(v, dict) else v
        for k, v in (configs or {}).items()
    }


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte-level BPE alphabet (256 printable stand-ins for the 256 byte values)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))]


_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("o", "r"), ("c", "a"), ("ca", "t</w>")]


def write_tokenizer(folder: str | os.PathLike) -> int:
    """Write a CLIP tokenizer folder (vocab.json, merges.txt, configs) like the hub's; returns vocab size."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in _MERGES] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in _MERGES) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    config = {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True, **special}
    config["pad_token"] = "<|endoftext|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps({**special, "pad_token": "<|endoftext|>"}, indent=2))
    return len(vocab)


def text_config(tokens: int, **overrides: Any):
    from transformers import CLIPTextConfig

    # eos = last id (as in real CLIP, where 49407 is the highest id); bos = the one before it
    ids = dict(bos_token_id=tokens - 2, eos_token_id=tokens - 1, pad_token_id=tokens - 1)
    # an override's vocab_size wins: a file other loaders read (ComfyUI's CLIP) needs CLIP's 49408 token rows
    return CLIPTextConfig(**{"vocab_size": tokens, **TEXT_CONFIG, **ids, **overrides})


@quiet
def write_base_model(
    folder: str | os.PathLike,
    family: str = "sd15",
    seed: int = 0,
    scheduler: str | None = None,
    time_cond_proj_dim: int | None = None,
    feature_extractor: bool | None = None,
    in_channels: int = 4,
    configs: dict[str, dict] | None = None,
) -> Path:
    """A tiny diffusers-format base model folder of ``family`` ``"sd15"`` or ``"sdxl"`` (``in_channels=9``:
    an inpainting model). ``configs`` overrides the tiny architecture per component (``unet``, ``vae``,
    ``text``, ``text_2``, ``image_size``), e.g. with the full-size configs in ``benchmarks/configs``."""
    configs = clean_configs(configs)
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    sdxl = family == "sdxl"
    if family not in ("sd15", "sdxl"):
        raise ValueError(f"family must be 'sd15' or 'sdxl', got {family!r}")
    unet_cfg = {**(SDXL_UNET if sdxl else SD15_UNET), **configs.get("unet", {})}
    if time_cond_proj_dim is not None:
        unet_cfg["time_cond_proj_dim"] = time_cond_proj_dim
    unet_cfg["in_channels"] = in_channels  # 9: an inpainting UNet (latents + mask + masked-image latents)
    UNet2DConditionModel(**unet_cfg).save_pretrained(folder / "unet")
    AutoencoderKL(**{"force_upcast": sdxl, **VAE_CONFIG, **configs.get("vae", {})}).save_pretrained(folder / "vae")
    vocab = write_tokenizer(folder / "tokenizer")
    CLIPTextModel(text_config(vocab, **configs.get("text", {}))).save_pretrained(folder / "text_encoder")
    scheduler = scheduler or ("EulerDiscreteScheduler" if sdxl else "PNDMScheduler")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": scheduler, **SCHEDULER_CONFIG}, indent=2)
    )
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", scheduler],
        "image_encoder": [None, None],
        "feature_extractor": [None, None],
    }
    if sdxl:
        write_tokenizer(folder / "tokenizer_2")
        text_2 = configs.get("text_2", {})
        CLIPTextModelWithProjection(text_config(vocab, **text_2)).save_pretrained(folder / "text_encoder_2")
        index.update(
            text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
            tokenizer_2=["transformers", "CLIPTokenizer"],
            force_zeros_for_empty_prompt=True,
        )
    else:
        index.update(safety_checker=[None, None], requires_safety_checker=False)
    if feature_extractor if feature_extractor is not None else not sdxl:  # SD1.5 repos ship one
        size = configs.get("image_size", ENCODER_CONFIG["image_size"])
        CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
            folder / "feature_extractor"
        )
        index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


@quiet
def write_image_encoder(folder: str | os.PathLike, seed: int = 1, **overrides: Any) -> Path:
    """A tiny ``CLIPVisionModelWithProjection`` folder (the h94 ``image_encoder/`` layout)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    folder = Path(folder)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**{**ENCODER_CONFIG, **overrides})).save_pretrained(folder)
    return folder


class Rand:
    """Seeded random tensors scaled so every layer's output stays O(1)."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)

    # device="cpu" everywhere: the same values under a ``with torch.device("cuda")`` block (the GPU kit's fast init)
    def linear(self, out_f: int, in_f: int) -> torch.Tensor:
        return torch.randn(out_f, in_f, generator=self.g, device="cpu") * in_f**-0.5

    def bias(self, n: int) -> torch.Tensor:
        return torch.randn(n, generator=self.g, device="cpu") * 0.1

    def norm(self, prefix: str, n: int) -> dict[str, torch.Tensor]:
        weight = 1 + 0.1 * torch.randn(n, generator=self.g, device="cpu")
        return {f"{prefix}.weight": weight, f"{prefix}.bias": self.bias(n)}


def resampler_state(r: Rand, width: int, heads: int, depth: int = 4) -> dict[str, torch.Tensor]:
    """Original (tencent) Resampler layers: PerceiverAttention + FeedForward per layer, dim_head 64."""
    inner = 64 * heads
    sd: dict[str, torch.Tensor] = {}
    for i in range(depth):
        p = f"layers.{i}"
        sd |= r.norm(f"{p}.0.norm1", width) | r.norm(f"{p}.0.norm2", width)
        sd[f"{p}.0.to_q.weight"] = r.linear(inner, width)
        sd[f"{p}.0.to_kv.weight"] = r.linear(2 * inner, width)
        sd[f"{p}.0.to_out.weight"] = r.linear(width, inner)
        sd |= r.norm(f"{p}.1.0", width)
        sd[f"{p}.1.1.weight"] = r.linear(4 * width, width)
        sd[f"{p}.1.3.weight"] = r.linear(width, 4 * width)
    return sd


def _image_proj(variant: str, r: Rand, cross: int, enc: dict[str, int]) -> dict[str, torch.Tensor]:
    hidden, embed = enc["hidden_size"], enc["projection_dim"]
    if variant == "base":
        return {"proj.weight": r.linear(4 * cross, embed), "proj.bias": r.bias(4 * cross)} | r.norm("norm", cross)
    if variant == "full":
        return {
            "proj.0.weight": r.linear(hidden, hidden),
            "proj.0.bias": r.bias(hidden),
            "proj.2.weight": r.linear(cross, hidden),
            "proj.2.bias": r.bias(cross),
        } | r.norm("proj.3", cross)
    if variant == "plus":
        width = 64
        sd = {"latents": torch.randn(1, 16, width, generator=r.g, device="cpu") / width**0.5}
        sd |= {"proj_in.weight": r.linear(width, hidden), "proj_in.bias": r.bias(width)}
        sd |= {"proj_out.weight": r.linear(cross, width), "proj_out.bias": r.bias(cross)}
        return sd | r.norm("norm_out", cross) | resampler_state(r, width, heads=1)
    face = {
        "proj.0.weight": r.linear(2 * FACE_ID_DIM, FACE_ID_DIM),
        "proj.0.bias": r.bias(2 * FACE_ID_DIM),
        "proj.2.weight": r.linear(4 * cross, 2 * FACE_ID_DIM),
        "proj.2.bias": r.bias(4 * cross),
    } | r.norm("norm", cross)
    if variant == "faceid":
        return face
    if variant == "faceid_plus":
        pr = {"proj_in.weight": r.linear(cross, hidden), "proj_in.bias": r.bias(cross)}
        pr |= {"proj_out.weight": r.linear(cross, cross), "proj_out.bias": r.bias(cross)}
        pr |= r.norm("norm_out", cross) | resampler_state(r, cross, heads=1)
        return face | {f"perceiver_resampler.{k}": v for k, v in pr.items()}
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANT_NAMES}")


def adapter_state_dict(
    variant: str, base_folder: str | os.PathLike, encoder: dict[str, int] | None = None, seed: int = 2
) -> dict[str, dict[str, torch.Tensor]]:
    """An h94-layout ``{"image_proj": ..., "ip_adapter": ...}`` dict of random weights fitting a base model."""
    from diffusers import UNet2DConditionModel

    enc = {**ENCODER_CONFIG, **(encoder or {})}
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(Path(base_folder) / "unet"))
    cross = unet.config.cross_attention_dim
    r = Rand(seed)
    ip_adapter: dict[str, torch.Tensor] = {}
    for key_id, name in enumerate(unet.attn_processors):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        if not name.endswith("attn1.processor"):  # cross-attention: ids 1, 3, 5, ...
            ip_adapter[f"{key_id}.to_k_ip.weight"] = r.linear(attn.to_k.out_features, cross)
            ip_adapter[f"{key_id}.to_v_ip.weight"] = r.linear(attn.to_v.out_features, cross)
        if variant in ("faceid", "faceid_plus"):  # LoRA on q/k/v/out of every attention layer
            for proj, lin in (
                ("to_q", attn.to_q),
                ("to_k", attn.to_k),
                ("to_v", attn.to_v),
                ("to_out", attn.to_out[0]),
            ):
                ip_adapter[f"{key_id}.{proj}_lora.down.weight"] = r.linear(LORA_RANK, lin.in_features)
                ip_adapter[f"{key_id}.{proj}_lora.up.weight"] = r.linear(lin.out_features, LORA_RANK) * 0.5
    return {"image_proj": _image_proj(variant, r, cross, enc), "ip_adapter": ip_adapter}


def save_adapter(
    state: dict[str, dict[str, torch.Tensor]], path: str | os.PathLike, name: Callable[[str, str], str] | None = None
) -> Path:
    """Write a nested ``{"image_proj": ..., "ip_adapter": ...}`` dict atomically, as ``.bin`` (the nested dict,
    ``torch.save``) or ``.safetensors`` (flat keys: ``name(part, key)``, by default h94's ``<part>.<key>``); every
    family's adapter files are written here."""
    path = Path(path)
    if sorted(state) != ["image_proj", "ip_adapter"]:
        raise ValueError(f"state must hold 'image_proj' and 'ip_adapter', got {sorted(state)}")
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            name = name or (lambda part, key: f"{part}.{key}")
            save_file({name(part, k): v.contiguous() for part, sd in state.items() for k, v in sd.items()}, tmp)
        else:
            torch.save({part: {k: v.contiguous() for k, v in sd.items()} for part, sd in state.items()}, tmp)
    return path


@quiet
def write_adapter(
    path: str | os.PathLike, variant: str, base_folder: str | os.PathLike, seed: int = 2, **encoder: int
) -> Path:
    """Random IP-Adapter of ``variant`` for the base model at ``base_folder``, saved at ``path``."""
    return save_adapter(adapter_state_dict(variant, base_folder, encoder or None, seed), path)


def make_image(seed: int = 0, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A deterministic RGB test image (smooth gradients plus noise, non-square to exercise the crop)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x / w, y / h, (x + y) / (w + h)], axis=-1) * 200
    arr = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


@quiet
def write_example(
    root: str | os.PathLike, family: str = "sd15", variant: str = "base", configs: dict[str, dict] | None = None
) -> dict[str, Path]:
    """Everything the offline example needs: base model, adapter with its image_encoder/, a reference image.
    ``configs`` (see :func:`write_base_model`, plus ``encoder``) makes full-size architectures for benchmarks."""
    root = Path(root)
    configs = clean_configs(configs)
    encoder = configs.get("encoder", {})
    base = write_base_model(root / f"model-{family}", family=family, configs=configs)
    models = root / "IP-Adapter" / "models"
    write_image_encoder(models / "image_encoder", **encoder)
    adapter = write_adapter(models / f"ip-adapter-{variant}_{family}.safetensors", variant, base, **encoder)
    image = root / "reference.png"
    make_image().save(image)
    taesd = write_taesd(root / "taesd", full="vae" in configs)  # full-size with the benchmarks' full configs
    return {"base": base, "adapter": adapter, "image_encoder": models / "image_encoder", "image": image, "taesd": taesd}


@quiet
def write_taesd(folder: str | os.PathLike, full: bool = False, seed: int = 9) -> Path:
    """An ``AutoencoderTiny`` folder (the TAESD format): the real architecture with ``full``, else a tiny one."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    small = dict(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
    )
    AutoencoderTiny(latent_channels=4, **({} if full else small)).save_pretrained(folder)
    return Path(folder)


@quiet
def write_lora(path: str | os.PathLike, base_folder: str | os.PathLike, fmt: str = "diffusers", seed: int = 3) -> Path:
    """A random rank-4 UNet LoRA on q/k/v/out of every attention, as a diffusers or a kohya ``.safetensors``."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(Path(base_folder) / "unet"))
    r = Rand(seed)
    out: dict[str, torch.Tensor] = {}
    for name in unet.attn_processors:
        module = name.removesuffix(".processor")
        attn = unet.get_submodule(module)
        for proj, lin in (("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v), ("to_out.0", attn.to_out[0])):
            down, up = r.linear(LORA_RANK, lin.in_features), r.linear(lin.out_features, LORA_RANK) * 0.3
            if fmt == "diffusers":
                out[f"unet.{module}.{proj}.lora_A.weight"] = down
                out[f"unet.{module}.{proj}.lora_B.weight"] = up
            elif fmt == "kohya":
                key = "lora_unet_" + f"{module}.{proj}".replace(".", "_")
                out[f"{key}.lora_down.weight"] = down
                out[f"{key}.lora_up.weight"] = up
                out[f"{key}.alpha"] = torch.tensor(float(LORA_RANK))
            else:
                raise ValueError(f"fmt must be 'diffusers' or 'kohya', got {fmt!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    return path


@quiet
def write_controlnet(folder: str | os.PathLike, base_folder: str | os.PathLike, seed: int = 5) -> Path:
    """A random ControlNet in diffusers' folder format, built from the base UNet's config (``from_unet``), with
    its zero convolutions made random so its residuals matter; the conditioning embedding downsamples to the
    tiny VAE's latent size."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(base_folder) / "unet")
    vae = json.loads((Path(base_folder) / "vae" / "config.json").read_text())
    channels = (16, 32, 64, 128)[: len(vae["block_out_channels"])]  # one stride-2 conv per VAE downsampling
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.05)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.05)
    net.save_pretrained(folder)
    return Path(folder)


@quiet
def write_t2i_adapter(
    folder: str | os.PathLike,
    base_folder: str | os.PathLike,
    seed: int = 5,
    adapter_type: str | None = None,
    in_channels: int = 3,
) -> Path:
    """A random T2I-Adapter in diffusers' folder format whose features land on the base UNet's residual slots:
    ``full_adapter`` (SD1.5 layout) or ``light_adapter`` for UNets whose first block has cross-attention,
    ``full_adapter_xl`` for SDXL's layout."""
    from diffusers import T2IAdapter

    from ..controls.t2i import unet_slots

    unet = json.loads((Path(base_folder) / "unet" / "config.json").read_text())
    vae = json.loads((Path(base_folder) / "vae" / "config.json").read_text())
    vsf = 2 ** (len(vae["block_out_channels"]) - 1)
    slots = unet_slots(unet, vsf)
    xl = slots[0][1] != vsf  # SDXL: the first block has no cross-attention, its residual lands after downsampling
    kind = adapter_type or ("full_adapter_xl" if xl else "full_adapter")
    chans = [c for c, _ in (slots if xl else slots[:-1])]
    if kind == "light_adapter":
        chans = chans[:-1]
    torch.manual_seed(seed)
    T2IAdapter(
        in_channels=in_channels,
        channels=chans,
        num_res_blocks=1,
        downscale_factor=2 * vsf if xl else vsf,
        adapter_type=kind,
    ).save_pretrained(folder)
    return Path(folder)


@quiet
def write_motion_adapter(
    folder: str | os.PathLike, base_folder: str | os.PathLike, seed: int = 7, max_frames: int = 32, heads: int = 2
) -> Path:
    """A random AnimateDiff ``MotionAdapter`` in diffusers' folder format for the base model's UNet layout (its
    block widths and layers per block; ``heads=8`` on a full-size base: AnimateDiff v1.5's architecture), with the
    temporal output projections made random: diffusers starts them at zero, and a motion module that adds nothing
    would test nothing."""
    from diffusers import MotionAdapter

    unet = json.loads((Path(base_folder) / "unet" / "config.json").read_text())
    torch.manual_seed(seed)
    adapter = MotionAdapter(
        block_out_channels=tuple(unet["block_out_channels"]),
        motion_layers_per_block=unet["layers_per_block"],
        motion_num_attention_heads=heads,
        motion_norm_num_groups=unet.get("norm_num_groups", 32),
        motion_max_seq_length=max_frames,
        use_motion_mid_block=True,
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "proj_out" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    adapter.save_pretrained(folder)
    return Path(folder)
