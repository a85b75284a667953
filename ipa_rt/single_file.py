"""Single-file checkpoints: an SD1.5 / SDXL model in the original LDM layout and CLIP vision encoders as one file,
loaded offline.

The weights go through diffusers' own single-file code (the UNet and VAE classes' ``from_single_file``,
``single_file_utils.create_diffusers_clip_model_from_ldm``); the configs diffusers would fetch from the hub are the
shipped ones completed from the weights' shapes, or ``config=``'s. SDXL's second tokenizer is the same vocabulary
with ``!`` as padding (docs/getting-started.md, "Single-file checkpoints and encoders": tokenizer sources, UNet-only
files).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, ConfigError

CONFIGS = Path(__file__).parent / "configs"
UNET = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")
CLIP_L = "cond_stage_model.transformer."  # SD1.5's text encoder (transformers' key names)
SDXL_CLIP_L = "conditioner.embedders.0.transformer."
SDXL_BIGG = "conditioner.embedders.1.model."  # OpenCLIP key names
TEXT_ENCODERS = {"sd15": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}  # as models.FAMILIES
# hub repos whose cached CLIP tokenizer files serve (repo, subfolder): CLIP ViT-L/14's vocabulary, which SD1.5 and
# both SDXL tokenizers share
TOKENIZER_REPOS = (
    ("openai/clip-vit-large-patch14", ""),
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
    ("runwayml/stable-diffusion-v1-5", "tokenizer"),
    ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"),
    ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer_2"),
)


def is_single_file(base: Any) -> bool:
    """Whether ``base`` names one weight file (a single-file checkpoint) rather than a folder or hub id."""
    return isinstance(base, (str, os.PathLike)) and os.path.isfile(base)


def read_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file, or a pickled ``.ckpt``/``.pt``/``.bin`` read with ``weights_only=True`` (no code
    runs), unwrapped from its ``state_dict`` keys; a truncated or foreign file is a :class:`CheckpointError`."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip errors differ by format; all mean "not readable"
        raise CheckpointError(
            f"{what} '{path}' cannot be read ({type(exc).__name__}: {exc}); expected a complete .safetensors file "
            "or a .ckpt/.pt of tensors (truncated download?)"
        ) from exc
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{what} '{path}' holds no tensors; expected a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


# --- base models -------------------------------------------------------------------------------------------------
def checkpoint_family(state: dict[str, torch.Tensor], origin: str) -> str:
    """``"sd15"`` or ``"sdxl"`` from the file's key names; anything else is a :class:`CheckpointError` naming it."""
    has = lambda prefix: any(k.startswith(prefix) for k in state)  # noqa: E731
    if has(SDXL_BIGG) and has(SDXL_CLIP_L) and f"{UNET}label_emb.0.0.weight" in state:
        return "sdxl"
    if has(CLIP_L) and f"{UNET}input_blocks.0.0.weight" in state and f"{UNET}label_emb.0.0.weight" not in state:
        return "sd15"
    if is_unet_only(state):
        return _unet_only_family(state, origin)
    if has("cond_stage_model.model."):
        found = "an SD2.x checkpoint (OpenCLIP ViT-H text encoder)"
    elif has("conditioner.embedders.0.model."):
        found = "an SDXL refiner checkpoint (one OpenCLIP text encoder)"
    elif not has(UNET):
        sample = ", ".join(sorted(state)[:3])
        found = f"no Stable Diffusion UNet (no '{UNET}*' keys; first keys: {sample})"
    else:
        found = "a Stable Diffusion UNet without the text encoder(s) of SD1.5 or SDXL"
    raise CheckpointError(
        f"single-file checkpoint '{origin}' is {found}; expected an SD1.5 or SDXL checkpoint in the original "
        "layout (model.diffusion_model.*, first_stage_model.*, cond_stage_model.* / conditioner.embedders.*)"
    )


def is_unet_only(state: dict[str, Any]) -> bool:
    """Whether a checkpoint holds a Stable Diffusion UNet and nothing else (no text encoder, no VAE): what ComfyUI's
    checkpoint saving writes for a MODEL alone, the ``ipa_rt Engine from MODEL`` node's file."""
    if f"{UNET}input_blocks.0.0.weight" not in state:
        return False
    others = ("cond_stage_model.", "conditioner.", *VAE_PREFIXES)
    return not any(k.startswith(others) for k in state)


def _unet_only_family(state: dict[str, Any], origin: str) -> str:
    """SD1.5 or SDXL for a UNet-only file, from the UNet's own keys and shapes: SDXL's has ``label_emb`` (the pooled
    text and size conditions), SD1.5's convolutional ``proj_in`` (SD2.x's are linear, 64-wide heads: refused)."""
    if f"{UNET}label_emb.0.0.weight" in state:
        return "sdxl"
    proj = next((v for k, v in state.items() if k.startswith(UNET) and k.endswith("proj_in.weight")), None)
    if proj is not None and getattr(proj, "ndim", 4) == 2:
        raise CheckpointError(
            f"single-file checkpoint '{origin}' is a UNet with linear attention projections and no `label_emb` "
            "(an SD2.x UNet); expected an SD1.5 or SDXL UNet"
        )
    return "sd15"


def _count(state: dict, pattern: str) -> int:
    """How many distinct indices ``{}`` in ``pattern`` take among the keys (0, 1, ... with no gap)."""
    rx = re.compile(re.escape(pattern).replace(r"\{\}", r"(\d+)"))
    found = {int(m.group(1)) for k in state if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def _heads(width: int, origin: str, what: str) -> int:
    """Attention heads of 64 wide, as SDXL's UNet and both CLIP text encoders have them (SD1.5's UNet: 8 heads at
    every level). Head counts are not in the weights' shapes, hence the rule."""
    if width % 64:
        raise CheckpointError(
            f"single-file checkpoint '{origin}': {what} width {width} is not a multiple of 64, so its attention "
            "heads cannot be inferred; pass config= a diffusers folder with this model's configs"
        )
    return width // 64


def derived_configs(state: dict[str, torch.Tensor], family: str, origin: str) -> dict[str, dict[str, Any]]:
    """The family's shipped configs with every field the weights determine read from their shapes (levels,
    widths, depths, channels, text encoder sizes): full-size fine-tunes, inpainting UNets and tiny test models."""
    cfg = json.loads((CONFIGS / f"{family}.json").read_text())
    unet, u = cfg["unet"], {k[len(UNET) :]: v for k, v in state.items() if k.startswith(UNET)}
    inputs = _count(u, "input_blocks.{}.")
    levels = sum(f"input_blocks.{i}.0.op.weight" in u for i in range(inputs)) + 1
    per = (inputs - 1 - (levels - 1)) // levels  # input blocks: conv_in, then L resnets per level + a downsample
    first = [1 + level * (per + 1) for level in range(levels)]
    widths = [int(u[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0]) for i in first]
    attn = [f"input_blocks.{i}.1.proj_in.weight" in u for i in first]
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn]
    depth = [_count(u, f"input_blocks.{i}.1.transformer_blocks.{{}}.") or 1 for i in first]
    proj = next((u[f"input_blocks.{i}.1.proj_in.weight"] for i, a in zip(first, attn, strict=True) if a), None)
    k2 = next((v for k, v in u.items() if k.endswith("attn2.to_k.weight")), None)
    unet.update(
        in_channels=int(u["input_blocks.0.0.weight"].shape[1]),
        out_channels=int(u["out.2.weight"].shape[0]),
        layers_per_block=per,
        block_out_channels=widths,
        down_block_types=down,
        up_block_types=[t.replace("Down", "Up") for t in reversed(down)],
        cross_attention_dim=int(k2.shape[1]) if k2 is not None else unet["cross_attention_dim"],
    )
    unet["attention_head_dim"] = 8 if family == "sd15" else [_heads(w, origin, "UNet level") for w in widths]
    if family == "sdxl":
        unet["transformer_layers_per_block"] = depth
        unet["use_linear_projection"] = proj is not None and proj.ndim == 2
        added = int(u["label_emb.0.0.weight"].shape[1])
        unet["projection_class_embeddings_input_dim"] = added
        if f"{SDXL_BIGG}text_projection" in state:
            text_proj = state[f"{SDXL_BIGG}text_projection"]
            unet["addition_time_embed_dim"] = (added - int(text_proj.shape[1])) // 6  # six time ids
        # a UNet-only file: the shipped 256-wide size embeddings (what ComfyUI's SDXL model makes)
    vae, v = cfg["vae"], _vae_state(state)
    if v:
        vlevels = _count(v, "encoder.down.{}.")
        vae.update(
            block_out_channels=[int(v[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in range(vlevels)],
            down_block_types=["DownEncoderBlock2D"] * vlevels,
            up_block_types=["UpDecoderBlock2D"] * vlevels,
            layers_per_block=_count(v, "encoder.down.0.block.{}."),
            latent_channels=int(v["post_quant_conv.weight"].shape[0]),
            in_channels=int(v["encoder.conv_in.weight"].shape[1]),
            out_channels=int(v["decoder.conv_out.weight"].shape[0]),
        )
    if is_unet_only(state):  # no text encoder to read: their configs stay the shipped ones, unused
        return cfg
    cfg["text_encoder"].update(_clip_text_shape(state, CLIP_L if family == "sd15" else SDXL_CLIP_L, origin))
    if family == "sdxl":
        cfg["text_encoder_2"].update(_open_clip_text_shape(state, SDXL_BIGG, origin))
    return cfg


def _vae_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in VAE_PREFIXES:
        found = {k[len(prefix) :]: t for k, t in state.items() if k.startswith(prefix)}
        if found:
            return found
    return {}


def _clip_text_shape(state: dict, prefix: str, origin: str) -> dict[str, Any]:
    p = prefix + "text_model."
    tokens = state[f"{p}embeddings.token_embedding.weight"]
    width = int(tokens.shape[1])
    return dict(
        vocab_size=int(tokens.shape[0]),
        hidden_size=width,
        projection_dim=width,
        max_position_embeddings=int(state[f"{p}embeddings.position_embedding.weight"].shape[0]),
        num_hidden_layers=_count(state, f"{p}encoder.layers.{{}}."),
        intermediate_size=int(state[f"{p}encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_attention_heads=_heads(width, origin, "text encoder"),
    )


def _open_clip_text_shape(state: dict, prefix: str, origin: str) -> dict[str, Any]:
    tokens = state[f"{prefix}token_embedding.weight"]
    width = int(tokens.shape[1])
    return dict(
        vocab_size=int(tokens.shape[0]),
        hidden_size=width,
        projection_dim=int(state[f"{prefix}text_projection"].shape[1]),
        max_position_embeddings=int(state[f"{prefix}positional_embedding"].shape[0]),
        num_hidden_layers=_count(state, f"{prefix}transformer.resblocks.{{}}."),
        intermediate_size=int(state[f"{prefix}transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        num_attention_heads=_heads(width, origin, "text encoder 2"),
    )


def _write_config_folder(folder: Path, cfg: dict[str, dict[str, Any]]) -> None:
    """The folder layout diffusers' ``from_single_file(config=...)`` reads: one config per component."""
    for name, value in cfg.items():
        if name.startswith("_") or name == "model_index":
            continue
        (folder / name).mkdir()
        file = "scheduler_config.json" if name == "scheduler" else "config.json"
        (folder / name / file).write_text(json.dumps(value))
    (folder / "model_index.json").write_text(json.dumps(cfg["model_index"]))


def _config_folder(config: str | os.PathLike, hub_kwargs: dict[str, Any]) -> Path:
    """``config=``: a local diffusers folder, or a hub id found in the hub cache (never downloaded)."""
    if Path(config).is_dir():
        return Path(config)
    from huggingface_hub import snapshot_download

    try:
        hub = {k: v for k, v in hub_kwargs.items() if k in ("cache_dir", "revision", "token")}
        return Path(
            snapshot_download(os.fspath(config), local_files_only=True, allow_patterns=["*.json", "*.txt"], **hub)
        )
    except Exception as exc:  # not cached (or not a repo id): offline there is nowhere else to look
        raise ConfigError(
            f"config '{config}' is neither a local diffusers folder nor a hub id in the local hub cache ({exc}); "
            "expected a folder with model_index.json, unet/, vae/, text_encoder/ configs"
        ) from exc


def _tokenizers(family: str, tokenizer: Any, config_dir: Path | None, origin: str) -> list[Any]:
    """CLIP tokenizer(s): ``tokenizer=`` (a tokenizer folder, or a model folder with tokenizer/ and tokenizer_2/),
    else the ``config=`` folder's, else CLIP ViT-L/14's files in the hub cache."""
    from transformers import CLIPTokenizer

    from .console import hushed

    names = ("tokenizer", "tokenizer_2") if family == "sdxl" else ("tokenizer",)
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return list(tokenizer) if isinstance(tokenizer, (list, tuple)) else [tokenizer] * len(names)
    folders: list[Path] = []
    for root in [Path(tokenizer)] if tokenizer is not None else ([config_dir] if config_dir else []):
        if (root / "tokenizer").is_dir():
            folders = [root / n for n in names if (root / n).is_dir()]
        elif (root / "vocab.json").is_file():
            folders = [root]
        elif tokenizer is not None:
            raise CheckpointError(
                f"tokenizer '{tokenizer}' has neither vocab.json + merges.txt nor a tokenizer/ folder; expected a "
                "CLIP tokenizer folder (e.g. openai/clip-vit-large-patch14's) or a diffusers model folder"
            )
    if not folders:
        folders = _cached_tokenizer()
    if not folders:
        raise CheckpointError(
            f"single-file checkpoint '{origin}' needs CLIP's tokenizer files (vocab.json, merges.txt), which are not "
            "in the hub cache; pass tokenizer= a CLIP tokenizer folder, or fetch them once: huggingface-cli download "
            "openai/clip-vit-large-patch14 vocab.json merges.txt tokenizer_config.json special_tokens_map.json"
        )
    out = []
    with hushed():
        for i, name in enumerate(names):
            folder = folders[min(i, len(folders) - 1)]
            # SDXL's second tokenizer pads with "!" (its hub config), not with the end token
            extra = {"pad_token": "!"} if name == "tokenizer_2" and folder.name != "tokenizer_2" else {}
            out.append(CLIPTokenizer.from_pretrained(folder, **extra))
    return out


def _cached_tokenizer() -> list[Path]:
    from huggingface_hub import try_to_load_from_cache

    for repo, sub in TOKENIZER_REPOS:
        files = [try_to_load_from_cache(repo, f"{sub}/{f}" if sub else f) for f in ("vocab.json", "merges.txt")]
        if all(isinstance(f, str) for f in files):
            return [Path(files[0]).parent]
    return []


def load_single_file(
    path: str | os.PathLike,
    dtype: torch.dtype,
    config: str | os.PathLike | None = None,
    tokenizer: Any = None,
    vae: Any = None,
    **hub_kwargs: Any,
) -> dict[str, Any]:
    """The components of an :class:`ipa_rt.models.BaseModel` (by field name; ``family`` by its name) from one
    SD1.5 / SDXL checkpoint file (see the module's docstring), plus ``vae_config`` (the VAE config of its latents).
    Without a baked-in VAE, ``vae`` (the caller's ``vae=``) must be given, unless the file is a UNet alone (then
    ``vae`` is None and there are no text encoders or tokenizers)."""
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .console import dropping, hushed

    origin = os.fspath(path)
    state = read_checkpoint(origin, "single-file checkpoint")
    family = checkpoint_family(state, origin)
    # an older text-encoder layout without transformers' text_model level: diffusers' converter expects it
    for prefix in (CLIP_L, SDXL_CLIP_L):
        if f"{prefix}embeddings.token_embedding.weight" in state:
            state = {
                (k.replace(prefix, prefix + "text_model.", 1) if k.startswith(prefix) else k): t
                for k, t in state.items()
            }
    given = _config_folder(config, hub_kwargs) if config is not None else None
    has_vae = bool(_vae_state(state))
    unet_only = is_unet_only(state)  # the UNet alone (ComfyUI's MODEL as a file): no text encoder or VAE to load
    if not has_vae and vae is None and not unet_only:
        raise CheckpointError(
            f"single-file checkpoint '{origin}' has no VAE (no first_stage_model.* keys); pass vae= a diffusers "
            "autoencoder folder or hub id (e.g. stabilityai/sd-vae-ft-mse), or 'taesd'"
        )
    with tempfile.TemporaryDirectory(prefix="ipa_rt-single-file-") as tmp:
        folder = given
        if folder is None:
            folder = Path(tmp)
            _write_config_folder(folder, derived_configs(state, family, origin))
        model_index = json.loads((folder / "model_index.json").read_text())
        common = dict(config=str(folder), torch_dtype=dtype, local_files_only=True)
        try:
            # non-EMA weights, as diffusers, A1111 and ComfyUI use: diffusers' note about the EMA copy is not the
            # user's to act on
            with hushed(), dropping("diffusers.loaders.single_file_utils", "EMA"):
                unet = UNet2DConditionModel.from_single_file(state, subfolder="unet", **common)
                vae_model = AutoencoderKL.from_single_file(state, subfolder="vae", **common) if has_vae else None
                names = TEXT_ENCODERS[family] if not unet_only else ()
                classes = [CLIPTextModel, CLIPTextModelWithProjection][: len(names)]
                # each encoder sees only its own keys: diffusers tells SDXL's two apart by width, which a model
                # with equal widths (a tiny test model) would confuse
                prefixes = ((CLIP_L,) if family == "sd15" else (SDXL_CLIP_L, SDXL_BIGG))[: len(names)]
                encoders = [
                    create_diffusers_clip_model_from_ldm(
                        cls,
                        {k: t for k, t in state.items() if k.startswith(prefix)},
                        subfolder=name,
                        config=str(folder),
                        torch_dtype=dtype,
                        local_files_only=True,
                    )
                    for cls, name, prefix in zip(classes, names, prefixes, strict=True)
                ]
                scheduler = getattr(diffusers, model_index["scheduler"][1]).from_pretrained(
                    folder, subfolder="scheduler"
                )
                fe_entry = model_index.get("feature_extractor")
                fe = None
                if given is not None and fe_entry and fe_entry[1] and (folder / "feature_extractor").is_dir():
                    fe = getattr(transformers, fe_entry[1]).from_pretrained(folder, subfolder="feature_extractor")
        except (ValueError, RuntimeError, KeyError, OSError) as exc:
            how = f"the configs of '{config}'" if given is not None else f"the {family} configs its shapes give"
            raise CheckpointError(
                f"single-file checkpoint '{origin}' ({family}) does not load with {how}: {exc}; pass config= a "
                "diffusers folder with this model's configs"
            ) from exc
        modules = {"unet": unet, "vae": vae_model, **{f"text_encoder[{i}]": e for i, e in enumerate(encoders)}}
        for name, module in modules.items():
            missing = [n for n, p in (module.named_parameters() if module is not None else []) if p.is_meta]
            if missing:  # diffusers leaves weights the file lacks on the meta device, silently
                raise CheckpointError(
                    f"single-file checkpoint '{origin}' ({family}) has no weights for {name}: {missing[:3]} ...; "
                    "expected a complete SD1.5/SDXL checkpoint"
                )
        tokenizers = _tokenizers(family, tokenizer, given, origin) if not unet_only else []
        # the latent space the UNet works in (scaling factor, downsampling), from the VAE config beside it
        vae_config = json.loads((folder / "vae" / "config.json").read_text())
    return {
        "family": family,
        "unet": unet.eval(),
        "vae": vae_model.eval() if vae_model is not None else None,
        "text_encoders": [e.eval() for e in encoders],
        "tokenizers": tokenizers,
        "scheduler": scheduler,
        "feature_extractor": fe,
        "force_zeros_for_empty_prompt": bool(model_index.get("force_zeros_for_empty_prompt", True)),
        "origin": origin,
        "vae_config": vae_config,
    }


def sample_pixels(path: str | os.PathLike) -> int:
    """A single file's native resolution (what the family's shipped UNet and VAE configs give: 512 / 1024), read
    from its header (safetensors) or keys, for engine defaults."""
    family = checkpoint_family(_keys_only(path), os.fspath(path))
    cfg = json.loads((CONFIGS / f"{family}.json").read_text())
    return int(cfg["unet"]["sample_size"]) * 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)


def _keys_only(path: str | os.PathLike) -> dict[str, Any]:
    if Path(path).suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(os.fspath(path), "pt") as f:
                return dict.fromkeys(f.keys(), None)
        except Exception as exc:  # a truncated header
            raise CheckpointError(
                f"single-file checkpoint '{path}' cannot be read ({exc}); expected a .safetensors file"
            ) from exc
    return read_checkpoint(path, "single-file checkpoint")


# --- image encoders ----------------------------------------------------------------------------------------------
# OpenCLIP's visual tower -> transformers' CLIPVisionModelWithProjection (the layout OpenAI's CLIP shares); the
# attention's fused in_proj is split into q/k/v and the projection is transposed (OpenCLIP: x @ proj)
OPEN_CLIP_VISION = {
    "class_embedding": "vision_model.embeddings.class_embedding",
    "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "ln_post.weight": "vision_model.post_layernorm.weight",
    "ln_post.bias": "vision_model.post_layernorm.bias",
}
OPEN_CLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj"}
OPEN_CLIP_BLOCK |= {"mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def open_clip_vision_to_transformers(
    state: dict[str, torch.Tensor], prefix: str = "visual."
) -> dict[str, torch.Tensor]:
    """The visual tower of an OpenCLIP state dict (``visual.*``; the text tower is left out) in transformers' key
    names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        k = key[len(prefix) :]
        if k in OPEN_CLIP_VISION:
            out[OPEN_CLIP_VISION[k]] = value
        elif k == "proj":
            out["visual_projection.weight"] = value.T.contiguous()
        elif k.startswith("transformer.resblocks."):
            i, rest = k.split(".")[2], ".".join(k.split(".")[3:])
            layer = f"vision_model.encoder.layers.{i}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]
                for name, part in zip("qkv", value.chunk(3), strict=True):
                    out[f"{layer}self_attn.{name}_proj.{kind}"] = part.clone()  # own storage, as the folder's
                continue
            module, kind = rest.rsplit(".", 1)
            if module not in OPEN_CLIP_BLOCK:
                raise KeyError(key)
            out[f"{layer}{OPEN_CLIP_BLOCK[module]}.{kind}"] = value
    return out


def load_encoder_file(path: str | os.PathLike, dtype: torch.dtype) -> Any:
    """A ``CLIPVisionModelWithProjection`` from one file: transformers' key names (``vision_model.*`` +
    ``visual_projection.weight``: h94/IP-Adapter's ``model.safetensors``, ComfyUI's ``clip_vision_h.safetensors``)
    or OpenCLIP's (``visual.*``: ``open_clip_model.safetensors`` of laion/CLIP-ViT-H-14 and -bigG-14). The
    config comes from the shapes; OpenCLIP's ViT-H/14 and ViT-bigG/14 (and OpenAI's ViT-L/14) have 16 heads."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    origin = os.fspath(path)
    state = read_checkpoint(origin, "image encoder")
    for prefix in ("", "clip_vision.", "model.", "image_encoder."):  # unCLIP / wrapped layouts nest the tower
        if f"{prefix}visual.conv1.weight" in state:
            try:
                state = open_clip_vision_to_transformers(state, f"{prefix}visual.")
            except KeyError as exc:
                raise CheckpointError(
                    f"image encoder '{origin}' has an OpenCLIP key {exc} ipa_rt does not map"
                ) from exc
            break
        if f"{prefix}vision_model.embeddings.patch_embedding.weight" in state:
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            break
    else:
        sample = ", ".join(sorted(state)[:3])
        raise CheckpointError(
            f"image encoder '{origin}' is not a CLIP vision model (first keys: {sample}); expected a CLIP ViT file in "
            "transformers' (vision_model.*) or OpenCLIP's (visual.*) key names, e.g. ComfyUI's models/clip_vision files"
        )
    if "visual_projection.weight" not in state:
        raise CheckpointError(
            f"image encoder '{origin}' has no projection (visual_projection / visual.proj); "
            "IP-Adapter needs its image embeds"
        )
    patch = state["vision_model.embeddings.patch_embedding.weight"]
    width, positions = int(patch.shape[0]), int(state["vision_model.embeddings.position_embedding.weight"].shape[0])
    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=int(state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=_count(state, "vision_model.encoder.layers.{}."),
        num_attention_heads=12 if width == 768 else 16,
        patch_size=int(patch.shape[2]),
        image_size=int(patch.shape[2] * round((positions - 1) ** 0.5)),
        projection_dim=int(state["visual_projection.weight"].shape[0]),
        hidden_act="quick_gelu" if width in (768, 1024) else "gelu",  # OpenAI's ViT-B/L use quick_gelu
        layer_norm_eps=1e-5,
    )
    state.pop("vision_model.embeddings.position_ids", None)
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"image encoder '{origin}' does not fit a CLIP vision model of its own shapes: {exc}"
        ) from exc
    embeddings = model.vision_model.embeddings
    # a buffer, not a weight: built on the meta device with the model, so made here
    embeddings.register_buffer("position_ids", torch.arange(positions).expand((1, -1)), persistent=False)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"image encoder '{origin}' lacks {left[:3]}; expected a complete CLIP vision model")
    model.config._name_or_path = origin  # errors about the adapter fit name the file
    return model.to(dtype).eval()
