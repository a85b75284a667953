"""Tiny random Stable Diffusion 3.5 checkpoints and InstantX-style SD3.5 IP-Adapters in the real on-disk formats.

What users download, only smaller: a diffusers ``StableDiffusion3Pipeline`` folder (``stabilityai/stable-diffusion-3.5-
large``'s layout: two CLIP text encoders with projection, a T5 encoder, their tokenizers, an MMDiT transformer with
RMS q/k norms whose last block is context-pre-only, a VAE of SD3's flavour (no quant convs, shift and scale factors; 4
latent channels where SD3 has 16), the flow-matching scheduler with shift 3) with a SigLIP image encoder and its
processor registered as ``image_encoder/`` and ``feature_extractor/`` (the hub's SD3.5 folder has none: users pass
``google/siglip-so400m-patch14-384`` to ``from_pretrained``, which is what diffusers' SD3 ``load_ip_adapter`` needs),
and IP-Adapter files in InstantX/SD3.5-Large-IP-Adapter's key names (its TimeResampler's original names) or diffusers'
converted ones. The tokenizers are generated locally, so nothing touches a model hub.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .flux import component_config, save_with_hub_tokenizers, t5_config, write_t5_tokenizer
from .unet import VAE_CONFIG, Rand, clean_configs, quiet, save_adapter, text_config, write_tokenizer

SD3_LAYOUTS = ("instantx", "diffusers")
SD3_TRANSFORMER = dict(  # SD3.5-Large: 38 blocks, 38 heads x 64, patch 2, qk rms_norm, no dual-attention blocks
    sample_size=16,
    patch_size=2,
    num_layers=2,  # the last one is context-pre-only, as in the real model
    attention_head_dim=8,
    num_attention_heads=4,
    caption_projection_dim=32,  # = heads x head dim, as in the real model (2432)
    joint_attention_dim=64,  # T5's width (4096); the two CLIPs' 32 + 32 are padded to it
    pooled_projection_dim=64,  # the two CLIPs' projection_dim, concatenated (768 + 1280)
    pos_embed_max_size=16,
    qk_norm="rms_norm",
)
SD3_VAE = dict(VAE_CONFIG, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)  # SD3.5-Large's scheduler_config.json
SD3_ENCODER = dict(  # google/siglip-so400m-patch14-384: 1152 wide, 27 layers, 16 heads, 384 px, 14 px patches
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=3,  # the adapter reads the penultimate hidden states
    image_size=32,
    patch_size=8,  # 16 tokens, no CLS (the real one: 729)
)
# InstantX's TimeResampler: 1280 wide, 20 heads of 64, depth 4, 64 queries, 320-d timestep input. diffusers fixes
# dim_head at 64 and depth at 4 when it loads one, so those stay; the rest is tiny.
SD3_RESAMPLER = dict(hidden_dim=64, depth=4, num_queries=16, timestep_in_dim=32)


@quiet
def write_sd3_model(
    folder: str | os.PathLike, seed: int = 0, configs: dict[str, dict] | None = None, image_encoder: bool = True
) -> Path:
    """A tiny diffusers-format ``StableDiffusion3Pipeline`` folder saved by diffusers itself, so ``model_index.json``
    and every component are in the format users load. ``image_encoder`` (default): a SigLIP vision model and processor
    are part of the folder (``image_encoder/``, ``feature_extractor/``); ``False``: registered as ``[null, null]``, as
    on the hub. ``configs`` overrides the tiny architectures per component: ``transformer``, ``vae``, ``text`` (both
    CLIPs), ``t5``, ``encoder`` (SigLIP)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    configs = clean_configs(configs)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    transformer_cfg = {**SD3_TRANSFORMER, **configs.get("transformer", {})}
    vae = AutoencoderKL(**{**SD3_VAE, **configs.get("vae", {})})
    transformer_cfg |= dict(in_channels=vae.config.latent_channels, out_channels=vae.config.latent_channels)
    transformer = SD3Transformer2DModel(**transformer_cfg)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:  # the hub's tokenizer files, loaded as users load them
        tokenizers = {name: Path(scratch) / name for name in ("tokenizer", "tokenizer_2", "tokenizer_3")}
        clip_vocab = write_tokenizer(tokenizers["tokenizer"])
        write_tokenizer(tokenizers["tokenizer_2"])
        t5_vocab = write_t5_tokenizer(tokenizers["tokenizer_3"])
        text = configs.get("text", {})
        clips = [CLIPTextModelWithProjection(text_config(clip_vocab, **text)).eval() for _ in range(2)]
        t5 = T5EncoderModel(t5_config(t5_vocab, transformer_cfg["joint_attention_dim"], **configs.get("t5", {})))
        encoder, processor = _siglip(configs.get("encoder", {})) if image_encoder else (None, None)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
            vae=vae,
            text_encoder=clips[0],
            tokenizer=CLIPTokenizer.from_pretrained(tokenizers["tokenizer"]),
            text_encoder_2=clips[1],
            tokenizer_2=CLIPTokenizer.from_pretrained(tokenizers["tokenizer_2"]),
            text_encoder_3=t5.eval(),
            tokenizer_3=T5TokenizerFast.from_pretrained(tokenizers["tokenizer_3"]),
            image_encoder=encoder,
            feature_extractor=processor,
        )
        save_with_hub_tokenizers(pipe, folder, tokenizers, "tokenizer_3")
    if image_encoder:  # the names users' folders carry (transformers 5 without torchvision saves its Pil fallback's)
        index = json.loads((folder / "model_index.json").read_text())
        index["feature_extractor"] = ["transformers", "SiglipImageProcessor"]
        config = folder / "feature_extractor" / "preprocessor_config.json"
        config.write_text(
            json.dumps({**json.loads(config.read_text()), "image_processor_type": "SiglipImageProcessor"})
        )
        (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder


def _siglip(overrides: dict[str, Any]) -> tuple[Any, Any]:
    """A tiny ``SiglipVisionModel`` and the ``SiglipImageProcessor`` of its size (SigLIP's mean/std 0.5)."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(**{**SD3_ENCODER, **overrides})
    size = config.image_size
    return SiglipVisionModel(config).eval(), SiglipImageProcessor(size={"height": size, "width": size})


@quiet
def write_siglip_encoder(folder: str | os.PathLike, seed: int = 1, **overrides: Any) -> Path:
    """A tiny SigLIP image encoder folder (``SiglipVisionModel`` + ``SiglipImageProcessor``, as
    ``google/siglip-so400m-patch14-384``'s), e.g. one of another width to test mismatches."""
    torch.manual_seed(seed)
    folder = Path(folder)
    encoder, processor = _siglip(overrides)
    encoder.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def sd3_adapter_state_dict(
    base_folder: str | os.PathLike, seed: int = 2, encoder_dim: int | None = None, **resampler: int
) -> dict[str, dict[str, torch.Tensor]]:
    """Random weights of an InstantX-style SD3.5 IP-Adapter fitting the SD3 model at ``base_folder``, as the nested
    ``{"image_proj": ..., "ip_adapter": ...}`` dict in diffusers' converted names: a TimeResampler (``resampler``
    overrides :data:`SD3_RESAMPLER`) from the encoder's width (``encoder_dim``, default: the folder's
    ``image_encoder/`` hidden size) to the transformer's attention width, and per block an AdaLayerNorm of the image
    tokens on the resampler's timestep embedding, bias-free image K/V projections and three RMS norms."""
    cfg = component_config(base_folder, "transformer", "an SD3")
    if encoder_dim is None and (Path(base_folder) / "image_encoder").is_dir():
        encoder_dim = component_config(base_folder, "image_encoder", "an SD3")["hidden_size"]
    encoder_dim = SD3_ENCODER["hidden_size"] if encoder_dim is None else encoder_dim
    res = {**SD3_RESAMPLER, **resampler}
    hidden, t_in, heads = res["hidden_dim"], res["timestep_in_dim"], res["hidden_dim"] // 64
    inner, head_dim = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["attention_head_dim"]
    r = Rand(seed)
    proj = {"latents": torch.randn(1, res["num_queries"], hidden, generator=r.g, device="cpu") / hidden**0.5}
    proj |= {"proj_in.weight": r.linear(hidden, encoder_dim), "proj_in.bias": r.bias(hidden)}
    proj |= {"proj_out.weight": r.linear(inner, hidden), "proj_out.bias": r.bias(inner)} | r.norm("norm_out", inner)
    proj |= {"time_embedding.linear_1.weight": r.linear(hidden, t_in), "time_embedding.linear_1.bias": r.bias(hidden)}
    proj |= {"time_embedding.linear_2.weight": r.linear(hidden, hidden), "time_embedding.linear_2.bias": r.bias(hidden)}
    for i in range(res["depth"]):
        p = f"layers.{i}"
        proj |= r.norm(f"{p}.ln0", hidden) | r.norm(f"{p}.ln1", hidden) | r.norm(f"{p}.adaln_norm", hidden)
        proj[f"{p}.attn.to_q.weight"] = r.linear(64 * heads, hidden)
        proj[f"{p}.attn.to_kv.weight"] = r.linear(2 * 64 * heads, hidden)
        proj[f"{p}.attn.to_out.0.weight"] = r.linear(hidden, 64 * heads)
        proj[f"{p}.ff.net.0.proj.weight"] = r.linear(4 * hidden, hidden)
        proj[f"{p}.ff.net.2.weight"] = r.linear(hidden, 4 * hidden)
        proj[f"{p}.adaln_proj.weight"] = r.linear(4 * hidden, hidden) * 0.3  # AdaLN modulations stay near identity
        proj[f"{p}.adaln_proj.bias"] = r.bias(4 * hidden)
    ip: dict[str, torch.Tensor] = {}
    for i in range(cfg["num_layers"] + len(cfg.get("dual_attention_layers") or ())):  # one per attention processor
        ip[f"{i}.norm_ip.linear.weight"] = r.linear(2 * inner, hidden) * 0.3
        ip[f"{i}.norm_ip.linear.bias"] = r.bias(2 * inner)
        ip[f"{i}.to_k_ip.weight"] = r.linear(inner, inner)
        ip[f"{i}.to_v_ip.weight"] = r.linear(inner, inner)
        for norm in ("norm_q", "norm_k", "norm_ip_k"):
            ip[f"{i}.{norm}.weight"] = 1 + 0.1 * torch.randn(head_dim, generator=r.g, device="cpu")
    return {"image_proj": proj, "ip_adapter": ip}


# diffusers' converted resampler names -> InstantX's original ones (the inverse of SD3Transformer2DLoadersMixin's)
_INSTANTX_NAMES = (
    (".ln0.", ".0.norm1."),
    (".ln1.", ".0.norm2."),
    (".attn.to_q.", ".0.to_q."),
    (".attn.to_kv.", ".0.to_kv."),
    (".attn.to_out.0.", ".0.to_out."),
    (".adaln_norm.", ".1.0."),
    (".ff.net.0.proj.", ".1.1."),
    (".ff.net.2.", ".1.3."),
    (".adaln_proj.", ".2.1."),
)


def _instantx_name(key: str) -> str:
    if key.startswith("layers."):
        for new, old in _INSTANTX_NAMES:
            key = key.replace(new, old)
    return key


def save_sd3_adapter(
    state: dict[str, dict[str, torch.Tensor]], path: str | os.PathLike, layout: str = "instantx"
) -> Path:
    """Write a nested SD3.5 IP-Adapter dict (diffusers' names) atomically, in ``layout``'s names: ``"instantx"`` (the
    TimeResampler's original names, as InstantX/SD3.5-Large-IP-Adapter's ``ip-adapter.bin``) or ``"diffusers"``; as
    ``.bin`` (the nested dict, ``torch.save``) or ``.safetensors`` (flat ``image_proj.*`` / ``ip_adapter.*`` keys)."""
    path = Path(path)
    if layout not in SD3_LAYOUTS:
        raise ValueError(f"layout must be one of {SD3_LAYOUTS}, got {layout!r}")
    if path.suffix not in (".bin", ".safetensors"):
        raise ValueError(f"an SD3.5 IP-Adapter is written as .bin or .safetensors, not {path.name!r}")
    rename = _instantx_name if layout == "instantx" else str
    return save_adapter({"image_proj": {rename(k): v for k, v in state["image_proj"].items()},
                         "ip_adapter": state["ip_adapter"]}, path)  # fmt: skip


@quiet
def write_sd3_adapter(
    path: str | os.PathLike, base_folder: str | os.PathLike, seed: int = 2, layout: str = "instantx"
) -> Path:
    """A random SD3.5 IP-Adapter for the SD3 model at ``base_folder`` saved at ``path`` in ``layout`` (see
    :func:`sd3_adapter_state_dict` and :func:`save_sd3_adapter`)."""
    return save_sd3_adapter(sd3_adapter_state_dict(base_folder, seed), path, layout)
