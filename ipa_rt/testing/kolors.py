"""Tiny random Kolors checkpoints and Kolors IP-Adapter-Plus files in the real on-disk formats.

What users download, only smaller: a diffusers ``KolorsPipeline`` folder (``Kwai-Kolors/Kolors-diffusers``'s layout:
a ChatGLM3 text encoder with its sentencepiece ``ChatGLMTokenizer``, an SDXL-layout UNet whose ``encoder_hid_proj``
projects ChatGLM's 4096-wide states to the 2048-wide cross-attention (``encoder_hid_dim_type="text_proj"``), SDXL's
VAE, an Euler scheduler with Kolors' own noise schedule) and ``Kwai-Kolors/Kolors-IP-Adapter-Plus``'s adapter file:
the h94 Plus (Resampler) layout for that UNet, reading the penultimate hidden states of
``openai/clip-vit-large-patch14-336``. The tokenizer model is trained here on a few sentences, so nothing touches a
model hub.

diffusers' Kolors classes (``ChatGLMModel``, ``ChatGLMTokenizer``) live in ``diffusers.pipelines.kolors``, so the
folder's ``model_index.json`` names their library ``"kolors"``, as the hub's does.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import string
import tempfile
from pathlib import Path

import torch

from .flux import T5_WORDS
from .unet import SDXL_UNET, VAE_CONFIG, adapter_state_dict, clean_configs, quiet, save_adapter

# openai/clip-vit-large-patch14-336 (Kwai-Kolors/Kolors-IP-Adapter-Plus/image_encoder): 1024 wide, 24 layers,
# 336 px in 14 px patches = 576 patches + CLS = 577 tokens. Tiny: 48 wide (not the ChatGLM/CLIP 32, so a mix-up of
# widths fails loudly), 48 px in 8 px patches = 36 + CLS = 37 tokens, and a size other than the SD/SDXL encoders' 32
# (the 224-px ViT-H's stand-in), so the feature extractor has to follow the encoder's image_size.
# Use: ``write_image_encoder(folder, **KOLORS_ENCODER)``.
KOLORS_ENCODER = dict(hidden_size=48, num_attention_heads=4, image_size=48, patch_size=8)

CHATGLM_CONFIG = dict(  # THUDM/chatglm3-6b-base as in Kolors: 4096 wide, 28 layers, 32 heads x 128, 2 kv groups
    hidden_size=32,
    num_layers=2,  # Kolors reads hidden_states[-2]: the output of the last layer but one
    num_attention_heads=4,
    kv_channels=8,  # hidden_size / heads, as in the real model
    multi_query_attention=True,
    multi_query_group_num=2,
    ffn_hidden_size=37,
    seq_length=256,  # rotary table length; Kolors pads prompts to 256 (the real model: 32768)
    add_bias_linear=False,
    add_qkv_bias=True,
    apply_query_key_layer_scaling=True,
    attention_softmax_in_fp32=True,
    post_layer_norm=True,
    rmsnorm=True,
    layernorm_epsilon=1e-5,
    original_rope=True,  # read by ChatGLMModel though ChatGLMConfig has no such argument
    use_cache=True,
    tie_word_embeddings=False,
    eos_token_id=2,
    pad_token_id=0,
)
# Kolors' UNet: SDXL's layout with cross_attention_dim 2048, encoder_hid_dim 4096 (text_proj), addition_time_embed_dim
# 256 and projection_class_embeddings_input_dim 5632 = 4096 (ChatGLM's pooled state) + 6 x 256. Tiny: the tiny SDXL's
# blocks and cross dim; the two ChatGLM-sized entries follow CHATGLM_CONFIG["hidden_size"] (see write_kolors_model).
KOLORS_UNET = dict(SDXL_UNET, encoder_hid_dim_type="text_proj")
# SDXL's VAE, which Kolors ships (from memory: scaling 0.13025, force_upcast true as SDXL's fp16-unsafe VAE)
KOLORS_VAE = dict(VAE_CONFIG, scaling_factor=0.13025, force_upcast=True)
# Kwai-Kolors/Kolors-diffusers' scheduler/scheduler_config.json, from memory (no hub here to check): Kolors trained
# with 1100 steps and beta_end 0.014 (SDXL: 1000, 0.012); the rest as SDXL's EulerDiscreteScheduler.
KOLORS_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.014,
    beta_schedule="scaled_linear",
    num_train_timesteps=1100,
    prediction_type="epsilon",
    timestep_spacing="leading",
    steps_offset=1,
    interpolation_type="linear",
    use_karras_sigmas=False,
)
TOKENIZER_VOCAB = 512  # sentencepiece pieces: <unk>, <s>, </s>, 256 byte-fallback pieces, characters, merges


def _train_tokenizer(vocab_size: int = TOKENIZER_VOCAB) -> bytes:
    """A sentencepiece BPE model with ChatGLM3's conventions (<unk>=0, <s>=1, </s>=2, no pad piece, byte fallback,
    no normalization), trained on a few generated English sentences plus every printable ASCII character."""
    import sentencepiece as spm

    corpus = [" ".join(T5_WORDS[i:] + T5_WORDS[:i]) for i in range(len(T5_WORDS))]
    corpus += [" ".join(string.ascii_letters), " ".join(string.digits + string.punctuation)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def write_chatglm_tokenizer(folder: str | os.PathLike) -> int:
    """Write a ``ChatGLMTokenizer`` folder as Kolors-diffusers' ``tokenizer/`` (``tokenizer.model`` and
    ``tokenizer_config.json``); returns the tokenizer's ``vocab_size``: the sentencepiece pieces plus the nine
    special tokens (``[MASK]``, ``[gMASK]``, ``[sMASK]``, ``sop``, ``eop``, four roles) ``SPTokenizer`` appends.

    Under transformers 5 the loaded tokenizer also registers ``</s>`` and ``<unk>`` as added tokens at the ids of the
    last two role tokens (its ``get_vocab`` maps ids 0, 1 and 2 all to ``""``, so the next free id it computes is
    ``vocab_size - 2``), the same with the hub's tokenizer; it only matters for prompts that spell those tokens
    out, and ``save_pretrained`` writes it into ``tokenizer_config.json``, so :func:`write_kolors_model` keeps these
    files."""
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(_train_tokenizer())
    config = {
        "tokenizer_class": "ChatGLMTokenizer",
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "remove_space": False,
        "encode_special_tokens": False,
        "model_max_length": 1000000000000000019884624838656,
        "eos_token": "</s>",
        "pad_token": "<unk>",
        "unk_token": "<unk>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ChatGLMTokenizer(str(folder / "tokenizer.model")).vocab_size


def _init_chatglm(model: torch.nn.Module, seed: int) -> None:
    """``ChatGLMModel`` leaves its weights uninitialized (``skip_init``, and RMSNorm's ``torch.empty``) and its
    ``_init_weights`` does nothing: give every parameter seeded values that keep each layer's output O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g, device="cpu"))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g, device="cpu"))
            elif "word_embeddings" in name:
                p.copy_(torch.randn(p.shape, generator=g, device="cpu"))
            else:  # linear layers
                p.copy_(torch.randn(p.shape, generator=g, device="cpu") * p.shape[-1] ** -0.5)


@quiet
def write_kolors_model(folder: str | os.PathLike, seed: int = 0, configs: dict[str, dict] | None = None) -> Path:
    """A tiny diffusers-format ``KolorsPipeline`` folder saved by diffusers itself, so ``model_index.json`` and every
    component are in the format users load; ``force_zeros_for_empty_prompt`` is ``False``, the pipeline's default
    and Kolors-diffusers' value (from memory; ``True`` would make the negative embeddings zeros). ``configs``
    overrides the tiny architectures per component: ``unet``, ``vae``, ``text`` (ChatGLM). The UNet's
    ``encoder_hid_dim`` and ``projection_class_embeddings_input_dim`` follow ChatGLM's width unless
    ``configs["unet"]`` sets them."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, KolorsPipeline, UNet2DConditionModel
    from diffusers.pipelines.kolors import ChatGLMModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer

    configs = clean_configs(configs)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    text_cfg = {**CHATGLM_CONFIG, **configs.get("text", {})}
    width = text_cfg["hidden_size"]
    unet_cfg = {**KOLORS_UNET, "encoder_hid_dim": width}
    unet_cfg["projection_class_embeddings_input_dim"] = width + 6 * unet_cfg["addition_time_embed_dim"]
    unet = UNet2DConditionModel(**{**unet_cfg, **configs.get("unet", {})})
    vae = AutoencoderKL(**{**KOLORS_VAE, **configs.get("vae", {})})
    scheduler = EulerDiscreteScheduler(**KOLORS_SCHEDULER)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:  # the hub's tokenizer files, loaded as users load them
        source = Path(scratch) / "tokenizer"
        vocab = write_chatglm_tokenizer(source)
        tokenizer = ChatGLMTokenizer.from_pretrained(source)
        padded = -(-vocab // 64) * 64  # ChatGLM pads its embedding table (65024 rows for 64798 ids)
        text_encoder = ChatGLMModel(ChatGLMConfig(padded_vocab_size=padded, **text_cfg), empty_init=True)
        _init_chatglm(text_encoder, seed + 1)
        text_encoder.eval()
        pipe = KolorsPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        pipe.save_pretrained(folder)
        # transformers 5 re-saves the tokenizer with an added_tokens_decoder of its own making (see
        # write_chatglm_tokenizer); the folder keeps the hub's two files instead
        shutil.rmtree(folder / "tokenizer")
        shutil.copytree(source, folder / "tokenizer")
    return folder


def kolors_adapter_state_dict(
    base_folder: str | os.PathLike, encoder: dict[str, int] | None = None, seed: int = 2
) -> dict[str, dict[str, torch.Tensor]]:
    """Random weights of a Kolors IP-Adapter-Plus fitting the Kolors model at ``base_folder``: Kwai-Kolors' file is
    h94's Plus layout, so this is :func:`adapter_state_dict`'s ``"plus"`` with ``KOLORS_ENCODER`` (``encoder``
    overrides it)."""
    return adapter_state_dict("plus", base_folder, encoder={**KOLORS_ENCODER, **(encoder or {})}, seed=seed)


@quiet
def write_kolors_adapter(
    path: str | os.PathLike, base_folder: str | os.PathLike, encoder: dict[str, int] | None = None, seed: int = 2
) -> Path:
    """A random Kolors IP-Adapter-Plus for the Kolors model at ``base_folder``, saved at ``path`` as ``.bin`` (the
    nested dict, as ``ip_adapter_plus_general.bin``) or ``.safetensors`` (flat ``image_proj.*`` keys)."""
    return save_adapter(kolors_adapter_state_dict(base_folder, encoder, seed), path)
