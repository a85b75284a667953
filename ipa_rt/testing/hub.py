"""A model hub's local cache, written from local files: hub ids resolve offline, through the hub's own client.

``write_hub_cache(cache, "XLabs-AI/flux-ip-adapter", {"ip_adapter.safetensors": path})`` lays the files out as
``huggingface_hub`` stores a download (``models--XLabs-AI--flux-ip-adapter/refs/main`` naming a snapshot,
``snapshots/<commit>/<files>``), so ``load_ip_adapter("XLabs-AI/flux-ip-adapter", ..., cache_dir=cache,
local_files_only=True)`` goes through the same hub code path as a real download, without a network.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping
from pathlib import Path


def write_hub_cache(cache: str | os.PathLike, repo_id: str, files: Mapping[str, str | os.PathLike]) -> Path:
    """``files`` (path in the repository -> a local file or folder, copied) as the cached ``main`` snapshot of
    ``repo_id``; returns the snapshot folder."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()  # any 40-hex name: the cache only maps refs to folders
    snapshot = repo / "snapshots" / commit
    for name, source in files.items():
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if Path(source).is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            shutil.copyfile(source, target)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
