"""Keeping each network's ONNX export between builds (``IPA_RT_KEEP_EXPORTS=1``): a build that differs from an
earlier one only in backend, precision or decoder re-exports only the networks that changed.

An export is named by what that network depends on (the autoencoder's files matter to the VAE networks only: the
latent size they set for the others is in their input shapes). Entries are renamed into place from a private folder,
so a crash never leaves half an export; reuse hard-links the files (or copies them across file systems); the test
suite shares one ``$IPA_RT_EXPORT_DIR`` between builds of different engine caches (docs/guides/cpu.md, exports kept
between builds).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..cache import cache_root

SWITCH = "IPA_RT_KEEP_EXPORTS"
PLACE = "IPA_RT_EXPORT_DIR"
VAE_NETWORKS = ("vae_decoder", "vae_encoder")
VAE_WEIGHTS = ("base/vae/", "vae_override/")


def enabled() -> bool:
    return os.environ.get(SWITCH, "0") == "1"


def exports_root() -> Path:
    place = os.environ.get(PLACE)
    return Path(place) if place else cache_root() / "exports"


@functools.cache
def code_hash() -> str:
    """sha256 of ipa_rt's Python sources: an export made by other code is never reused."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _reads(network: str, role: str) -> bool:
    return role.startswith(VAE_WEIGHTS) == network.startswith(VAE_NETWORKS)


def network_key(network: str, ident: dict[str, Any], inputs: dict[str, Any]) -> str:
    # an SD build's identity has its request; a family's is one flat record
    drop = ("backend", "precision", "sources", "versions")
    request = {k: v for k, v in ident.get("request", ident).items() if k not in drop}
    versions = {k: v for k, v in ident["versions"].items() if k not in ("tensorrt", "openvino", "nncf")}
    payload = {
        "network": network,
        "inputs": {name: [list(x.shape), str(x.dtype)] for name, x in inputs.items()},
        "request": request,
        "versions": versions,
        "sources": {role: h for role, h in ident["sources"].items() if _reads(network, role)},
        "code": code_hash(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


def export_cached(contract: Any, ident: dict[str, Any], target: Path, export: Callable[[], Path]) -> tuple[Path, bool]:
    """``target`` (an ``.onnx`` path) for a contract, from the cache when kept before, else from ``export()``, then
    kept. Returns the path and whether it came from the cache."""
    if not enabled():
        return export(), False
    network = contract.name
    entry = exports_root() / f"{network}-{network_key(network, ident, contract.inputs)}"
    if (entry / "done").is_file():
        for f in entry.iterdir():
            if f.name != "done":
                _place(f, target.parent / f.name)
        if target.is_file():
            return target, True
        shutil.rmtree(entry, ignore_errors=True)  # an entry someone emptied by hand: export again
    path = export()
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{network}-", dir=entry.parent))
    try:
        for f in path.parent.glob(path.name + "*"):  # the .onnx and its external .data
            _place(f, staging / f.name)
        (staging / "done").write_text("")
        os.replace(staging, entry)
    except OSError:  # a concurrent build kept it first
        shutil.rmtree(staging, ignore_errors=True)
    return path, False
