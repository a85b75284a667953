"""Faults injected into real engine-build processes (issue 37, item 2): a build SIGKILLed at each stage and run again,
a disk that fills up mid-write (RLIMIT_FSIZE), two processes building the same engine at once, a cache folder that
cannot be written, a manifest edited by hand and an engine file swapped for another's. After each, the engine folder
is checked: no half-written engine is ever used, and the next build or load succeeds or says exactly what to do.

The builds are the tiny SD1.5 model's (32x32, one adapter) in child processes (``python -m ipa_rt build``). A kill
lands at a chosen stage without any hook in the product: the child is the CLI run by a small driver that wraps
the stage's function (export, conversion, quantisation, placing the engine files, the manifest's write) to print
``STAGE <name>`` when it starts, and to hold the process at the stage's end if the kill has not arrived yet; the test
reads the child's stdout and SIGKILLs it on that line."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("polygraphy")

from ipa_rt.errors import EngineError
from ipa_rt.export.manifest import MANIFEST, read_manifest

REPO = Path(__file__).resolve().parents[1]
DEADLINE = 240  # seconds a child may run before the test kills it and fails

# wraps the stages' functions in the child (test code: the product has no hook), then runs the CLI
DRIVER = r"""
import json, os, sys, time

stop = os.environ.get("FAULT_STAGE")


def reached(stage, end=False):
    if not end:
        print(f"STAGE {stage}", flush=True)
    elif stage == stop:  # the stage finished before the kill arrived: wait for it here
        time.sleep(600)


def wrap(module, name, stage):
    real = getattr(module, name)

    def staged(*args, **kwargs):
        reached(stage)
        out = real(*args, **kwargs)
        reached(stage, end=True)
        return out

    setattr(module, name, staged)


import ipa_rt.export.openvino_engine as ov
import ipa_rt.export.writer as writer

wrap(writer, "export_onnx", "export")
wrap(writer, "convert_onnx", "convert")
wrap(ov, "compress_weights", "quantise")
wrap(ov, "quantize_network", "quantise")
real_replace, real_fsync = os.replace, os.fsync


def replace(src, dst, *args, **kwargs):  # the engine files moved from the private folder into the engine folder
    placing = os.path.basename(os.path.dirname(os.path.abspath(src))).startswith(".build-")
    if placing and os.path.basename(os.path.abspath(src)) in ("onnx", "openvino", "tensorrt", "model"):
        reached("place")
        real_replace(src, dst, *args, **kwargs)
        return reached("place", end=True)
    return real_replace(src, dst, *args, **kwargs)


def fsync(fd):  # the manifest's temporary file, whole on disk, not yet renamed into place
    real_fsync(fd)
    if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".manifest.json."):
        reached("manifest")
        reached("manifest", end=True)


os.replace, os.fsync = replace, fsync
from ipa_rt.cli import main

sys.exit(main(sys.argv[1:]))
"""


def build_argv(models, out: Path, *extra: str) -> list[str]:
    return [
        "build", str(models.base("sd15")), "--ip-adapter", str(models.adapter("sd15", "base")),
        "--height", "32", "--width", "32", "-o", str(out), *extra,
    ]  # fmt: skip


def child_env(tmp_path: Path, keep_exports: bool, **extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", IPA_RT_CPU_THREADS="1", PYTHONPATH=str(REPO))
    env.update(IPA_RT_CACHE=str(tmp_path / "cache"), IPA_RT_KEEP_EXPORTS="1" if keep_exports else "0")
    env.pop("FAULT_STAGE", None)
    env.update(extra)
    return env


def start(argv: list[str], env: dict[str, str], driver: bool = False, prefix: list[str] | None = None, **kw):
    cmd = [sys.executable, "-c", DRIVER, *argv] if driver else [sys.executable, "-m", "ipa_rt", *argv]
    proc = subprocess.Popen(
        [*(prefix or []), *cmd], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )
    watchdog = threading.Timer(DEADLINE, lambda: proc.poll() is None and proc.kill())
    watchdog.daemon = True  # never keeps pytest waiting
    watchdog.start()
    return proc


def finish(proc) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=DEADLINE)
    return proc.returncode, out, err


def run_build(argv, env, **kw) -> tuple[int, str, str]:
    return finish(start(argv, env, **kw))


def lock_is_free(folder: Path) -> bool:
    with open(folder / ".ipa_rt.lock") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return True


def leftovers(folder: Path) -> list[str]:
    """What a build writes privately and should never leave behind: its temporary folder, temporary files."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".build-") or p.name.endswith(".tmp"))


def assert_whole_engine(folder: Path) -> None:
    """A manifest whose every file is there with its recorded size, nothing private left, and a pipeline loads."""
    import ipa_rt

    assert leftovers(folder) == []
    manifest = read_manifest(folder)
    for info in manifest["networks"].values():
        for name, record in info["files"].items():
            assert (folder / name).stat().st_size == record["size"], name
    ipa_rt.Pipeline.from_engine(folder)


# --- a build killed at each stage -------------------------------------------------------------------------------
STAGES = [
    pytest.param("export", [], id="export"),
    pytest.param("convert", ["--backend", "openvino"], id="convert-openvino"),
    pytest.param("quantise", ["--backend", "openvino", "--precision", "int8-weights"], id="quantise-int8-weights"),
    pytest.param("place", [], id="engine-write"),
    pytest.param("manifest", [], id="manifest-write"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "extra"), STAGES)
def test_build_killed_at_a_stage_then_built_again(models, tmp_path, stage, extra):
    if "openvino" in extra:
        pytest.importorskip("openvino")
    if "int8-weights" in extra:
        pytest.importorskip("nncf")
    out = tmp_path / "engines"
    exports = tmp_path / "exports"
    env = child_env(tmp_path, keep_exports=True, IPA_RT_EXPORT_DIR=str(exports))
    proc = start(build_argv(models, out, *extra), env | {"FAULT_STAGE": stage}, driver=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.strip() == f"STAGE {stage}":
            os.kill(proc.pid, signal.SIGKILL)
            break
    rc, _, err = finish(proc)
    assert rc == -signal.SIGKILL, f"the build was not killed at {stage}: rc {rc}\n{''.join(seen)}\n{err[-3000:]}"
    # the dead process's flock went with it (the kernel releases it): no stale lock to take over
    assert lock_is_free(out)
    assert not (out / MANIFEST).exists()  # nothing vouches for what the dead build left
    with pytest.raises(EngineError, match=r"manifest.json is missing.*ipa_rt build"):
        read_manifest(out)
    assert not [p for p in exports.glob("*") if not p.name.startswith(".") and not (p / "done").is_file()]

    rc, stdout, err = run_build(build_argv(models, out, *extra), env)  # the same build, run again to the end
    assert rc == 0, err[-3000:]
    assert "engines written to" in stdout
    assert_whole_engine(out)


# --- a disk that fills up during the write ----------------------------------------------------------------------
FSIZE = 2 << 20  # bytes a file may grow to: the tiny UNet's ONNX is ~10 MB, every other file well under this


def small_files_only() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE, FSIZE))


@pytest.mark.slow
def test_disk_full_during_the_write_is_one_clear_error(models, tmp_path):
    out = tmp_path / "engines"
    rc, stdout, err = run_build(build_argv(models, out), child_env(tmp_path, False), preexec_fn=small_files_only)
    assert rc == 2, f"rc {rc}\n{stdout}\n{err[-3000:]}"  # the CLI's exit status for an ipa_rt error
    message = err.strip().splitlines()[-1]
    assert "Traceback" not in err, err[-3000:]
    assert str(out) in message and "no space" in message.lower(), message
    assert "needs about" in message and "free" in message, message
    assert not out.exists() or (not (out / MANIFEST).exists() and leftovers(out) == [])


def test_a_full_disk_at_the_manifest_write_names_the_folder(tmp_path, monkeypatch):
    from ipa_rt.adapters import checkpoint
    from ipa_rt.export.manifest import write_manifest

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.os, "fsync", full)
    with pytest.raises(EngineError, match=rf"(?s)no space.*{tmp_path}.*manifest.json.*bytes"):
        write_manifest(tmp_path, {"format": 2})
    assert list(tmp_path.iterdir()) == []


# --- two builders at once ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_build_the_same_engine_once(models, tmp_path):
    out = tmp_path / "engines"
    env = child_env(tmp_path, keep_exports=False)
    procs = [start(build_argv(models, out), env) for _ in range(2)]
    results = [finish(p) for p in procs]
    assert [rc for rc, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    outputs = [stdout for _, stdout, _ in results]
    built = [o for o in outputs if "engines written to" in o]
    reused = [o for o in outputs if "reusing the engines built in" in o]
    assert len(built) == 1 and len(reused) == 1, outputs
    assert sum(o.count("ONNX export") for o in outputs) == built[0].count("ONNX export") > 0  # one exported
    assert reused[0].count("ONNX export") == 0
    assert_whole_engine(out)


# --- a cache folder without write permission, a manifest edited by hand, an engine file swapped ---------------------
@pytest.fixture(scope="module")
def built(models, tmp_path_factory) -> Path:
    from ipa_rt import cli

    out = tmp_path_factory.mktemp("built") / "engines"
    assert cli.main(build_argv(models, out)) == 0
    return out


def read_only_prefix(folder: Path) -> list[str] | None:
    """The command prefix that runs a child with ``folder`` read-only, or ``None`` where that is not possible here.
    Root ignores permission bits, so as root the folder is bind-mounted read-only in a mount namespace of the
    child's own (``unshare -m``); anyone else gets the folder's write bits taken away."""
    if os.geteuid() != 0:
        for p in [folder, *folder.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
        return []
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        return None
    remount = f"mount --bind '{folder}' '{folder}' && mount -o remount,ro,bind '{folder}' '{folder}' && exec \"$@\""
    return ["unshare", "-m", "sh", "-c", remount, "sh"]


@pytest.mark.slow
def test_a_cache_folder_without_write_permission(models, built, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(built, cache / "engines")  # engines built before the folder became read-only
    prefix = read_only_prefix(cache)
    if prefix is None:
        pytest.skip("running as root without mount namespaces: no way to make a folder read-only for root")
    try:
        env = child_env(tmp_path, keep_exports=False, IPA_RT_CACHE=str(cache))
        # reusing what is there needs no write: it works (and says so)
        rc, stdout, err = run_build(build_argv(models, cache / "engines"), env, prefix=prefix)
        assert rc == 0 and "reusing the engines built in" in stdout, err[-3000:]
        # a build into it cannot work: one error naming the folder and what to do
        rc, stdout, err = run_build(build_argv(models, cache / "other"), env, prefix=prefix)
        message = err.strip().splitlines()[-1]
        assert rc == 2 and "Traceback" not in err, err[-3000:]
        assert f"'{cache / 'other'}'" in message and "cannot write" in message and "-o DIR" in message, message
    finally:
        for p in [cache, *cache.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)
    assert not (cache / "other").exists()


def copy_of(built: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(built, folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("edit", ["invalid-json", "networks-removed", "files-not-a-table", "size-not-a-number"])
def test_a_manifest_edited_by_hand(built, tmp_path, edit):
    import ipa_rt

    folder = copy_of(built, tmp_path)
    path = folder / MANIFEST
    manifest = json.loads(path.read_text())
    if edit == "invalid-json":
        path.write_text(path.read_text()[:-20])
    else:
        if edit == "networks-removed":
            del manifest["networks"]
        elif edit == "files-not-a-table":
            manifest["networks"]["unet"]["files"] = ["onnx/unet.onnx"]
        else:
            manifest["networks"]["unet"]["files"]["onnx/unet.onnx"]["size"] = "big"
        path.write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match=rf"(?s)'{path}'.*--rebuild") as info:
        ipa_rt.Pipeline.from_engine(folder)
    assert edit == "invalid-json" or "expected" in str(info.value)


@pytest.mark.slow
def test_an_engine_file_swapped_for_another_engines(built, tmp_path):
    """The same name and size, other weights inside (another build's file copied over it): refused by its sha256."""
    import onnx

    import ipa_rt

    folder = copy_of(built, tmp_path)
    path = folder / "onnx" / "vae_decoder.onnx"
    model = onnx.load(str(path))
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    weight.raw_data = bytes(b ^ 0x55 for b in weight.raw_data)  # another engine's weights, the same layout
    size = path.stat().st_size
    onnx.save(model, str(path))
    assert path.stat().st_size == size
    with pytest.raises(EngineError, match=rf"(?s)'{path}'.*sha256.*--rebuild"):
        ipa_rt.Pipeline.from_engine(folder)
    shutil.copy(built / "onnx" / "vae_decoder.onnx", path)  # the right file back (a copy, new mtime): loads
    ipa_rt.Pipeline.from_engine(folder)
