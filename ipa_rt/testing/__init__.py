"""Tiny random checkpoints in the real on-disk formats, for tests, demos and offline examples.

Everything here writes what users download from a hub, only smaller, and is then loaded through the same code users
use; nothing touches a model hub. :mod:`.unet`: SD1.5/SDXL diffusers folders, CLIP image encoders, h94 IP-Adapters of
every variant, LoRA, ControlNet, T2I-Adapter, motion adapters; :mod:`.flux`: Flux.1 and Chroma folders (with a locally
made T5 tokenizer) and XLabs-AI Flux IP-Adapters; :mod:`.kolors`, :mod:`.sd3`: Kolors and SD3.5 with their adapters;
:mod:`.hub`: a hub cache written from local files, so hub ids resolve offline.
"""

from .flux import (
    FLUX_ENCODER,
    flux_adapter_state_dict,
    save_flux_adapter,
    write_flux_adapter,
    write_flux_model,
    write_t5_tokenizer,
)
from .hub import write_hub_cache
from .kolors import (
    KOLORS_ENCODER,
    kolors_adapter_state_dict,
    write_chatglm_tokenizer,
    write_kolors_adapter,
    write_kolors_model,
)
from .sd3 import (
    SD3_ENCODER,
    save_sd3_adapter,
    sd3_adapter_state_dict,
    write_sd3_adapter,
    write_sd3_model,
    write_siglip_encoder,
)
from .unet import (
    ENCODER_CONFIG,
    EXAMPLE_UNET,
    FACE_ID_DIM,
    LORA_RANK,
    SCHEDULER_CONFIG,
    SD15_UNET,
    SDXL_UNET,
    TEXT_CONFIG,
    VAE_CONFIG,
    VARIANT_NAMES,
    adapter_state_dict,
    make_image,
    save_adapter,
    write_adapter,
    write_base_model,
    write_controlnet,
    write_example,
    write_image_encoder,
    write_lora,
    write_motion_adapter,
    write_t2i_adapter,
    write_taesd,
    write_tokenizer,
)

__all__ = [
    "ENCODER_CONFIG",
    "EXAMPLE_UNET",
    "FACE_ID_DIM",
    "FLUX_ENCODER",
    "KOLORS_ENCODER",
    "LORA_RANK",
    "SCHEDULER_CONFIG",
    "SD3_ENCODER",
    "SD15_UNET",
    "SDXL_UNET",
    "TEXT_CONFIG",
    "VAE_CONFIG",
    "VARIANT_NAMES",
    "adapter_state_dict",
    "flux_adapter_state_dict",
    "kolors_adapter_state_dict",
    "make_image",
    "save_adapter",
    "save_flux_adapter",
    "save_sd3_adapter",
    "sd3_adapter_state_dict",
    "write_adapter",
    "write_base_model",
    "write_chatglm_tokenizer",
    "write_controlnet",
    "write_example",
    "write_flux_adapter",
    "write_flux_model",
    "write_hub_cache",
    "write_image_encoder",
    "write_kolors_adapter",
    "write_kolors_model",
    "write_lora",
    "write_motion_adapter",
    "write_sd3_adapter",
    "write_sd3_model",
    "write_siglip_encoder",
    "write_t2i_adapter",
    "write_t5_tokenizer",
    "write_taesd",
    "write_tokenizer",
]
