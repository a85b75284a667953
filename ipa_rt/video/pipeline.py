"""Video: AnimateDiff with IP-Adapter in one class, :class:`AnimateDiffPipeline`, shaped like diffusers'
``AnimateDiffPipeline``, ``AnimateDiffVideoToVideoPipeline`` (``video=`` + ``strength``) and
``AnimateDiffControlNetPipeline`` (``conditioning_frames=``).

A motion adapter turns the SD1.5 UNet into diffusers' ``UNetMotionModel`` (temporal layers between the spatial ones,
to which frames are a batch axis); the rest is the stills runtime, and frames are decoded in chunks so memory does
not grow with the clip (docs/guides/video.md: the image side once per call, repeated per frame).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from torch import Tensor
from tqdm.auto import tqdm

from ..controls.controlnet import load_folders
from ..core import PipelineCore
from ..errors import CheckpointError, ConfigError, ImageInputError, IncompatibleAdapterError, reject_engine_options
from ..export.build import register_video_pipeline
from ..models import BaseModel
from ..runtime import request as rq
from ..runtime.loop import static_call
from ..runtime.modes import retrieve_latents  # imported there under hushed (transformers' torchvision notes)

VIDEO_OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class ClipRequest(rq.Request):
    """``AnimateDiffPipeline.__call__``'s own arguments besides a still call's (``num_videos_per_prompt`` is
    ``num_images_per_prompt``); ``frames`` is settled from ``num_frames``, ``video`` or ``latents``."""

    num_frames: int | None = 16
    decode_chunk_size: int = 16
    video: Any = None
    conditioning_frames: Any = None


@dataclass
class VideoPipelineOutput:
    """``frames``: per video a list of PIL frames, numpy ``[B, F, H, W, 3]``, torch ``[B, F, 3, H, W]``, or
    latents ``[B, 4, F, h, w]`` for ``"latent"`` (diffusers' ``AnimateDiffPipelineOutput``)."""

    frames: Any


def load_motion_adapter(source: Any, dtype: torch.dtype, **hub_kwargs: Any) -> Any:
    """A diffusers ``MotionAdapter`` (folder, hub id or instance)."""
    from diffusers import MotionAdapter

    if source is None:
        raise ConfigError(
            "motion_adapter is required: a MotionAdapter folder or hub id (e.g. "
            "'guoyww/animatediff-motion-adapter-v1-5-2' or 'wangfuyun/AnimateLCM')"
        )
    path = os.fspath(source) if not isinstance(source, MotionAdapter) else None
    if path is not None and os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"motion_adapter '{path}' has no config.json; expected a diffusers MotionAdapter folder")
    if path is not None and os.path.isfile(os.path.join(path, "config.json")):
        import json

        kind = json.loads(open(os.path.join(path, "config.json")).read()).get("_class_name")
        if kind != "MotionAdapter":
            raise CheckpointError(f"motion_adapter '{path}' is a {kind!r}; expected a 'MotionAdapter' folder")
    return load_folders(source, MotionAdapter, "motion_adapter", dtype, **hub_kwargs)[0]


def motion_unet(model: BaseModel, adapter: Any) -> torch.nn.Module:
    """diffusers' ``UNetMotionModel.from_unet2d``, after checking that the adapter fits the base model."""
    from diffusers import UNetMotionModel

    if model.family.name != "sd15":
        raise ConfigError(
            f"AnimateDiff runs on SD1.5-family bases in ipa_rt; the base model is {model.family.name} "
            "(SDXL motion adapters / AnimateDiffSDXLPipeline are not supported)"
        )
    have, want = tuple(adapter.config.block_out_channels), tuple(model.unet.config.block_out_channels)
    if have != want:
        raise IncompatibleAdapterError(
            f"motion_adapter has block_out_channels {list(have)}, the base UNet has {list(want)}; expected a motion "
            "adapter for this base (SD1.5 motion adapters on SD1.5 bases; SDXL ones are not supported)"
        )
    try:
        unet = UNetMotionModel.from_unet2d(model.unet, adapter)
    except (ValueError, RuntimeError) as exc:
        raise IncompatibleAdapterError(f"motion_adapter does not fit the base UNet: {exc}") from exc
    return unet.eval()  # from_unet2d keeps the base UNet's dtype


@register_video_pipeline  # video builds load their models through this class
class AnimateDiffPipeline(PipelineCore):
    """AnimateDiff clips with IP-Adapter, the stills runtime underneath (see the module docstring).

    One class covers diffusers' three AnimateDiff pipelines because its call already routes by argument:
    ``video=`` makes it video-to-video, ``conditioning_frames=`` feeds the ControlNets; the image prompt,
    scales, presets, masks and step ranges are the stills pipeline's own.
    """

    video = True  # what an engine directory must hold to load into this class

    @classmethod
    @static_call
    def from_pretrained(
        cls,
        base: str | os.PathLike,
        ip_adapter: Any = None,
        image_encoder: Any = None,
        *,
        motion_adapter: Any = None,
        backend: str = "torch",
        engine_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> AnimateDiffPipeline:
        """``Pipeline.from_pretrained``'s arguments plus ``motion_adapter``: a ``MotionAdapter`` folder, hub id
        or instance. ``controlnet=`` loads ControlNets run on every frame (``conditioning_frames=`` in the call).
        ``backend="onnxruntime"`` (or another engine backend) builds video engines into the cache, or reuses them;
        ``engine_options`` then takes ``frames`` (default 16: clips of exactly that length) besides ``height``,
        ``width``, ``batch``, ``precision`` and ``rebuild``."""
        if kwargs.get("t2i_adapter") is not None:
            raise ConfigError("AnimateDiffPipeline does not take t2i_adapter= (diffusers has no such pipeline)")
        if backend != "torch":
            return cls._from_engines(base, ip_adapter, image_encoder, motion_adapter, backend, engine_options, kwargs)
        reject_engine_options(engine_options)
        dtype = kwargs.get("dtype", torch.float32)
        from ..pipeline import ENGINE_ARGUMENTS

        hub = {k: v for k, v in kwargs.items() if k not in ENGINE_ARGUMENTS | {"attention"}}  # the rest: hub kwargs
        adapter = load_motion_adapter(motion_adapter, dtype, **hub)

        def swap(model: BaseModel) -> None:
            model.unet = motion_unet(model, adapter)

        return super().from_pretrained(base, ip_adapter, image_encoder, model_hook=swap, **kwargs)

    @classmethod
    def _from_engines(cls, base, ip_adapter, image_encoder, motion_adapter, backend, options, kwargs):
        from ..pipeline import BACKENDS, engines_for

        if backend not in BACKENDS:
            raise ConfigError(f"backend {backend!r} is unknown; expected one of {BACKENDS}")
        if motion_adapter is None or not isinstance(motion_adapter, (str, os.PathLike)):
            raise ConfigError(f"backend {backend!r} needs motion_adapter as a folder or hub id")
        folder = engines_for(base, ip_adapter, image_encoder, backend, options, kwargs, motion_adapter)
        return cls.from_engine(folder, device=kwargs.get("device", "cpu"), scheduler=kwargs.get("scheduler"))

    @classmethod
    @static_call
    def from_engine(cls, folder: str | os.PathLike, device: torch.device | str = "cpu", scheduler: Any = None):
        """Clips from the video engines ``ipa_rt build --motion-adapter DIR --frames N`` wrote into ``folder``."""
        from ..export.loader import load_engine_pipeline

        return load_engine_pipeline(folder, device, scheduler, cls)

    @property
    def max_frames(self) -> int:
        """The most frames the motion modules' positional embeddings take."""
        return int(self.unet.config.motion_max_seq_length)

    @static_call
    def __call__(
        self,
        prompt: str | list[str] = "",
        num_frames: int | None = 16,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_videos_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[Tensor] | None = None,
        negative_ip_adapter_image: Any = None,
        ip_adapter_combine: str = "concat",
        output_type: str = "pil",
        cross_attention_kwargs: dict[str, Any] | None = None,
        decode_chunk_size: int = 16,
        video: Any = None,
        strength: float = 0.8,
        conditioning_frames: Any = None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        guess_mode: bool = False,
    ) -> VideoPipelineOutput:
        """Generate clips: txt2video; ``video=`` (a list of frames): video-to-video with ``strength``;
        ``conditioning_frames=`` (a list of frames, or one list per ControlNet) with ControlNets loaded. The
        other arguments are diffusers' AnimateDiff pipelines' (``num_videos_per_prompt`` plays
        ``num_images_per_prompt``)."""
        req = _resolve(self, ClipRequest(
            prompt=prompt, num_frames=num_frames, height=height, width=width, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, negative_prompt=negative_prompt, num_images_per_prompt=num_videos_per_prompt,
            eta=eta, generator=generator, latents=latents, ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds, negative_ip_adapter_image=negative_ip_adapter_image,
            ip_adapter_combine=ip_adapter_combine, output_type=output_type, decode_chunk_size=decode_chunk_size,
            cross_attention_kwargs=cross_attention_kwargs, video=video, strength=strength, guess_mode=guess_mode,
            conditioning_frames=conditioning_frames, controlnet_conditioning_scale=controlnet_conditioning_scale,
            control_guidance_start=control_guidance_start, control_guidance_end=control_guidance_end,
        ))  # fmt: skip
        inputs = rq.step_inputs(self, rq.request_parts(self, req, _prepare_control, _clip_setup))
        with tqdm(total=inputs.plan.steps, **{"desc": "denoising", **self.progress_bar_config}) as bar:
            out = self.loop.run(inputs, progress=bar, generator=req.generator)
        if output_type == "latent":
            return VideoPipelineOutput(out)
        return VideoPipelineOutput(self._decode_video(out, decode_chunk_size, output_type))

    def _decode_video(self, latents: Tensor, chunk: int, output_type: str) -> Any:
        """diffusers' ``decode_latents`` (frames in chunks, the same arithmetic) and ``postprocess_video``."""
        vae = self.vae
        latents = 1 / vae.config.scaling_factor * latents.to(next(vae.parameters()).dtype)
        b, c, f, h, w = latents.shape
        flat = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        pixels = torch.cat([self.decoder(flat[i : i + chunk]) for i in range(0, flat.shape[0], chunk)])
        video = pixels[None, :].reshape((b, f, -1, *pixels.shape[2:])).permute(0, 2, 1, 3, 4).float()
        return VideoProcessor(vae_scale_factor=self.vae_scale_factor).postprocess_video(video, output_type)


def _frame_list(value: Any, what: str) -> list:
    """A clip as a list of frames (PIL images, arrays or tensors), as diffusers' video processor takes it."""
    if isinstance(value, Tensor) and value.ndim == 4:
        return list(value)
    if not isinstance(value, (list, tuple)) or not value:
        raise ImageInputError(f"{what} is a {type(value).__name__}; expected a non-empty list of frames")
    return list(value)


def _resolve(pipe: AnimateDiffPipeline, req: ClipRequest) -> ClipRequest:
    """The call's mode, frame count and diffusers' defaults, validated before any work."""
    rq.check_call(req.output_type, VIDEO_OUTPUT_TYPES, req.num_inference_steps)
    chunk = req.decode_chunk_size
    if not isinstance(chunk, int) or chunk < 1:
        raise ConfigError(f"decode_chunk_size is {chunk!r}; expected a positive integer")
    frames, mode = req.num_frames, "txt2img"
    if req.video is not None:
        req.video = _frame_list(req.video, "video")
        frames, mode = len(req.video), "img2img"
    elif req.latents is not None and req.latents.ndim == 5:
        frames = req.latents.shape[2]
    if not isinstance(frames, int) or not 1 <= frames <= pipe.max_frames:
        raise ConfigError(
            f"num_frames is {frames!r}; the motion modules take 1 to {pipe.max_frames} frames "
            "(motion_max_seq_length of the motion adapter)"
        )
    req.frames = frames
    rq.settle(pipe, req, mode, float(req.guidance_scale), 1.0 if mode == "txt2img" else req.strength)
    if pipe.control is not None:
        if req.conditioning_frames is None:
            raise ImageInputError("ControlNets are loaded: pass one control frame per frame as conditioning_frames=")
        if req.copies != 1:
            raise ConfigError(
                f"a ControlNet video call makes one clip; this call makes {req.copies} (prompts x videos)"
            )
        if req.guess_mode and req.cfg:
            raise ConfigError(
                "guess_mode with classifier-free guidance is not supported for video (diffusers' "
                "AnimateDiffControlNetPipeline cannot run it either); use guidance_scale <= 1"
            )
    elif req.conditioning_frames is not None:
        raise ConfigError("conditioning_frames was given but no ControlNet is loaded (from_pretrained(controlnet=...))")
    if mode == "img2img" and req.latents is not None:
        raise ConfigError("latents= cannot be combined with video= (video-to-video makes its latents from the video)")
    rq.settle_size(pipe, req, req.height, req.width)
    if pipe.engine_manifest is not None:
        built = pipe.engine_manifest["shapes"]["frames"]
        if frames != built:
            raise ConfigError(
                f"the engines were built for clips of {built} frames; this call asks for {frames}: call with "
                f"num_frames={built}, or build engines for it (ipa_rt build ... --motion-adapter DIR --frames "
                f"{frames}, or engine_options={{'frames': {frames}}})"
            )
    return req


def _clip_setup(pipe: AnimateDiffPipeline, req: ClipRequest, plan, dtype: torch.dtype) -> rq.modes.ModeSetup:
    """The clip's initial latents ``[copies, C, frames, h, w]``: video-to-video encodes and noises the clip,
    txt2video draws them (or takes ``latents``), as diffusers' AnimateDiff pipelines do."""
    if req.mode == "img2img":
        return rq.modes.ModeSetup(_video_latents(pipe, req, plan, req.frames), req.height, req.width)
    vsf = pipe.vae_scale_factor
    shape = (req.copies, pipe.unet.config.in_channels, req.frames, req.height // vsf, req.width // vsf)
    if req.latents is not None and tuple(req.latents.shape) != shape:
        raise ConfigError(f"latents have shape {list(req.latents.shape)}; expected {list(shape)} for this call")
    init = rq.modes.txt2img(shape, plan, req.generator, pipe.device, dtype, req.latents)
    return rq.modes.ModeSetup(init, req.height, req.width)


def _video_latents(pipe: AnimateDiffPipeline, req: ClipRequest, plan, frames: int) -> Tensor:
    """``AnimateDiffVideoToVideoPipeline.prepare_latents``: encode the clip in chunks (posterior samples from the
    generator), scale, then noise to the first timestep."""
    device, dtype, vae = pipe.device, pipe.dtype, pipe.vae
    processor = VideoProcessor(vae_scale_factor=pipe.vae_scale_factor)
    try:
        pixels = processor.preprocess_video(req.video, height=req.height, width=req.width)
    except (ValueError, TypeError) as exc:
        raise ImageInputError(f"video: preprocessing failed ({exc}); expected a list of RGB frames") from exc
    pixels = pixels.permute(0, 2, 1, 3, 4).to(device=device, dtype=dtype)  # [videos, F, 3, H, W]
    if pixels.shape[0] != req.copies:
        raise ImageInputError(
            f"video gives {pixels.shape[0]} clip(s) for {req.copies} prompt(s) x videos per prompt; expected one "
            "clip per generated video (as diffusers' AnimateDiffVideoToVideoPipeline)"
        )
    vae_dtype = next(vae.parameters()).dtype
    chunk = req.decode_chunk_size
    clips = []
    for i, clip in enumerate(pixels):
        gen = req.generator[i] if isinstance(req.generator, list) else req.generator
        parts = [
            retrieve_latents(vae.encode(clip[j : j + chunk].to(vae_dtype)), generator=gen)
            for j in range(0, clip.shape[0], chunk)
        ]
        clips.append(torch.cat(parts).unsqueeze(0))
    init = vae.config.scaling_factor * torch.cat(clips).to(dtype)
    noise = randn_tensor(init.shape, generator=req.generator, device=device, dtype=dtype)
    t0 = plan.timesteps[:1].repeat(req.copies)
    return plan.scheduler.add_noise(init, noise, t0).permute(0, 2, 1, 3, 4)


def _prepare_control(pipe: AnimateDiffPipeline, req: ClipRequest) -> None:
    """``AnimateDiffControlNetPipeline.prepare_video`` for each ControlNet: one control frame per frame."""
    control, frames = pipe.control, req.frames
    if control is None:
        return
    count = len(control.nets)
    clips = req.conditioning_frames if count > 1 else [req.conditioning_frames]
    if count > 1 and (not isinstance(req.conditioning_frames, list) or len(clips) != count):
        raise ImageInputError(f"conditioning_frames must be a list of {count} clips (one per ControlNet)")
    control.set_scale(req.controlnet_conditioning_scale)
    images = []
    for i, clip in enumerate(clips):
        clip = _frame_list(clip, f"conditioning_frames[{i}]" if count > 1 else "conditioning_frames")
        if len(clip) != frames:
            raise ImageInputError(
                f"conditioning_frames{f'[{i}]' if count > 1 else ''} has {len(clip)} frames; expected {frames} "
                "(one control frame per generated frame)"
            )
        images.append(clip)
    clips = images if count > 1 else images[0]
    control.prepare_images(clips, req.height, req.width, frames, 1, req.cfg, pipe.device, req.guess_mode)
