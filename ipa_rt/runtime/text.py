"""Prompt encoding, numerically identical to diffusers' SD1.5 and SDXL pipelines' ``encode_prompt``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError


@dataclass
class PromptEmbeds:
    """Text conditions for the UNet, CFG batch order ``[negative, positive]`` when guidance is on."""

    embeds: Tensor  # [B, L, C]
    pooled: Tensor | None = None  # [B, P] (SDXL only)


def _as_list(prompt: str | list[str], name: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise ConfigError(f"{name} is {prompt!r}; expected a string or a non-empty list of strings")


def _negatives(negative: str | list[str] | None, batch: int) -> list[str]:
    if negative is None:
        return [""] * batch
    negatives = _as_list(negative, "negative_prompt")
    if len(negatives) == 1:
        return negatives * batch
    if len(negatives) != batch:
        raise ConfigError(f"negative_prompt has {len(negatives)} entries; expected 1 or {batch} (one per prompt)")
    return negatives


def _repeat(x: Tensor, n: int) -> Tensor:
    """diffusers' ``repeat(1, n, ...)`` + ``view``: each prompt's copies stay adjacent."""
    return x.repeat_interleave(n, dim=0)


@torch.no_grad()
def encode_prompt_sd15(
    text_encoders, tokenizers, prompt, negative_prompt, num_images: int, cfg: bool, device, dtype, **_
) -> PromptEmbeds:
    """SD1.5 family: CLIP last hidden state (after the final layer norm); negative = encoded ``""`` by default."""
    (encoder,), (tokenizer,) = text_encoders, tokenizers
    prompts = _as_list(prompt, "prompt")

    def run(texts: list[str], length: int) -> Tensor:
        inputs = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        mask = inputs.attention_mask.to(device) if getattr(encoder.config, "use_attention_mask", False) else None
        return encoder(inputs.input_ids.to(device), attention_mask=mask)[0].to(dtype=encoder.dtype)

    embeds = run(prompts, tokenizer.model_max_length)
    embeds = _repeat(embeds, num_images)
    if cfg:
        negative = _repeat(run(_negatives(negative_prompt, len(prompts)), embeds.shape[1]), num_images)
        embeds = torch.cat([negative, embeds])
    return PromptEmbeds(embeds.to(dtype))


@torch.no_grad()
def encode_prompt_sdxl(
    text_encoders,
    tokenizers,
    prompt,
    negative_prompt,
    num_images: int,
    cfg: bool,
    device,
    dtype,
    prompt_2=None,
    negative_prompt_2=None,
    force_zeros_for_empty_prompt: bool = True,
) -> PromptEmbeds:
    """SDXL family: penultimate hidden states of both encoders side by side, pooled output of the second.

    As diffusers: with no ``negative_prompt`` and ``force_zeros_for_empty_prompt`` the negative conditions
    are zeros, otherwise the negative prompt (default ``""``) is encoded.
    """
    prompts = _as_list(prompt, "prompt")
    prompts_2 = _as_list(prompt_2, "prompt_2") if prompt_2 is not None else prompts

    def run(texts_per_encoder: list[list[str]], length: int | None) -> tuple[Tensor, Tensor]:
        hidden, pooled = [], None
        for texts, tok, enc in zip(texts_per_encoder, tokenizers, text_encoders, strict=True):
            max_length = length or tok.model_max_length
            ids = tok(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
            out = enc(ids.input_ids.to(device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    embeds, pooled = run([prompts, prompts_2], None)
    out_dtype = text_encoders[-1].dtype
    embeds, pooled = _repeat(embeds.to(out_dtype), num_images), _repeat(pooled, num_images)
    if cfg:
        if negative_prompt is None and force_zeros_for_empty_prompt:
            neg, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            negs = _negatives(negative_prompt, len(prompts))
            negs_2 = _negatives(negative_prompt_2, len(prompts)) if negative_prompt_2 is not None else negs
            neg, neg_pooled = run([negs, negs_2], embeds.shape[1])
            neg, neg_pooled = _repeat(neg.to(out_dtype), num_images), _repeat(neg_pooled, num_images)
        embeds, pooled = torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled])
    return PromptEmbeds(embeds.to(dtype), pooled.to(dtype))
