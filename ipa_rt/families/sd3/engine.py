"""SD3.5 transformer engines: ONNX Runtime and OpenVINO (TensorRT through the same contract, untested here).

The adapter tokens depend on the timestep, so the engine holds the per-step part of the TimeResampler with the
transformer; its inputs are the pipeline's tensors (:data:`INPUTS`), ``ip_features`` (``proj_in`` of the SigLIP
features, which :class:`SD3ImageSide` computes once per call) and the 0-d ``ip_scale``. :class:`EngineTransformer`
takes the transformer's place in diffusers' pipeline (docs/guides/sd3.md, "Engines": what is folded into the graph,
static shapes).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import Tensor, nn

from ...errors import ConfigError
from ...export.contracts import Contract
from ..base import EngineStandIn
from .adapter import SD3ImageSide
from .pipelines import SD3AdapterMixin

NETWORK = "transformer"
INPUTS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")  # diffusers' SD3 call, in order


class ExportedTransformer(nn.Module):
    """The traceable network: the per-step resampler, then the transformer with ipa_rt's processors."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, *args: Tensor) -> Tensor:
        kwargs = dict(zip(INPUTS, args[: len(INPUTS)], strict=True))
        features, scale = args[len(INPUTS) :]
        side: SD3ImageSide = self.transformer.image_proj
        tokens, temb = side.step(side.around(features, features), kwargs["timestep"], scale)
        branch = {"ip_hidden_states": tokens, "temb": temb}  # what diffusers' transformer passes its processors
        return self.transformer(**kwargs, joint_attention_kwargs=branch, return_dict=False)[0]


class AdapterOnly(SD3AdapterMixin):
    """The pipelines' mixin around a bare transformer: the build installs the adapter exactly as ``load_ip_adapter``
    does, without loading the text encoders or the VAE."""

    def __init__(self, transformer: nn.Module) -> None:
        self.transformer = transformer


def sd3_contract(transformer: nn.Module, shapes: dict[str, int], text: int, vae_scale: int, images: int) -> Contract:
    """``noise_pred = transformer(*INPUTS, ip_features, ip_scale)`` at the build's size: ``text`` tokens (CLIP's and
    T5's), ``images`` SigLIP tokens; rows range over 1..2·batch."""
    cfg, side = transformer.config, transformer.image_proj
    step = vae_scale * cfg.patch_size
    if shapes["height"] % step or shapes["width"] % step:
        raise ConfigError(f"height and width must be divisible by {step}; got {shapes['height']}x{shapes['width']}")
    rows, g = 2 * shapes["batch"], torch.Generator().manual_seed(0)
    latent = (cfg.in_channels, shapes["height"] // vae_scale, shapes["width"] // vae_scale)
    inputs = {
        "hidden_states": torch.randn(rows, *latent, generator=g),
        "encoder_hidden_states": torch.randn(rows, text, cfg.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(rows, cfg.pooled_projection_dim, generator=g),
        "timestep": torch.full((rows,), 500.0),
        "ip_features": torch.randn(rows, images, side.proj_in.out_features, generator=g),
        "ip_scale": torch.tensor(1.0),  # 0-d, as the side's scale
    }
    module = ExportedTransformer(transformer).eval()
    return Contract(NETWORK, module, inputs, ("noise_pred",), tuple(inputs)[:-1], (1, rows, rows))


def image_tokens(base: str, image_encoder: str | None) -> int:
    """SigLIP's token count, ``(image_size / patch_size)²``: the length of ``ip_features`` (``image_encoder``: where
    the build found the encoder; None: the base folder's own)."""
    from transformers import SiglipVisionConfig

    where = (image_encoder, "") if image_encoder is not None else (base, "image_encoder")
    try:
        cfg = SiglipVisionConfig.from_pretrained(where[0], subfolder=where[1])
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"no SigLIP image encoder config at '{where[0]}' {where[1]}: SD3.5 engines take its token count from "
            "it; pass image_encoder= (google/siglip-so400m-patch14-384 for InstantX's adapter)"
        ) from exc
    return (cfg.image_size // cfg.patch_size) ** 2


class EngineTransformer(EngineStandIn):
    """Stands in for the transformer in diffusers' SD3 pipeline and runs the engine (see the module docstring).
    ``structure`` is the transformer's module tree on the meta device (no weights): what the adapter loader counts
    the joint blocks' processors in."""

    what = "an SD3.5 engine"

    def __init__(self, engine: Any, config: Any, shapes: dict[str, list[int]], built: dict[str, int]) -> None:
        super().__init__(engine, config, shapes, {k: built[k] for k in ("height", "width", "max_sequence_length")})
        with torch.device("meta"):
            self.structure = [SD3Transformer2DModel.from_config(dict(config))]  # a list: not a submodule
        self.image_proj: SD3ImageSide | None = None

    @property
    def attn_processors(self) -> dict[str, Any]:
        return self.structure[0].attn_processors

    def install_image_side(self, side: SD3ImageSide | None) -> None:
        self.claim(side is not None)
        self.image_proj = side.to(device=self.device, dtype=torch.float32) if side is not None else None

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        pooled_projections: Tensor,
        timestep: Tensor,
        block_controlnet_hidden_states: Any = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        skip_layers: Any = None,
    ) -> Any:
        if block_controlnet_hidden_states is not None or skip_layers is not None:
            raise ConfigError(
                "ControlNet residuals and skip_guidance_layers are not part of SD3.5 engines; use backend='torch'"
            )
        rows = hidden_states.shape[0]
        feeds = {
            "hidden_states": hidden_states,
            "encoder_hidden_states": encoder_hidden_states,
            "pooled_projections": pooled_projections,
            "timestep": torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(rows),
        }
        embeds, side = (joint_attention_kwargs or {}).get("ip_adapter_image_embeds"), self.image_proj
        if side is not None and embeds is not None:
            with torch.no_grad():
                feeds["ip_features"] = side.prepare(embeds).features  # once per call: memoised on the embeddings
            feeds["ip_scale"] = side.scale
        else:  # no image prompt: zero features and a zero scale add exactly nothing
            feeds["ip_features"] = torch.zeros([rows, *self.shapes["ip_features"][1:]])
            feeds["ip_scale"] = torch.zeros(())
        (out,) = self.engine(feeds)
        return self.output(out, return_dict, Transformer2DModelOutput)
