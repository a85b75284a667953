"""AnimateDiff + IP-Adapter (ipa_rt.AnimateDiffPipeline) against diffusers' AnimateDiff pipelines: same files,
same seeds, final latents within PARITY_RTOL (fp32, CPU); decoded frames; the error paths."""

from __future__ import annotations

import pytest
import torch
from conftest import PARITY_RTOL, SIZE, assert_parity

import ipa_rt
from ipa_rt import testing as T

FRAMES = 6
CALL = dict(num_frames=FRAMES, height=SIZE, width=SIZE, output_type="latent")


@pytest.fixture(scope="module")
def motion(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("motion")
    return {
        "sd15": T.write_motion_adapter(root / "sd15", models.base("sd15"), max_frames=16),
        "sdxl_layout": T.write_motion_adapter(root / "sdxl", models.base("sdxl")),
        "controlnet": T.write_controlnet(root / "controlnet", models.base("sd15")),
    }


def reference(models, motion, adapters=(), scheduler="DDIMScheduler", kind="AnimateDiffPipeline", **kw):
    """diffusers' own AnimateDiff pipeline from the same files, through its public API."""
    import diffusers

    cls = getattr(diffusers, kind)
    adapter = diffusers.MotionAdapter.from_pretrained(motion["sd15"])
    pipe = cls.from_pretrained(models.base("sd15"), motion_adapter=adapter, **kw)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if adapters:
        names = [models.adapter("sd15", v).name for v in adapters]
        pipe.load_ip_adapter(str(models.adapter_dir("sd15")), subfolder="", weight_name=names)
    return pipe


def ours(models, motion, adapters=(), scheduler="ddim", **kw):
    paths = [models.adapter("sd15", v) for v in adapters] or None
    pipe = ipa_rt.AnimateDiffPipeline.from_pretrained(
        models.base("sd15"), paths, motion_adapter=motion["sd15"], scheduler=scheduler, **kw
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


TXT2VIDEO = {  # adapters, their scale(s), scheduler (ours, diffusers), steps, guidance
    "base_ddim_cfg": (("base",), 0.7, ("ddim", "DDIMScheduler"), 3, 7.5),
    "plus_lcm_4step": (("plus",), 0.8, ("lcm", "LCMScheduler"), 4, 1.0),
    "two_adapters_euler": (("base", "plus"), [0.6, 0.3], ("euler", "EulerDiscreteScheduler"), 3, 5.0),
    "style_preset_dpm": (("plus",), "style", ("dpm++2m", "DPMSolverMultistepScheduler"), 3, 6.0),
}


# two cases in the fast tier (CFG with DDIM, LCM without), every case in the whole suite
@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=() if c in ("base_ddim_cfg", "plus_lcm_4step") else pytest.mark.slow)
        for c in sorted(TXT2VIDEO)
    ],
)
def test_txt2video_matches_diffusers(models, motion, images, case):
    adapters, scale, (ours_sched, ref_sched), steps, guidance = TXT2VIDEO[case]
    ref = reference(models, motion, adapters, ref_sched)
    pipe = ours(models, motion, adapters, ours_sched)
    refs = [images[i] for i in range(len(adapters))]
    ref.set_ip_adapter_scale(ipa_rt.scale_preset(scale, "sd15") if scale == "style" else scale)
    pipe.set_ip_adapter_scale(scale)
    kw = dict(CALL, num_inference_steps=steps, guidance_scale=guidance)
    want = ref("a cat", ip_adapter_image=refs, generator=gen(), **kw).frames
    got = pipe("a cat", ip_adapter_image=[[r] for r in refs], generator=gen(), **kw).frames
    assert got.shape == (1, 4, FRAMES, SIZE // 2, SIZE // 2)
    assert_parity(got, want)


@pytest.mark.slow
def test_scale_zero_equals_diffusers_without_adapter_and_scale_changes_live(models, motion, images):
    ref = reference(models, motion)
    pipe = ours(models, motion, ("base",))
    kw = dict(CALL, num_inference_steps=3)
    want = ref("a cat", generator=gen(), **kw).frames
    pipe.set_ip_adapter_scale(0.0)
    got = pipe("a cat", ip_adapter_image=[images[0]], generator=gen(), **kw).frames
    assert_parity(got, want, tol=1e-6)  # a zero scale adds exact zeros: only the text path remains
    captures = pipe.loop.captures
    pipe.set_ip_adapter_scale(0.9)
    moved = pipe("a cat", ip_adapter_image=[images[0]], generator=gen(), **kw).frames
    assert (moved - got).norm() / got.norm() > 1e-3  # the live scale reaches every frame
    assert pipe.loop.captures == captures


@pytest.mark.slow
def test_unseeded_lcm_draws_from_the_global_rng_like_diffusers(models, motion, images):
    ref = reference(models, motion, ("base",), "LCMScheduler")
    pipe = ours(models, motion, ("base",), "lcm")
    kw = dict(CALL, num_inference_steps=4, guidance_scale=1.0)
    torch.manual_seed(11)
    want = ref("a cat", ip_adapter_image=images[0], **kw).frames
    torch.manual_seed(11)
    got = pipe("a cat", ip_adapter_image=[images[0]], **kw).frames
    assert_parity(got, want)


@pytest.mark.slow
def test_frame_count_changes_between_calls(models, motion, images):
    """The image keys/values are repeated per frame: a new frame count must not reuse the old buffers."""
    ref = reference(models, motion, ("base",))
    pipe = ours(models, motion, ("base",))
    for frames in (4, 7):
        kw = dict(CALL, num_frames=frames, num_inference_steps=2)
        want = ref("a cat", ip_adapter_image=images[0], generator=gen(), **kw).frames
        got = pipe("a cat", ip_adapter_image=[images[0]], generator=gen(), **kw).frames
        assert_parity(got, want)


@pytest.mark.slow
def test_video2video_matches_diffusers(models, motion, images):
    clip = [T.make_image(seed=20 + i, size=(SIZE, SIZE)) for i in range(FRAMES)]
    ref = reference(models, motion, ("plus",), kind="AnimateDiffVideoToVideoPipeline")
    pipe = ours(models, motion, ("plus",))
    kw = dict(height=SIZE, width=SIZE, output_type="latent", num_inference_steps=5, strength=0.6, guidance_scale=6.0)
    want = ref(video=clip, prompt="a cat", ip_adapter_image=images[1], generator=gen(2), **kw).frames
    got = pipe("a cat", video=clip, ip_adapter_image=[images[1]], generator=gen(2), **kw).frames
    assert_parity(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_controlnet_video_matches_diffusers(models, motion, images, guidance):
    from diffusers import ControlNetModel

    control = [T.make_image(seed=40 + i, size=(SIZE, SIZE)) for i in range(FRAMES)]
    net = ControlNetModel.from_pretrained(motion["controlnet"])
    ref = reference(models, motion, ("base",), kind="AnimateDiffControlNetPipeline", controlnet=net)
    pipe = ours(models, motion, ("base",), controlnet=motion["controlnet"])
    kw = dict(CALL, num_inference_steps=3, guidance_scale=guidance, controlnet_conditioning_scale=0.7,
              control_guidance_end=0.8)  # fmt: skip
    want = ref("a cat", conditioning_frames=control, ip_adapter_image=images[0], generator=gen(), **kw).frames
    got = pipe("a cat", conditioning_frames=control, ip_adapter_image=[images[0]], generator=gen(), **kw).frames
    assert_parity(got, want)


@pytest.mark.slow
def test_decoded_frames_match_diffusers_with_chunked_decode(models, motion, images):
    ref = reference(models, motion, ("base",))
    pipe = ours(models, motion, ("base",))
    kw = dict(CALL, num_inference_steps=2, output_type="pt", decode_chunk_size=4)  # 6 frames: chunks of 4 and 2
    want = ref("a cat", ip_adapter_image=images[0], generator=gen(), **kw).frames
    got = pipe("a cat", ip_adapter_image=[images[0]], generator=gen(), **kw).frames
    assert got.shape == want.shape == (1, FRAMES, 3, SIZE, SIZE)
    assert_parity(got, want, tol=PARITY_RTOL)
    pil = pipe("a cat", ip_adapter_image=[images[0]], generator=gen(), **dict(kw, output_type="pil")).frames
    assert len(pil) == 1 and len(pil[0]) == FRAMES and pil[0][0].size == (SIZE, SIZE)


def test_video_errors(models, motion, images, tmp_path):
    base = models.base("sd15")
    with pytest.raises(ipa_rt.IncompatibleAdapterError, match="block_out_channels"):
        ipa_rt.AnimateDiffPipeline.from_pretrained(base, motion_adapter=motion["sdxl_layout"])
    with pytest.raises(ipa_rt.ConfigError, match=r"SD1\.5"):
        ipa_rt.AnimateDiffPipeline.from_pretrained(models.base("sdxl"), motion_adapter=motion["sdxl_layout"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ipa_rt.CheckpointError, match=r"config\.json"):
        ipa_rt.AnimateDiffPipeline.from_pretrained(base, motion_adapter=empty)
    with pytest.raises(ipa_rt.CheckpointError, match="MotionAdapter"):
        ipa_rt.AnimateDiffPipeline.from_pretrained(base, motion_adapter=base / "unet")
    with pytest.raises(ipa_rt.ConfigError, match="motion_adapter is required"):
        ipa_rt.AnimateDiffPipeline.from_pretrained(base)
    pipe = ours(models, motion, ("base",), controlnet=motion["controlnet"])
    control = [T.make_image(seed=40 + i, size=(SIZE, SIZE)) for i in range(FRAMES)]
    with pytest.raises(ipa_rt.ConfigError, match="1 to 16 frames"):
        pipe("a cat", conditioning_frames=control, **dict(CALL, num_frames=17))
    with pytest.raises(ipa_rt.ImageInputError, match="has 5 frames; expected 6"):
        pipe("a cat", conditioning_frames=control[:5], **CALL)
    with pytest.raises(ipa_rt.ImageInputError, match="conditioning_frames="):
        pipe("a cat", **CALL)
    with pytest.raises(ipa_rt.ConfigError, match="guess_mode"):
        pipe("a cat", conditioning_frames=control, guess_mode=True, guidance_scale=7.5, **CALL)
    plain = ours(models, motion, ("base",))
    with pytest.raises(ipa_rt.ImageInputError, match="list of frames"):
        plain("a cat", video=images[0], **CALL)
    with pytest.raises(ipa_rt.ConfigError, match="no ControlNet"):
        plain("a cat", conditioning_frames=control, **CALL)


def test_cli_example_clip_is_a_playable_gif_and_video_to_video_reads_it(tmp_path, capsys):
    from PIL import Image

    from ipa_rt.cli import main

    clip = tmp_path / "clip.gif"
    assert main(["generate", "--example", "--frames", "8", "-o", str(clip)]) == 0
    with Image.open(clip) as im:
        assert im.format == "GIF" and im.n_frames == 8 and im.size == (32, 32) and im.info["loop"] == 0
        first = im.convert("RGB")
    assert len({px for px in first.getdata()}) > 1  # not a blank frame
    out = capsys.readouterr().out
    assert "motion adapter" in out and "wrote" in out
    again = tmp_path / "again.gif"
    assert main(["generate", "--example", "--video", str(clip), "--steps", "4", "-o", str(again)]) == 0
    with Image.open(again) as im:
        assert im.n_frames == 8


def test_cli_video_errors(tmp_path, capsys):
    from ipa_rt.cli import main

    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    target = tmp_path / "out.gif"
    assert main(["generate", "--example", "--video", str(bad), "-o", str(target)]) == 2
    assert "bad.mp4' cannot be read" in capsys.readouterr().err
    assert main(["generate", "--example", "--video", str(tmp_path / "none.gif"), "-o", str(target)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "--example", "--frames", "4", "-o", str(tmp_path / "clip.png")]) == 2
    assert "must end in one of" in capsys.readouterr().err
    assert main(["generate", "--example", "--frames", "64", "-o", str(target)]) == 2
    assert "num_frames is 64" in capsys.readouterr().err
    assert not target.exists() and not list(tmp_path.glob(".out.gif*"))  # nothing half-written


def test_video_writer_round_trip_and_atomicity(tmp_path):
    pytest.importorskip("av", reason="PyAV (ipa_rt[video]) writes MP4/WebM")
    from ipa_rt.video.io import read_video, write_video

    frames = [T.make_image(seed=i, size=(34, 30)) for i in range(5)]
    for name in ("clip.mp4", "clip.webm", "clip.gif"):
        write_video(tmp_path / name, frames)
        back = read_video(tmp_path / name)
        assert len(back) == 5
    with pytest.raises(ipa_rt.ConfigError, match="extension"):
        write_video(tmp_path / "clip.avi", frames)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.gif", "clip.mp4", "clip.webm"]


@pytest.mark.slow
def test_regional_masks_and_per_image_scales_in_a_clip(models, motion, images):
    from test_masks import masks

    scale = [[0.7, 0.4], 0.5]  # adapter 0: two masked images with their own scales; adapter 1: unmasked
    ref = reference(models, motion, ("plus", "base"))
    pipe = ours(models, motion, ("plus", "base"))
    for p in (ref, pipe):
        p.set_ip_adapter_scale(scale)
    kw = dict(
        CALL,
        num_inference_steps=2,
        ip_adapter_image=[[images[0], images[1]], images[2]],
        cross_attention_kwargs={"ip_adapter_masks": [masks(), None]},
    )
    want = ref("a cat", generator=gen(), **kw).frames
    got = pipe("a cat", generator=gen(), **kw).frames
    assert_parity(got, want)


@pytest.mark.slow
def test_animatelcm_recipe_lora_fused_into_the_motion_unet(models, motion, images, tmp_path):
    """AnimateLCM's recipe: LCM scheduler, 4 steps, guidance 1, a LoRA fused at load (diffusers: load + fuse)."""
    lora = T.write_lora(tmp_path / "lcm_lora.safetensors", models.base("sd15"))
    ref = reference(models, motion, ("base",), "LCMScheduler")
    ref.load_lora_weights(str(tmp_path), weight_name=lora.name, adapter_name="lcm")
    ref.fuse_lora()
    ref.unload_lora_weights()
    pipe = ours(models, motion, ("base",), "lcm", lora=lora)
    kw = dict(CALL, num_inference_steps=4, guidance_scale=1.0)
    want = ref("a cat", ip_adapter_image=images[0], generator=gen(), **kw).frames
    got = pipe("a cat", ip_adapter_image=[images[0]], generator=gen(), **kw).frames
    assert_parity(got, want)


@pytest.fixture(scope="module")
def video_engines(models, motion, tmp_path_factory):
    """ONNX Runtime video engines for clips of FRAMES frames, built through the CLI."""
    pytest.importorskip("onnxruntime", reason="ONNX Runtime (ipa_rt[onnx]) runs the engines")
    from ipa_rt.cli import main

    out = tmp_path_factory.mktemp("video-engines")
    argv = ["build", str(models.base("sd15")), "--ip-adapter", str(models.adapter("sd15", "plus")),
            "--motion-adapter", str(motion["sd15"]), "--frames", str(FRAMES), "--height", str(SIZE),
            "--width", str(SIZE), "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    return out


@pytest.mark.slow
def test_onnxruntime_video_engines_match_diffusers_with_live_scale(models, motion, images, video_engines):
    ref = reference(models, motion, ("plus",))
    pipe = ipa_rt.AnimateDiffPipeline.from_engine(video_engines, scheduler="ddim")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.engine_manifest["shapes"]["frames"] == FRAMES and pipe.backend == "onnxruntime"
    kw = dict(CALL, num_inference_steps=3)
    for scale in (0.7, 0.2):  # the scale is an engine input: nothing rebuilds
        ref.set_ip_adapter_scale(scale)
        pipe.set_ip_adapter_scale(scale)
        want = ref("a cat", ip_adapter_image=images[0], generator=gen(), **kw).frames
        got = pipe("a cat", ip_adapter_image=[images[0]], generator=gen(), **kw).frames
        assert_parity(got, want, tol=1e-3)
    with pytest.raises(ipa_rt.ConfigError, match=f"clips of {FRAMES} frames; this call asks for 4"):
        pipe("a cat", **dict(CALL, num_frames=4))
    with pytest.raises(ipa_rt.ConfigError, match=r"AnimateDiffPipeline\.from_engine"):
        ipa_rt.Pipeline.from_engine(video_engines)


@pytest.mark.slow
def test_video_unet_profile_has_a_row_per_frame_for_text_and_image_tokens(video_engines):
    """What TensorRT's optimisation profile is built from (TensorRT cannot run here): the motion UNet's text and
    image-token inputs range over ``frames`` rows per sample row, the sample over sample rows."""
    from ipa_rt.export.manifest import read_manifest

    inputs = read_manifest(video_engines)["networks"]["unet"]["inputs"]
    rows = [shape[0] for shape in inputs["sample"]["profile"]]
    assert inputs["sample"]["profile"][0][2] == FRAMES
    for name in ("encoder_hidden_states", "ip_tokens_0"):
        assert [shape[0] for shape in inputs[name]["profile"]] == [FRAMES * r for r in rows]


@pytest.fixture(scope="module")
def openvino_video_engines(models, motion, video_engines, tmp_path_factory):
    """OpenVINO video engines from the same ONNX export (the export cache keeps it: only the conversion runs)."""
    pytest.importorskip("openvino", reason="OpenVINO (ipa_rt[openvino]) runs the engines")
    from ipa_rt.cli import main

    out = tmp_path_factory.mktemp("video-engines-openvino")
    argv = ["build", str(models.base("sd15")), "--ip-adapter", str(models.adapter("sd15", "plus")),
            "--motion-adapter", str(motion["sd15"]), "--frames", str(FRAMES), "--height", str(SIZE),
            "--width", str(SIZE), "--backend", "openvino", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    return out


@pytest.mark.slow
def test_openvino_video_engines_match_diffusers_with_live_scale(models, motion, images, openvino_video_engines):
    ref = reference(models, motion, ("plus",), scheduler="LCMScheduler")
    pipe = ipa_rt.AnimateDiffPipeline.from_engine(openvino_video_engines, scheduler="lcm")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.backend == "openvino" and pipe.engine_manifest["precision"] == "fp32"
    kw = dict(CALL, num_inference_steps=2, guidance_scale=1.0)
    for scale in (0.9, 0.0):  # the scale is an engine input; 0 is exactly text-only
        ref.set_ip_adapter_scale(scale)
        pipe.set_ip_adapter_scale(scale)
        want = ref("a cat", ip_adapter_image=images[1], generator=gen(2), **kw).frames
        got = pipe("a cat", ip_adapter_image=[images[1]], generator=gen(2), **kw).frames
        assert_parity(got, want, tol=1e-3)


@pytest.mark.slow
def test_cli_generates_a_clip_from_video_engines(video_engines, images, tmp_path):
    from PIL import Image

    from ipa_rt.cli import main

    ref = tmp_path / "ref.png"
    images[0].save(ref)
    clip = tmp_path / "clip.gif"
    assert (
        main(["generate", "--engine", str(video_engines), "--ip-image", str(ref), "--steps", "2", "-o", str(clip)]) == 0
    )
    with Image.open(clip) as im:
        assert im.n_frames == FRAMES and im.size == (SIZE, SIZE)


def test_video_build_request_errors(models, motion):
    from ipa_rt.export.build import BuildRequest

    base, adapter = str(models.base("sd15")), [str(models.adapter("sd15", "base"))]
    with pytest.raises(ipa_rt.ConfigError, match="frames applies to video builds"):
        BuildRequest(base, adapter, frames=8).check()
    with pytest.raises(ipa_rt.ConfigError, match="a positive count"):
        BuildRequest(base, adapter, motion_adapter=str(motion["sd15"]), frames=0).check()
    with pytest.raises(ipa_rt.ConfigError, match="with ControlNets or T2I-Adapters"):
        BuildRequest(
            base, adapter, motion_adapter=str(motion["sd15"]), frames=8, controlnet=[str(motion["controlnet"])]
        ).check()
    for backend in ("openvino", "tensorrt"):  # every engine backend takes video builds
        BuildRequest(base, adapter, backend=backend, motion_adapter=str(motion["sd15"]), frames=8).check()


@pytest.mark.slow
def test_cli_video_build_in_a_fresh_process_loads_through_the_video_pipeline(models, motion, tmp_path):
    """`ipa_rt build --motion-adapter` in a process that never imported ipa_rt.video.pipeline (the package's names
    are lazy): the CLI registers the video pipeline, so the build loads the motion UNet (build_engines stubbed: the
    models' class is what is checked)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import ipa_rt.export.build as b\n"
        "b.build_engines = lambda req, *a, **k: print('loads with', b._pipeline_class(req).__name__)\n"
        "from ipa_rt.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = ["build", str(models.base("sd15")), "--ip-adapter", str(models.adapter("sd15", "base")),
            "--motion-adapter", str(motion["sd15"]), "--frames", "4", "-o", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loads with AnimateDiffPipeline" in done.stdout


def test_from_pretrained_engine_route_asks_for_video_engines(models, motion):
    """``AnimateDiffPipeline.from_pretrained(backend=...)`` builds the same request the CLI build makes."""
    from ipa_rt.adapters.checkpoint import adapter_sources
    from ipa_rt.export.build import request_for_pretrained

    sources = adapter_sources(models.adapter("sd15", "base"), None, None)
    options = {"height": SIZE, "width": SIZE, "frames": 12}
    args = (models.base("sd15"), sources, None, "onnxruntime", torch.float32, None, {}, options)
    req = request_for_pretrained(*args, motion_adapter=motion["sd15"])
    assert (req.motion_adapter, req.frames, req.height) == (str(motion["sd15"]), 12, SIZE)
    req.check()
    assert request_for_pretrained(*args).frames == 0  # stills: no frames, whatever the options say
    with pytest.raises(ipa_rt.ConfigError, match="motion_adapter as a folder"):
        ipa_rt.AnimateDiffPipeline.from_pretrained(models.base("sd15"), backend="onnxruntime")
