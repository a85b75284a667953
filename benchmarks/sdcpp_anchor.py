"""stable-diffusion.cpp (sd.cpp), the other CPU runtime with IP-Adapter, timed beside ipa_rt's rows.

sd.cpp is a C++ program (ggml), built once with ``benchmarks/sdcpp/build.sh`` (see docs/guides/sdcpp.md) and given
by path: ``--sdcpp PATH`` here, ``$IPA_RT_SDCPP`` for the bench; without one the bench skips this anchor with the
reason :func:`find_binary` gives. It runs ``sd-cli`` on the bench's own random full-size SD1.5 folder, through a
prepared COPY (:func:`prepare`; the original folder is never written):

- ``model/``: the diffusers folder sd.cpp reads itself (unet/, vae/ and text_encoder/ safetensors), the UNet and VAE
  linked to the originals, the text encoder rewritten: sd.cpp's CLIP tokenizer is built in (the real 49408-token
  vocabulary, ids up to 49407) and indexes a 49408-row token embedding, which the bench's random encoder (its own
  small tokenizer) lacks, so the table is padded to 49408 rows by repeating its rows; and its keys get the
  ``text_model.`` prefix real files carry and files saved by transformers 5 lack (sd.cpp finds no encoder without
  it);
- ``clip_vision.safetensors``, ``ip-adapter.safetensors``, ``taesd.safetensors`` and ``reference.png``: links to the
  image encoder's ``model.safetensors`` (HF ``CLIPVisionModelWithProjection`` keys, which sd.cpp maps itself), the h94
  adapter file, TAESD's ``diffusion_pytorch_model.safetensors`` and the reference image.

Each run is one whole ``sd-cli`` process: load (and convert to ``--type``), encode the reference (CLIP-Vision ViT-H +
the adapter's projection), the prompt, sample, decode, write a PNG. A row's samples are those processes' wall times
(the files in the page cache: a first, untimed run at one step warms it), its ``*_ms`` phase fields sd.cpp's own
log times (median over the reps; ``generate_ms`` is its image generation without the process start and the
headers; it includes the lazy weight loads, ``compute_ms`` = ``generate_ms`` - ``load_ms`` does not: the closest
to ipa_rt's rows, which time calls on a loaded pipeline), ``peak_rss_mb`` and ``cpu_s`` the child's peak resident
memory and CPU time (``os.wait4``), ``cpu_share`` = ``cpu_s`` / (wall time × threads): well under 1 when other work
took the cores (sd.cpp's OpenMP threads then slow down far more than in proportion), ``loadavg_1m`` the machine's
load when the reps began (the anchor's own warm-up included). Rows are those of ``optimum_anchor.stats`` with
``system = "stable-diffusion.cpp CONFIG"`` (``f32``, ``q8_0+taesd``, ...); a configuration that fails is recorded in
``errors`` (``{"error", "detail"}``) and gives no row, the others still run.

    python benchmarks/sdcpp_anchor.py --sdcpp /tmp/sdcpp-build/bin/sd-cli --models DIR --configs f32 q8_0+taesd \\
        --size 512 --reps 1 --out rows.json

The top level uses the standard library only (like optimum_anchor.py, which it takes ``stats`` from): safetensors
are read and written here by hand, so preparing the copy needs neither torch nor safetensors.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from optimum_anchor import stats  # one definition of the rows' statistics (a sibling: standard library only too)

SYSTEM = "stable-diffusion.cpp"  # rows: "stable-diffusion.cpp f32", "stable-diffusion.cpp q8_0+taesd", ...
ENV = "IPA_RT_SDCPP"  # the sd-cli binary
TYPES = ("f32", "f16", "q8_0", "q4_0")  # the --type values the bench runs (sd.cpp knows more)
CONFIGS = ("f32", "f16", "q8_0", "q4_0", "f32+taesd", "f16+taesd", "q8_0+taesd", "q4_0+taesd")
PROMPT = "a photo of a cat"
SEED = 42  # sd.cpp's default seed; its noise comes from its own RNG (--rng cuda: Philox), not torch's
THREADS = 2
CLIP_VOCAB = 49408  # rows of CLIP's token embedding: sd.cpp's built-in tokenizer gives ids up to 49407
TEXT_PREFIX = "text_model."
LCM4 = {"sampler": "lcm", "steps": 4, "cfg_scale": 1.0}
CFG25 = {"sampler": "dpm++2m", "steps": 25, "cfg_scale": 7.5}  # sd.cpp's DPM++ 2M, its default (discrete) schedule
WORKLOADS = {"LCM 4 steps end to end": LCM4}  # benchmarks/cpu.py's LCM label; the caller names its own
PREPARED = "ipa_rt-sdcpp.json"  # written last by prepare(): what makes a second prepare() of the same files a no-op
FORMAT = 1  # of the prepared copy: raise it when prepare() changes what it writes

# the times sd.cpp logs itself (seconds), by the row field they fill: the last match, or the sum of all for load_ms
# (sd.cpp loads each model lazily, at its first use, so load_ms overlaps the phases below it)
PHASES = {
    "load_ms": re.compile(r"loading tensors completed, taking ([\d.]+) ?s"),
    "condition_ms": re.compile(r"get_learned_condition completed, taking ([\d.]+) ?s"),  # the prompt (CLIP text)
    "sampling_ms": re.compile(r"sampling completed, taking ([\d.]+) ?s"),  # the UNet steps (after the UNet's load)
    "decode_ms": re.compile(r"decode_first_stage completed, taking ([\d.]+) ?s"),  # VAE or TAESD, with its load
    "generate_ms": re.compile(r"generate_image completed in ([\d.]+) ?s"),  # all of generate_image, loads included
}
SUMMED = ("load_ms",)
GENERATE = re.compile(r"generate_image (\d+)x(\d+)")  # the line generate_image starts with
IP_TOKENS = re.compile(r"IP-Adapter: (\d+) image tokens")  # the line after the reference's encoding
STEP_TIME = re.compile(r"\|\s*(\d+)/(\d+) - ([\d.]+)(s/it|it/s)")  # the sampling progress bar's rate
SYSTEM_INFO = re.compile(r"System Info: *\n(.*)")  # ggml's CPU features line: "AVX2 = 1 |  AVX512 = 1 | ..."
STAMP = re.compile(r"^\+\s*([\d.]+) ")  # the arrival time (s after the start) run_once writes before each line


def find_binary(path: str | os.PathLike | None = None) -> tuple[Path | None, str]:
    """The sd-cli binary at ``path``, else at ``$IPA_RT_SDCPP``: ``(path, "")``, or ``(None, why)`` when there is
    none (the caller skips the anchor with that reason)."""
    given = path or os.environ.get(ENV)
    if not given:
        return None, f"no stable-diffusion.cpp binary: pass --sdcpp PATH or set {ENV} (benchmarks/sdcpp/build.sh)"
    exe = Path(given).expanduser()
    if not exe.is_file():
        return None, f"the stable-diffusion.cpp binary {exe} does not exist"
    if not os.access(exe, os.X_OK):
        return None, f"the stable-diffusion.cpp binary {exe} is not executable"
    return exe, ""


def parse_config(config: str) -> tuple[str, bool]:
    """``"q8_0+taesd"`` -> ``("q8_0", True)``; ``"f32"`` -> ``("f32", False)``."""
    wtype, _, rest = config.partition("+")
    if rest not in ("", "taesd") or not wtype:
        raise ValueError(f"a configuration is TYPE or TYPE+taesd (TYPE e.g. one of {TYPES}), got {config!r}")
    return wtype, rest == "taesd"


# ---- safetensors by hand: an 8-byte little-endian header length, a JSON header, the tensors' bytes ----


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """A safetensors file's header (name -> {dtype, shape, data_offsets}, and ``__metadata__``) and where its data
    starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def write_safetensors(path: Path, tensors: list[tuple[str, str, list[int], bytes]], metadata: dict | None) -> None:
    """``tensors`` as ``(name, dtype, shape, data)`` into ``path``, in that order (header padded to 8 bytes)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for *_, data in tensors:
            f.write(data)
    tmp.replace(path)


def convert_text_encoder(src: Path, dst: Path, vocab: int = CLIP_VOCAB) -> dict:
    """Rewrite a CLIP text encoder for sd.cpp: keys under ``text_model.``, the token embedding padded to ``vocab``
    rows by repeating its rows (row ``i`` is row ``i % n``: any token id sd.cpp's real tokenizer gives reads a real
    row; the bench's weights are random anyway). Returns what was changed."""
    header, start = read_header(src)
    metadata = header.pop("__metadata__", None)
    out, renamed, padded = [], 0, None
    with open(src, "rb") as f:
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            f.seek(start + begin)
            data, shape = f.read(end - begin), list(info["shape"])
            key = name if name.startswith(TEXT_PREFIX) else TEXT_PREFIX + name
            renamed += key != name
            if key == TEXT_PREFIX + "embeddings.token_embedding.weight" and shape[0] < vocab:
                row = len(data) // shape[0]
                data = (data * math.ceil(vocab / shape[0]))[: vocab * row]
                padded = [shape[0], vocab]
                shape[0] = vocab
            out.append((key, info["dtype"], shape, data))
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(dst, out, metadata)
    return {"renamed_keys": renamed, "token_rows": padded}


def _link(src: Path, dst: Path) -> None:
    """``dst`` pointing at ``src`` (a symlink; a copy where links cannot be made): never a write into ``src``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    try:
        dst.symlink_to(Path(src).resolve())
    except OSError:
        import shutil

        shutil.copyfile(src, dst)


def _fingerprint(paths: Iterable[Path]) -> dict:
    """The sources' sizes and modification times, and what this module writes (so a changed conversion redoes it)."""
    return {"format": FORMAT, **{str(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in paths}}


def prepare(files: Mapping[str, str | os.PathLike], work: str | os.PathLike) -> dict[str, Path]:
    """What sd-cli reads, under ``work``, from the bench's folder (``files`` as ``benchmarks/models.write_models``
    returns it: ``base``, ``adapter``, ``image_encoder``, ``image``, ``taesd``). Only ``work`` is written; a
    ``work`` prepared from the same files (sizes and times) is reused. Returns the paths sd-cli takes (``model``,
    ``clip_vision``, ``ip_adapter``, ``taesd``, ``image``) and ``changes`` (what the text encoder's copy changed)."""
    work = Path(work)
    base = Path(files["base"])
    sources = {
        "unet": base / "unet" / "diffusion_pytorch_model.safetensors",
        "vae": base / "vae" / "diffusion_pytorch_model.safetensors",
        "text_encoder": base / "text_encoder" / "model.safetensors",
        "clip_vision": Path(files["image_encoder"]) / "model.safetensors",
        "ip_adapter": Path(files["adapter"]),
        "taesd": Path(files["taesd"]) / "diffusion_pytorch_model.safetensors",
        "image": Path(files["image"]),
    }
    missing = [str(p) for p in sources.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"sd.cpp's inputs are missing: {', '.join(missing)}")
    if sources["ip_adapter"].suffix != ".safetensors":
        raise ValueError(f"sd.cpp reads the adapter as .safetensors, got {sources['ip_adapter']}")
    paths = {
        "model": work / "model",
        "clip_vision": work / "clip_vision.safetensors",
        "ip_adapter": work / "ip-adapter.safetensors",
        "taesd": work / "taesd.safetensors",
        "image": work / ("reference" + sources["image"].suffix),
    }
    marker = work / PREPARED
    fingerprint = _fingerprint(sources.values())
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("sources") == fingerprint:
            return {**paths, "changes": done["changes"]}
    work.mkdir(parents=True, exist_ok=True)
    model = paths["model"]
    _link(sources["unet"], model / "unet" / "diffusion_pytorch_model.safetensors")
    _link(sources["vae"], model / "vae" / "diffusion_pytorch_model.safetensors")
    changes = convert_text_encoder(sources["text_encoder"], model / "text_encoder" / "model.safetensors")
    for name in ("clip_vision", "ip_adapter", "taesd", "image"):
        _link(sources[name], paths[name])
    marker.write_text(json.dumps({"sources": fingerprint, "changes": changes}, indent=2))
    return {**paths, "changes": changes}


# ---- running sd-cli ----


def command(
    exe: str | os.PathLike,
    prepared: Mapping[str, Path],
    out: str | os.PathLike,
    wtype: str = "f32",
    taesd: bool = False,
    sampler: str = "lcm",
    steps: int = 4,
    cfg_scale: float = 1.0,
    size: int = 512,
    threads: int = THREADS,
    seed: int = SEED,
    prompt: str = PROMPT,
    strength: float = 1.0,
    extra: Iterable[str] = (),
) -> list[str]:
    """The sd-cli command line for one image with the IP-Adapter (``-v``: the log gives the phase times); ``extra``
    goes before ``-v`` (e.g. ``--diffusion-fa``: the bench runs sd.cpp's defaults)."""
    cmd = [str(exe), "-m", str(prepared["model"]), "--type", wtype]
    cmd += ["--clip_vision", str(prepared["clip_vision"]), "--ip-adapter", str(prepared["ip_adapter"])]
    cmd += ["--ip-adapter-image", str(prepared["image"]), "--ip-adapter-strength", f"{strength:g}"]
    if taesd:
        cmd += ["--taesd", str(prepared["taesd"])]
    cmd += ["-p", prompt, "--sampling-method", sampler, "--steps", str(steps), "--cfg-scale", f"{cfg_scale:g}"]
    cmd += ["-W", str(size), "-H", str(size), "-s", str(seed), "-t", str(threads), "-o", str(out), *extra, "-v"]
    return cmd


def parse_log(text: str) -> dict:
    """sd.cpp's own times (ms) and facts from one run's log: the :data:`PHASES` found, ``ip_adapter_tokens`` (the
    adapter's image tokens: the proof that it ran), ``step_s`` (the progress bar's last seconds per step),
    ``cpu_features`` (those ggml was built with and found, from its "System Info" line), and where
    the lines carry :func:`run_once`'s arrival stamps, ``startup_ms`` (process start to generate_image's first line:
    arguments, file headers, graphs) and ``reference_ms`` (that line to the IP-Adapter's: CLIP-Vision's load and run
    and the adapter's projection, which sd.cpp does not time itself)."""
    out: dict = {}
    for field, pattern in PHASES.items():
        found = [1000 * float(v) for v in pattern.findall(text)]
        if found:
            out[field] = sum(found) if field in SUMMED else found[-1]
    tokens = IP_TOKENS.search(text)
    if tokens:
        out["ip_adapter_tokens"] = int(tokens.group(1))
    steps = STEP_TIME.findall(text)
    if steps:
        *_, value, unit = steps[-1]
        out["step_s"] = float(value) if unit == "s/it" else 1 / float(value) if float(value) else None
    info = SYSTEM_INFO.search(text)
    if info:
        out["cpu_features"] = re.findall(r"(\w+) = 1", info.group(1))
    stamps = {}
    for line in text.split("\n"):  # not splitlines(): progress bars redraw with "\r" inside a line
        stamp = STAMP.match(line)
        for name, pattern in (("generate", GENERATE), ("tokens", IP_TOKENS)):
            if stamp and name not in stamps and pattern.search(line):
                stamps[name] = 1000 * float(stamp.group(1))
    if "generate" in stamps:
        out["startup_ms"] = stamps["generate"]
        if "tokens" in stamps:
            out["reference_ms"] = stamps["tokens"] - stamps["generate"]
    return out


# the launcher: runs argv[2:], and writes sd-cli's own rusage (os.wait4) as JSON to argv[1]
LAUNCHER = """
import json, os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
code = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as f:
    json.dump({"maxrss_kib": usage.ru_maxrss, "cpu_s": usage.ru_utime + usage.ru_stime, "returncode": code}, f)
sys.exit(code if code >= 0 else 1)
"""


def run_once(cmd: list[str], log: Path, timeout_s: float = 3600.0) -> dict:
    """Run ``cmd``, its output into ``log`` line by line, each line stamped ``+SECONDS`` (since the start) as it
    arrives (sd.cpp flushes every log line): ``wall_s``, ``cpu_s`` and ``peak_rss_mb`` (the child's own CPU time,
    user + system, and peak resident memory, from ``os.wait4``; None where the platform has no wait4: ``cpu_s``
    well under ``wall_s`` × threads says other work took the cores), ``returncode``. Past ``timeout_s`` it is killed and
    TimeoutError raised."""
    import threading

    t0 = time.perf_counter()
    usage_file = log.with_suffix(".rusage.json")
    usage_file.unlink(missing_ok=True)
    # sd-cli is started by a small launcher, never by this process: Linux carries the peak resident memory of the
    # process a child was forked from into the child's ru_maxrss at exec, so a child of the bench (GBs resident)
    # would report at least the bench's peak (the q8_0 + TAESD row read 5.8 GB, its own peak being ~3 GB)
    launched = [sys.executable, "-S", "-c", LAUNCHER, str(usage_file), *cmd] if hasattr(os, "wait4") else cmd
    proc = subprocess.Popen(launched, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    timer = threading.Timer(timeout_s, lambda: os.killpg(proc.pid, 9))  # the launcher and sd-cli
    timer.start()
    try:
        with open(log, "w", buffering=1) as f:  # line-buffered: the log can be followed as it runs
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                f.write(f"+{time.perf_counter() - t0:10.3f} {line}\n")
        proc.stdout.close()
        proc.wait()
        wall = time.perf_counter() - t0
        peak = cpu = None
        if usage_file.is_file():  # what the launcher's os.wait4 said of sd-cli
            usage = json.loads(usage_file.read_text())
            peak, cpu, proc.returncode = usage["maxrss_kib"] / 1024, usage["cpu_s"], usage["returncode"]
    finally:
        timer.cancel()
    if wall >= timeout_s:
        raise TimeoutError(f"sd-cli ran past {timeout_s:.0f} s and was killed: {' '.join(cmd)}\n{_tail(log)}")
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak, "returncode": proc.returncode}


def _tail(log: Path, n: int = 30) -> str:
    with open(log, errors="replace") as f:
        return "".join(collections.deque(f, maxlen=n))


def _checked(cmd: list[str], log: Path, out: Path, timeout_s: float) -> dict:
    """One run that must give an image and the log lines that say the adapter ran; else RuntimeError (its tail)."""
    if out.exists():
        out.unlink()
    run = run_once(cmd, log, timeout_s)
    text = log.read_text(errors="replace")
    parsed = parse_log(text)
    why = (
        f"sd-cli exited with {run['returncode']}"
        if run["returncode"]
        else "sd-cli wrote no image"
        if not out.is_file()
        else "sd-cli's log shows no IP-Adapter tokens (the adapter did not run)"
        if "ip_adapter_tokens" not in parsed
        else None
    )
    if why:
        raise RuntimeError(f"{why}: {' '.join(cmd)}\n{_tail(log)}")
    return {**run, **parsed}


def version(exe: str | os.PathLike) -> dict:
    """What the binary says of itself (``sd-cli --version``'s first line) and, where benchmarks/sdcpp/build.sh built
    it, its ``sdcpp-build.json`` (commits, stubs, CMake options, build time): a build from extracted sources, with
    no git, reports "version unknown"."""
    out: dict = {}
    try:
        done = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=30)
        lines = (done.stdout or done.stderr).strip().splitlines()
        out["version"] = lines[0] if lines else ""
    except (OSError, subprocess.SubprocessError):
        out["version"] = ""
    info = Path(exe).with_name("sdcpp-build.json")
    if info.is_file():
        out["build"] = json.loads(info.read_text())
    return out


def measure(
    sdcpp: str | os.PathLike,
    files: Mapping[str, str | os.PathLike],
    size: int = 512,
    reps: int = 1,
    configs: Iterable[str] = ("f32", "q8_0+taesd"),
    workloads: Mapping[str, Mapping] | None = None,
    threads: int = THREADS,
    seed: int = SEED,
    work: str | os.PathLike | None = None,
    errors: dict | None = None,
    timeout_s: float = 3600.0,
    warmup: bool = True,
    extra: Iterable[str] = (),
) -> list[dict]:
    """sd.cpp's rows: each configuration (``TYPE`` or ``TYPE+taesd``) times each workload (label -> ``{"sampler",
    "steps", "cfg_scale"}``, default :data:`WORKLOADS`) at ``size``², ``reps`` timed processes after one warm-up
    process (the configuration's first workload at one step: it reads every file, so the page cache is warm;
    ``warmup=False`` skips it); ``extra``: more sd-cli arguments for every run (recorded in the rows' ``command``).
    ``work`` keeps the prepared copy (default: a temporary folder, removed after). A failure of one configuration
    is recorded in ``errors["stable-diffusion.cpp CONFIG@SIZE"]`` and gives no rows; preparing the copy failing
    gives none at all (``errors["stable-diffusion.cpp@SIZE"]``)."""
    workloads = dict(workloads or WORKLOADS)
    errors = {} if errors is None else errors
    tmp = None
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="ipa_rt-sdcpp-")
        work = tmp.name
    work = Path(work)
    rows: list[dict] = []
    try:
        try:
            prepared = prepare(files, work / "inputs")
        except Exception as e:
            _record(errors, f"{SYSTEM}@{size}", e)
            return rows
        label = version(sdcpp)
        for config in configs:
            key = f"{SYSTEM} {config}@{size}"
            try:
                wtype, taesd = parse_config(config)
                rows += _measure_config(sdcpp, prepared, work, config, wtype, taesd, size, reps, workloads,
                                        threads, seed, timeout_s, label, warmup, tuple(extra))  # fmt: skip
            except Exception as e:  # one configuration failing is recorded; the others still run
                _record(errors, key, e)
                print(f"sdcpp_anchor: {config} at {size}² failed: {str(e).splitlines()[0]}", flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return rows


def _record(errors: dict, key: str, e: BaseException) -> None:
    text = str(e) or type(e).__name__
    errors[key] = {"error": text.splitlines()[0], "detail": text[-2000:]}  # what failed, and its output's end


def _measure_config(exe, prepared, work, config, wtype, taesd, size, reps, workloads, threads, seed, timeout_s, label,
                    warmup, extra):  # fmt: skip
    rows = []
    runs = work / "runs" / f"{config}@{size}"
    runs.mkdir(parents=True, exist_ok=True)
    out = runs / "out.png"
    common = dict(wtype=wtype, taesd=taesd, size=size, threads=threads, seed=seed, extra=extra)
    warm = {}
    if warmup:
        first = next(iter(workloads.values()))
        cmd = command(exe, prepared, out, sampler=first["sampler"], steps=1, cfg_scale=first["cfg_scale"], **common)
        warm = _checked(cmd, runs / "warmup.log", out, timeout_s)
        print(f"sdcpp_anchor: {config} at {size}²: warm-up {warm['wall_s']:.1f} s", flush=True)
    for name, spec in workloads.items():
        cmd = command(exe, prepared, out, sampler=spec["sampler"], steps=spec["steps"],
                      cfg_scale=spec["cfg_scale"], **common)  # fmt: skip
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # other work on the machine skews times
        done = [_checked(cmd, runs / f"{spec['sampler']}-{spec['steps']}-{i}.log", out, timeout_s) for i in range(reps)]
        row = {
            "size": size,
            "system": f"{SYSTEM} {config}",
            "workload": name,
            **stats([d["wall_s"] for d in done]),
            "what": "whole sd-cli process wall time: load and convert the weights, reference, prompt, sample, decode",
            "weight_type": wtype,
            "decoder": "TAESD (AutoencoderTiny)" if taesd else "full VAE (AutoencoderKL)",
            "sampler": spec["sampler"],
            "steps": spec["steps"],
            "cfg_scale": spec["cfg_scale"],
            "threads": threads,
            "seed": seed,
            "ip_adapter": True,
            "ip_adapter_tokens": done[0]["ip_adapter_tokens"],
            "peak_rss_mb": max((d["peak_rss_mb"] for d in done if d["peak_rss_mb"] is not None), default=None),
            "warmup_s": warm.get("wall_s"),
            "loadavg_1m": load,
            "command": cmd,
            **label,
        }
        for d in done:
            if "generate_ms" in d and "load_ms" in d:  # without the weights' loads: the closest to ipa_rt's calls,
                d["compute_ms"] = d["generate_ms"] - d["load_ms"]  # which run on a loaded pipeline
            if d.get("cpu_s") is not None:  # 1.0: the child had its threads' cores to itself all along
                d["cpu_share"] = d["cpu_s"] / (d["wall_s"] * threads)
        for field in (*PHASES, "compute_ms", "startup_ms", "reference_ms", "step_s", "cpu_s", "cpu_share"):
            values = [d[field] for d in done if d.get(field) is not None]
            if values:
                row[field] = statistics.median(values)
        if done[0].get("cpu_features"):
            row["cpu_features"] = done[0]["cpu_features"]
        rows.append(row)
        print(f"sdcpp_anchor: {row['system']} {name} at {size}²: median {row['median_ms']:.0f} ms, "
              f"peak {row['peak_rss_mb'] or 0:.0f} MB", flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdcpp", help=f"the sd-cli binary (default ${ENV})")
    parser.add_argument("--models", type=Path, help="a folder benchmarks/models.write_models wrote (or will write)")
    parser.add_argument("--write-models", action="store_true", help="write the full-size random SD1.5 folder first")
    parser.add_argument("--configs", nargs="+", default=["f32", "q8_0+taesd"], help=f"from {', '.join(CONFIGS)}")
    parser.add_argument("--cfg", action="store_true", help="also the 25-step DPM++ 2M CFG 7.5 workload")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--work", type=Path, help="keep the prepared copy and the logs here")
    parser.add_argument("--no-warmup", action="store_true", help="no untimed 1-step run before the reps")
    parser.add_argument("--extra-args", default="", help='more sd-cli arguments, e.g. "--diffusion-fa"')
    parser.add_argument("--out", type=Path, required=True, help="the JSON file the rows (and errors) go to")
    args = parser.parse_args(argv)
    exe, why = find_binary(args.sdcpp)
    if exe is None:
        print(f"sdcpp_anchor: skipped: {why}", flush=True)
        args.out.write_text(json.dumps({"rows": [], "errors": {}, "skipped": why}, indent=2))
        return 0
    if args.models is None:
        parser.error("--models is required")
    if args.write_models:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from models import write_models

        files = write_models(args.models, "sd15", full=True, variant="base")
    else:
        files = {
            "base": args.models / "model-sd15",
            "adapter": args.models / "IP-Adapter" / "models" / "ip-adapter-base_sd15.safetensors",
            "image_encoder": args.models / "IP-Adapter" / "models" / "image_encoder",
            "image": args.models / "reference.png",
            "taesd": args.models / "taesd",
        }
    workloads = dict(WORKLOADS)
    if args.cfg:
        workloads["25 steps CFG end to end"] = CFG25
    errors: dict = {}
    rows = measure(exe, files, args.size, args.reps, args.configs, workloads, args.threads, args.seed, args.work,
                   errors, warmup=not args.no_warmup, extra=args.extra_args.split())  # fmt: skip
    args.out.write_text(json.dumps({"rows": rows, "errors": errors}, indent=2, default=str))
    for key, e in errors.items():
        print(f"sdcpp_anchor: {key}: {e['error']}", flush=True)
    return 1 if errors and not rows else 0


if __name__ == "__main__":
    sys.exit(main())
