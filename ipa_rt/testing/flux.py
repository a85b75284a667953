"""Tiny random Flux.1 and Chroma checkpoints and XLabs-style Flux IP-Adapters in the real on-disk formats.

What users download, only smaller: a diffusers ``FluxPipeline`` folder (``black-forest-labs/FLUX.1-dev``'s layout:
CLIP and T5 text encoders with their tokenizers, a VAE of FLUX's flavour (no quant convs, shift and scale factors;
4 latent channels where FLUX.1 has 16), a double- and single-stream transformer, the flow-matching scheduler with
dynamic shifting) or a ``ChromaPipeline`` folder
(``lodestones/Chroma1-HD``'s: T5 only), and IP-Adapter files in XLabs-AI/flux-ip-adapter's key names (4 image
tokens; ``flux-ip-adapter-v2`` has 16) or diffusers' own layout. Both tokenizers are generated locally, so nothing
touches a model hub.

The real image encoder is ``openai/clip-vit-large-patch14`` (projection_dim 768, 224 px, ViT-L/14's layout); the tiny
one is :func:`ipa_rt.testing.write_image_encoder` with :data:`FLUX_ENCODER` (``projection_dim`` = the adapters'
default ``encoder_dim``). diffusers reads the number of image tokens from the projection's size alone: 16 only when
``proj.weight`` has 65536 = 16 × 4096 rows, so a 16-token adapter needs ``joint_attention_dim=4096`` (T5-XXL's width).
"""

from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from .unet import VAE_CONFIG, Rand, clean_configs, quiet, save_adapter, text_config, write_tokenizer

FAMILIES = ("flux", "chroma")
LAYOUTS = ("xlabs", "diffusers")
FLUX_ENCODER = dict(projection_dim=24)  # write_image_encoder(folder, **FLUX_ENCODER): fits encoder_dim's default
V2_TOKENS, V2_WIDTH = 16, 4096  # diffusers: 16 tokens iff proj.weight.shape[0] == 65536

FLUX_TRANSFORMER = dict(  # FLUX.1-dev: 19 double + 38 single blocks, 24 heads x 128, rope axes (16, 56, 56)
    patch_size=1,
    num_layers=2,  # double-stream blocks: the only ones with an IP-Adapter
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    axes_dims_rope=[4, 4, 8],  # sums to attention_head_dim
)
CHROMA_TRANSFORMER = dict(  # Chroma1-HD: FLUX's blocks, an approximator (64 channels, 5120 wide, 5 layers)
    FLUX_TRANSFORMER,
    approximator_num_channels=16,  # the approximator's input: a quarter each time and guidance, half mod index
    approximator_hidden_dim=32,
    approximator_layers=2,
)
FLUX_VAE = dict(  # FLUX.1's VAE flavour (16 latent channels there): no quant convs, a shift and a scale
    VAE_CONFIG,
    use_quant_conv=False,
    use_post_quant_conv=False,
    shift_factor=0.1159,
    scaling_factor=0.3611,
    force_upcast=True,
)
T5_CONFIG = dict(  # T5 v1.1 XXL's flavour (d_model 4096, 24 layers, 64 heads of 64, d_ff 10240), tiny
    num_layers=2,
    num_heads=2,
    d_kv=8,
    d_ff=37,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
    layer_norm_epsilon=1e-6,
    tie_word_embeddings=False,
)
FLUX_SCHEDULER = dict(  # FLUX.1-dev's scheduler/scheduler_config.json
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
T5_EXTRA_IDS = 100  # sentinels <extra_id_99> .. <extra_id_0> at the end of the vocabulary, as in T5's
T5_WORDS = (
    "a photo of the cat dog in on with and an is at to by for from this that portrait painting style high quality "
    "detailed woman man girl boy red blue green white black light sun sky tree house car city street water"
).split()
_T5_SUBWORDS = ("ing", "ed", "er", "es", "s", "ly", "th", "an", "re", "on")


def _t5_pieces() -> list[tuple[str, float]]:
    """A SentencePiece-style Unigram vocabulary: T5's special ids, whole words, subwords, single characters with and
    without the word-start marker (so any ASCII text segments), then the sentinels; scores are log-probabilities."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [(f"▁{w}", -5.0 - 0.01 * i) for i, w in enumerate(T5_WORDS)]
    pieces += [(s, -7.0 - 0.01 * i) for i, s in enumerate(_T5_SUBWORDS)]
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces += [(f"▁{c}", -9.0) for c in chars] + [(c, -10.0) for c in chars]
    pieces += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(T5_EXTRA_IDS))]
    unique: dict[str, float] = {}
    for piece, score in pieces:  # "▁a" is a word and a character piece: the first one counts
        unique.setdefault(piece, score)
    return list(unique.items())


def write_t5_tokenizer(folder: str | os.PathLike) -> int:
    """Write a T5 tokenizer folder as T5 v1.1's on the hub (``tokenizer.json``, ``tokenizer_config.json``,
    ``special_tokens_map.json``; no ``spiece.model``, which needs sentencepiece) from a small Unigram vocabulary
    built locally; returns the vocabulary size. ``tokenizer.json`` is the tokenizers library's own format, which
    ``T5TokenizerFast`` reads in transformers 4 as in 5 (the tests check 5, the version installed)."""
    from transformers import T5TokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = T5TokenizerFast(vocab=_t5_pieces(), extra_ids=T5_EXTRA_IDS)
    tok.backend_tokenizer.save(str(folder / "tokenizer.json"))
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    extra = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    config = {"additional_special_tokens": extra, **special, "extra_ids": T5_EXTRA_IDS, "legacy": True}
    config |= {"model_max_length": 512, "clean_up_tokenization_spaces": True, "tokenizer_class": "T5Tokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps({"additional_special_tokens": extra, **special}))
    return len(tok)


def save_with_hub_tokenizers(pipe: Any, folder: Path, tokenizers: dict[str, Path], t5_name: str) -> None:
    """``pipe.save_pretrained(folder)`` with the tokenizer folders as the hub has them: transformers 5 re-saves
    tokenizers as ``tokenizer.json`` only, so the locally written files (vocab.json + merges.txt for CLIP, T5 v1.1's
    configs beside tokenizer.json) replace them; the T5 entry of model_index.json names ``T5TokenizerFast`` as
    FLUX.1-dev's and SD3.5's do ("T5Tokenizer" needs spiece.model under transformers 4)."""
    pipe.save_pretrained(folder)
    for name, source in tokenizers.items():
        shutil.rmtree(folder / name)
        shutil.copytree(source, folder / name)
    index = json.loads((folder / "model_index.json").read_text())
    index[t5_name] = ["transformers", "T5TokenizerFast"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def t5_config(vocab_size: int, d_model: int, **overrides: Any):
    from transformers import T5Config

    ids = dict(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5Config(vocab_size=vocab_size, d_model=d_model, **{**T5_CONFIG, **ids, **overrides})


@quiet
def write_flux_model(
    folder: str | os.PathLike,
    family: str = "flux",
    seed: int = 0,
    guidance_embeds: bool = True,
    joint_attention_dim: int = 32,
    configs: dict[str, dict] | None = None,
) -> Path:
    """A tiny diffusers-format ``FluxPipeline`` (``family="flux"``) or ``ChromaPipeline`` (``"chroma"``) folder
    saved by diffusers itself, so ``model_index.json`` and every component are in the format users load.

    ``guidance_embeds`` (Flux only): FLUX.1-dev's guidance-distilled embedding (``False``: FLUX.1-schnell's).
    ``joint_attention_dim`` is T5's width, the context and IP-Adapter key/value input size (4096 as in the real
    model gives 16-token adapters). ``configs`` overrides the tiny architectures per component: ``transformer``,
    ``vae``, ``text`` (CLIP), ``t5``."""
    from diffusers import (
        AutoencoderKL,
        ChromaPipeline,
        ChromaTransformer2DModel,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    configs = clean_configs(configs)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**{**FLUX_VAE, **configs.get("vae", {})})
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    t5_name = "tokenizer" if family == "chroma" else "tokenizer_2"
    with tempfile.TemporaryDirectory(dir=folder) as scratch:  # the hub's tokenizer files, loaded as users load them
        tokenizers = {t5_name: Path(scratch) / t5_name}
        t5_vocab = write_t5_tokenizer(tokenizers[t5_name])
        t5_tokenizer = T5TokenizerFast.from_pretrained(tokenizers[t5_name])
        t5 = T5EncoderModel(t5_config(t5_vocab, joint_attention_dim, **configs.get("t5", {}))).eval()
        latent = vae.config.latent_channels * 4  # Flux packs 2x2 latent patches into one token
        transformer_cfg = dict(in_channels=latent, joint_attention_dim=joint_attention_dim)
        if family == "chroma":
            with warnings.catch_warnings():  # diffusers' own FluxPosEmbed import in transformer_chroma.py
                warnings.simplefilter("ignore", FutureWarning)
                transformer = ChromaTransformer2DModel(
                    **{**CHROMA_TRANSFORMER, **transformer_cfg, **configs.get("transformer", {})}
                )
            pipe = ChromaPipeline(
                scheduler=scheduler, vae=vae, text_encoder=t5, tokenizer=t5_tokenizer, transformer=transformer
            )
        else:
            tokenizers["tokenizer"] = Path(scratch) / "tokenizer"
            clip_vocab = write_tokenizer(tokenizers["tokenizer"])
            clip = CLIPTextModel(text_config(clip_vocab, **configs.get("text", {}))).eval()
            transformer_cfg |= dict(pooled_projection_dim=clip.config.hidden_size, guidance_embeds=guidance_embeds)
            transformer = FluxTransformer2DModel(
                **{**FLUX_TRANSFORMER, **transformer_cfg, **configs.get("transformer", {})}
            )
            pipe = FluxPipeline(
                scheduler=scheduler,
                vae=vae,
                text_encoder=clip,
                tokenizer=CLIPTokenizer.from_pretrained(tokenizers["tokenizer"]),
                text_encoder_2=t5,
                tokenizer_2=t5_tokenizer,
                transformer=transformer,
            )
        save_with_hub_tokenizers(pipe, folder, tokenizers, t5_name)
    return folder


def component_config(base_folder: str | os.PathLike, part: str, kind: str) -> dict[str, Any]:
    path = Path(base_folder) / part / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: base_folder must be {kind} diffusers folder")
    return json.loads(path.read_text())


def flux_adapter_state_dict(
    base_folder: str | os.PathLike, encoder_dim: int = 24, tokens: int = 4, seed: int = 2
) -> dict[str, dict[str, torch.Tensor]]:
    """Random weights of an XLabs-style Flux IP-Adapter fitting the Flux/Chroma model at ``base_folder``, as
    diffusers' nested ``{"image_proj": ..., "ip_adapter": ...}`` dict: an image projection to ``tokens`` tokens of
    ``joint_attention_dim`` and per double-stream block biased K/V projections of those tokens.
    ``encoder_dim`` is the image encoder's ``projection_dim``."""
    cfg = component_config(base_folder, "transformer", "a Flux or Chroma")
    width = cfg["joint_attention_dim"]
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    read_as = V2_TOKENS if tokens * width == V2_TOKENS * V2_WIDTH else 4  # how diffusers will count the tokens
    if tokens != read_as:
        raise ValueError(
            f"tokens={tokens} with joint_attention_dim={width}: diffusers reads this adapter as {read_as} tokens "
            f"(16 only when tokens x joint_attention_dim == {V2_TOKENS * V2_WIDTH}); use tokens=4, or tokens=16 "
            f"with a base written with joint_attention_dim={V2_WIDTH}"
        )
    r = Rand(seed)
    image_proj = {"proj.weight": r.linear(tokens * width, encoder_dim), "proj.bias": r.bias(tokens * width)}
    image_proj |= r.norm("norm", width)
    ip_adapter: dict[str, torch.Tensor] = {}
    for i in range(cfg["num_layers"]):
        ip_adapter[f"{i}.to_k_ip.weight"] = r.linear(inner, width)
        ip_adapter[f"{i}.to_k_ip.bias"] = r.bias(inner)
        ip_adapter[f"{i}.to_v_ip.weight"] = r.linear(inner, width)
        ip_adapter[f"{i}.to_v_ip.bias"] = r.bias(inner)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def _xlabs_name(part: str, key: str) -> str:
    """diffusers' name -> XLabs-AI/flux-ip-adapter's (the inverse of ``FluxIPAdapterMixin.load_ip_adapter``)."""
    if part == "image_proj":
        return f"ip_adapter_proj_model.{key}"
    block, proj, param = key.split(".")
    kind = {"to_k_ip": "k", "to_v_ip": "v"}[proj]
    return f"double_blocks.{block}.processor.ip_adapter_double_stream_{kind}_proj.{param}"


def save_flux_adapter(
    state: dict[str, dict[str, torch.Tensor]], path: str | os.PathLike, layout: str = "xlabs"
) -> Path:
    """Write a nested Flux IP-Adapter dict atomically: ``layout="xlabs"`` as a ``.safetensors`` with
    XLabs-AI/flux-ip-adapter's key names; ``"diffusers"`` as ``.bin`` (the nested dict, ``torch.save``) or
    ``.safetensors`` (flat ``image_proj.*`` / ``ip_adapter.*`` keys). diffusers' loader reads all three."""
    path = Path(path)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    allowed = (".safetensors",) if layout == "xlabs" else (".safetensors", ".bin")
    if path.suffix not in allowed:
        raise ValueError(f"layout={layout!r} is written as {' or '.join(allowed)}, not {path.name!r}")
    return save_adapter(state, path, _xlabs_name if layout == "xlabs" else None)


@quiet
def write_flux_adapter(
    path: str | os.PathLike,
    base_folder: str | os.PathLike,
    layout: str = "xlabs",
    encoder_dim: int = 24,
    tokens: int = 4,
    seed: int = 2,
) -> Path:
    """A random Flux IP-Adapter for the Flux/Chroma model at ``base_folder`` saved at ``path`` in ``layout`` (see
    :func:`flux_adapter_state_dict` and :func:`save_flux_adapter`)."""
    return save_flux_adapter(flux_adapter_state_dict(base_folder, encoder_dim, tokens, seed), path, layout)
