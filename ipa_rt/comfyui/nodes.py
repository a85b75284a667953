"""The node pack: ComfyUI's V3 schema, pinned to ``comfy_api.v0_0_2``. Nodes hold no state (pipelines are cached
in :mod:`.pipelines`); ipa_rt itself is imported when a node first runs, not when ComfyUI loads the pack."""

from __future__ import annotations

from dataclasses import replace

from comfy_api.v0_0_2 import ComfyExtension, io

from .weights import WEIGHT_TYPES

Pipeline = io.Custom("IPA_RT_PIPELINE")
Embeds = io.Custom("IPA_RT_EMBEDS")
Adapters = io.Custom("IPA_RT_ADAPTERS")
CATEGORY = "ipa_rt"
BACKENDS = ["torch", "onnxruntime", "openvino", "tensorrt"]
PRECISIONS = ["fp32", "fp16", "bf16", "int8", "int8-weights"]
COMBINE = ["concat", "average", "norm_average", "add", "subtract"]
SCHEDULERS = ["default", "ddim", "euler", "euler_a", "dpm++2m", "dpm++2m_karras", "lcm", "pndm"]
DIFFUSERS_MATH = (
    " Follows diffusers' IP-Adapter math (the oracle ipa_rt is tested against), not ComfyUI_IPAdapter_plus': "
    "CLIP preprocessing is the image encoder's CLIPImageProcessor, the default negative is diffusers' (zero "
    "embeddings, or the encoder on a zero image for plus/hidden-state variants)."
)


def _device() -> str:
    import comfy.model_management

    return str(comfy.model_management.get_torch_device())


def engine_inputs() -> list:
    """What both loaders ask of the engines: backend, precision and size."""
    return [
        io.Combo.Input("backend", options=BACKENDS, default="torch"),
        io.Combo.Input(
            "precision",
            options=PRECISIONS,
            default="fp32",
            tooltip="torch/ONNX/TensorRT dtype, or OpenVINO's compute precision",
        ),
        io.Int.Input(
            "engine_height", default=0, min=0, max=4096, step=8, tooltip="engines' size (0: the model's default)"
        ),
        io.Int.Input("engine_width", default=0, min=0, max=4096, step=8),
    ]


def adapter_inputs() -> list:
    """The two adapter dropdowns of both model-folder nodes (``models/ipadapter``; the second may be None)."""
    from .folders import IPADAPTER, NONE, files

    adapters = files(IPADAPTER)
    return [
        io.Combo.Input("ip_adapter", options=adapters, tooltip="IP-Adapter file (models/ipadapter)"),
        io.Combo.Input("ip_adapter_2", options=[NONE, *adapters], default=NONE, tooltip="a second adapter"),
    ]


class LoadPipeline(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IpaRtLoadPipeline",
            display_name="ipa_rt Load Pipeline",
            category=CATEGORY,
            description="Loads a diffusers base model with IP-Adapter checkpoints (h94 layouts) and the image "
            "encoder, on PyTorch or built into engines (cached; built once), or an engine folder `ipa_rt build` "
            "wrote. LoRA is fused at load." + DIFFUSERS_MATH,
            inputs=[
                io.String.Input(
                    "base",
                    default="",
                    tooltip="diffusers folder or hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)",
                ),
                io.String.Input(
                    "ip_adapter",
                    default="",
                    multiline=True,
                    tooltip="one adapter per line: a file, or "
                    "repo:subfolder/weight_name (h94/IP-Adapter:models/ip-adapter_sd15.safetensors)",
                ),
                io.String.Input(
                    "image_encoder", default="", tooltip="CLIP vision folder (empty: image_encoder/ beside the adapter)"
                ),
                *engine_inputs(),
                io.String.Input("lora", default="", tooltip="LoRA file fused into the weights (empty: none)"),
                io.Float.Input("lora_strength", default=1.0, min=-4.0, max=4.0, step=0.05),
                io.String.Input(
                    "engine_folder",
                    default="",
                    tooltip="load engines from this folder instead (the other inputs are then ignored)",
                ),
            ],
            outputs=[Pipeline.Output(display_name="pipeline")],
        )

    @classmethod
    def execute(
        cls,
        base,
        ip_adapter,
        image_encoder,
        backend,
        precision,
        engine_height,
        engine_width,
        lora,
        lora_strength,
        engine_folder,
    ) -> io.NodeOutput:
        from .pipelines import LoadSpec, load_pipeline

        adapters = tuple(line.strip() for line in ip_adapter.splitlines() if line.strip())
        spec = LoadSpec(
            base.strip(),
            adapters,
            image_encoder.strip(),
            backend,
            precision,
            lora.strip(),
            float(lora_strength),
            engine_folder.strip(),
            engine_height,
            engine_width,
            _device(),
        )
        return io.NodeOutput(load_pipeline(spec))


class LoadFromFolders(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from .folders import NONE, diffusers_folders, files

        return io.Schema(
            node_id="IpaRtLoadFromFolders",
            display_name="ipa_rt Load Pipeline (model folders)",
            category=CATEGORY,
            description="ipa_rt Load Pipeline with dropdowns of ComfyUI's model folders: the base from "
            "models/checkpoints (one file, SD1.5/SDXL original layout) or models/diffusers (a folder), the "
            "IP-Adapter from models/ipadapter (as ComfyUI_IPAdapter_plus registers it), the image encoder from "
            "models/clip_vision, a LoRA from models/loras (fused at load)." + DIFFUSERS_MATH,
            inputs=[
                io.Combo.Input(
                    "checkpoint",
                    options=[NONE, *files("checkpoints")],
                    default=NONE,
                    tooltip="single-file base (models/checkpoints); None: the diffusers folder is the base",
                ),
                io.Combo.Input(
                    "diffusers",
                    options=[NONE, *diffusers_folders()],
                    default=NONE,
                    tooltip="diffusers folder (models/diffusers): the base, or with a checkpoint its configs and "
                    "tokenizer (diffusers' config=)",
                ),
                *adapter_inputs(),
                io.Combo.Input(
                    "clip_vision",
                    options=[NONE, *files("clip_vision")],
                    default=NONE,
                    tooltip="image encoder file (models/clip_vision: transformers' or OpenCLIP's key names, e.g. "
                    "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors); None: image_encoder/ beside the adapter",
                ),
                io.Combo.Input("lora", options=[NONE, *files("loras")], default=NONE, tooltip="fused into the weights"),
                io.Float.Input("lora_strength", default=1.0, min=-4.0, max=4.0, step=0.05),
                *engine_inputs(),
            ],
            outputs=[Pipeline.Output(display_name="pipeline")],
        )

    @classmethod
    def validate_inputs(
        cls,
        checkpoint: str = "None",
        diffusers: str = "None",
        ip_adapter: str = "",
        ip_adapter_2: str = "None",
        clip_vision: str = "None",
        lora: str = "None",
        **_: object,
    ) -> bool | str:
        from .folders import unknown_name

        names = {"checkpoint": checkpoint, "diffusers": diffusers, "ip_adapter": ip_adapter}
        names |= {"ip_adapter_2": ip_adapter_2, "clip_vision": clip_vision, "lora": lora}
        return unknown_name(names) or True

    @classmethod
    def execute(
        cls,
        checkpoint: str,
        diffusers: str,
        ip_adapter: str,
        ip_adapter_2: str,
        clip_vision: str,
        lora: str,
        lora_strength: float,
        backend: str,
        precision: str,
        engine_height: int,
        engine_width: int,
    ) -> io.NodeOutput:
        from .folders import load_spec
        from .pipelines import load_pipeline

        spec = load_spec(checkpoint, diffusers, (ip_adapter, ip_adapter_2), clip_vision, lora, float(lora_strength))
        engines = {"backend": backend, "precision": precision, "height": engine_height, "width": engine_width}
        return io.NodeOutput(load_pipeline(replace(spec, device=_device(), **engines)))


class EncodeImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IpaRtEncodeImage",
            display_name="ipa_rt Encode Reference Image",
            category=CATEGORY,
            description="Encodes reference image(s) for one adapter of the pipeline (cached by content); an "
            "optional negative image replaces the unconditional rows." + DIFFUSERS_MATH,
            inputs=[
                Pipeline.Input("pipeline"),
                io.Image.Input("image", tooltip="a batch of images is several references for this adapter"),
                io.Int.Input("adapter_index", default=0, min=0, max=15),
                io.Combo.Input("combine_embeds", options=COMBINE, default="concat"),
                io.Image.Input("negative_image", optional=True),
            ],
            outputs=[Embeds.Output(display_name="embeds")],
        )

    @classmethod
    def execute(cls, pipeline, image, adapter_index, combine_embeds, negative_image=None) -> io.NodeOutput:
        from .pipelines import comfy_to_pil, encode

        negative = comfy_to_pil(negative_image, "negative_image") if negative_image is not None else None
        return io.NodeOutput(encode(pipeline, adapter_index, comfy_to_pil(image, "image"), negative, combine_embeds))


class Adapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IpaRtAdapter",
            display_name="ipa_rt IP-Adapter",
            category=CATEGORY,
            description="Weight, weight type, start/end and mask for one adapter; chain them for several. The "
            "weight is a runtime input of the scale tensor (an engine input): changing it, the weight type or "
            "start/end never rebuilds anything. Weight types: the depth ramps and block attenuations of "
            "ComfyUI_IPAdapter_plus over the attention blocks; style transfer / composition are diffusers' "
            "InstantStyle blocks. Start/end: fractions of the steps on the ipa_rt Sampler (diffusers), "
            "ComfyUI's sigma window on an ipa_rt MODEL.",
            inputs=[
                Embeds.Input("embeds"),
                io.Float.Input("weight", default=1.0, min=-1.0, max=5.0, step=0.05),
                io.Combo.Input("weight_type", options=list(WEIGHT_TYPES), default="linear"),
                io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.01),
                io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.01),
                io.Mask.Input("attention_mask", optional=True),
                Adapters.Input("previous", optional=True),
            ],
            outputs=[Adapters.Output(display_name="adapters")],
        )

    @classmethod
    def validate_inputs(cls, start_at=0.0, end_at=1.0, **_) -> bool | str:
        if start_at > end_at:
            return f"start_at ({start_at}) is after end_at ({end_at}); expected start_at <= end_at"
        return True

    @classmethod
    def execute(cls, embeds, weight, weight_type, start_at, end_at, attention_mask=None, previous=None):
        from .pipelines import AdapterSettings

        here = AdapterSettings(embeds, float(weight), weight_type, float(start_at), float(end_at), attention_mask)
        return io.NodeOutput([*(previous or []), here])


class Sampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IpaRtSampler",
            display_name="ipa_rt Sampler",
            category=CATEGORY,
            description="One ipa_rt call: text-to-image with the adapters, on the pipeline's backend, giving "
            "diffusers' output for the same files, seed and settings. LATENT is ComfyUI's (unscaled)." + DIFFUSERS_MATH,
            inputs=[
                Pipeline.Input("pipeline"),
                io.String.Input("positive", multiline=True, default=""),
                io.String.Input("negative", multiline=True, default=""),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Int.Input("steps", default=30, min=1, max=200),
                io.Float.Input("cfg", default=7.5, min=0.0, max=30.0, step=0.1),
                io.Combo.Input("scheduler", options=SCHEDULERS, default="default"),
                io.Int.Input("width", default=512, min=64, max=4096, step=8),
                io.Int.Input("height", default=512, min=64, max=4096, step=8),
                Adapters.Input("adapters", optional=True),
            ],
            outputs=[io.Image.Output(display_name="IMAGE"), io.Latent.Output(display_name="LATENT")],
        )

    @classmethod
    def execute(cls, pipeline, positive, negative, seed, steps, cfg, scheduler, width, height, adapters=None):
        from .pipelines import sample

        image, latents = sample(pipeline, adapters, positive, negative, seed, steps, cfg, scheduler, width, height)
        return io.NodeOutput(image, {"samples": latents})


class ModelFromPipeline(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IpaRtModel",
            display_name="ipa_rt Engine as MODEL",
            category=CATEGORY,
            description="ComfyUI MODEL, CLIP and VAE from an ipa_rt pipeline (engines or torch), for KSampler and "
            "ComfyUI's samplers; apply IP-Adapter with 'ipa_rt Apply IP-Adapter to MODEL'. SD1.5 and SDXL "
            "families (SDXL's `y` is read back into diffusers' text_embeds and time_ids). Other model patches, "
            "ControlNets and LoRA patches are refused with an error rather than dropped.",
            inputs=[Pipeline.Input("pipeline")],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls, pipeline) -> io.NodeOutput:
        from .model import IpaRtClip, IpaRtVae, make_model

        # a UNet-only pipeline (ipa_rt Engine from MODEL's) has no CLIP or VAE to give: refused, naming it
        pipeline.require_full_model("pipeline (ipa_rt Engine as MODEL gives the pipeline's CLIP and VAE)")
        return io.NodeOutput(make_model(pipeline), IpaRtClip(pipeline), IpaRtVae(pipeline))


class EngineFromModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IpaRtEngineFromModel",
            display_name="ipa_rt Engine from MODEL",
            category=CATEGORY,
            description="ComfyUI's own MODEL (Load Checkpoint, with the LoRAs Load LoRA applied: baked into the "
            "weights, which name the engines) as an ipa_rt MODEL on engines or torch, with IP-Adapter live through "
            "'ipa_rt Apply IP-Adapter to MODEL'; the image encoder is Load CLIP Vision's (the pipeline output feeds "
            "'ipa_rt Encode Reference Image'). CLIP and VAE stay ComfyUI's. SD1.5 and SDXL. The weights are written "
            "once to ipa_rt's cache (named by their content): an unchanged graph reuses its engines." + DIFFUSERS_MATH,
            inputs=[
                io.Model.Input("model", tooltip="Load Checkpoint's MODEL (LoRAs applied by Load LoRA included)"),
                io.ClipVision.Input("clip_vision", tooltip="Load CLIP Vision's CLIP_VISION (the adapter's encoder)"),
                *adapter_inputs(),
                *engine_inputs(),
            ],
            outputs=[io.Model.Output(), Pipeline.Output(display_name="pipeline")],
        )

    @classmethod
    def validate_inputs(cls, ip_adapter: str = "", ip_adapter_2: str = "None", **_: object) -> bool | str:
        from .folders import unknown_name

        return unknown_name({"ip_adapter": ip_adapter, "ip_adapter_2": ip_adapter_2}) or True

    @classmethod
    def execute(
        cls,
        model,
        clip_vision,
        ip_adapter: str,
        ip_adapter_2: str,
        backend: str,
        precision: str,
        engine_height: int,
        engine_width: int,
    ) -> io.NodeOutput:
        from .folders import adapter_paths
        from .from_model import engine_from_model

        adapters = adapter_paths(ip_adapter, ip_adapter_2)
        size = (engine_height, engine_width)
        return io.NodeOutput(*engine_from_model(model, clip_vision, adapters, backend, precision, *size, _device()))


class ApplyToModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IpaRtApplyModel",
            display_name="ipa_rt Apply IP-Adapter to MODEL",
            category=CATEGORY,
            description="IP-Adapter on an ipa_rt MODEL: image tokens and the per-layer scale go to the engine's "
            "inputs (uncond rows get the negative tokens; start/end in ComfyUI's sigma space). A weight change "
            "between runs rewrites a tensor: no engine is rebuilt.",
            inputs=[io.Model.Input("model"), Adapters.Input("adapters")],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, adapters) -> io.NodeOutput:
        from ..errors import ConfigError
        from .model import KEY, IpaRtDiffusionModel, ip_options

        inner = getattr(model.model, "diffusion_model", None)
        if not isinstance(inner, IpaRtDiffusionModel):
            raise ConfigError(
                "model: not an ipa_rt MODEL; connect the MODEL output of 'ipa_rt Engine as MODEL' or 'ipa_rt Engine "
                "from MODEL'"
            )
        payload = ip_options(model, adapters, inner.pipe)
        clone = model.clone()
        clone.model_options.setdefault("transformer_options", {})[KEY] = payload
        return io.NodeOutput(clone)


class IpaRtExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [
            LoadPipeline,
            LoadFromFolders,
            EncodeImage,
            Adapter,
            Sampler,
            ModelFromPipeline,
            EngineFromModel,
            ApplyToModel,
        ]
