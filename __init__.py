"""ComfyUI's entry point when this repository is a custom node: ``git clone`` into ``ComfyUI/custom_nodes/``, or
installed by ComfyUI-Manager / the Comfy Registry (both unpack the repository there).

ComfyUI imports ``custom_nodes/<folder>/__init__.py`` and calls its V3 ``comfy_entrypoint``. The nodes come from the
``ipa_rt`` that Python imports (the one ``requirements.txt`` installs from this folder, or a ``pip install ipa_rt``);
with none installed, from this folder's own ``ipa_rt/``. Not part of the ``ipa_rt`` distribution (setuptools packages
``ipa_rt*`` only); docs/guides/comfyui.md, "Install", has the three routes.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _installed() -> bool:
    """Whether ``import ipa_rt`` finds a package other than this file."""
    try:
        spec = importlib.util.find_spec("ipa_rt")
    except (ImportError, ValueError):
        return False
    # a setup that lists custom_nodes/ itself on sys.path finds this file as "ipa_rt": not the package
    return spec is not None and spec.origin is not None and Path(spec.origin).resolve() != Path(__file__).resolve()


if __name__ == "ipa_rt":
    # imported under the package's own name (a checkout folder named ipa_rt with its parent on sys.path, as
    # pytest's import of a rootdir package does): free the name; the import returns what sys.modules then holds
    del sys.modules["ipa_rt"]
if not _installed():
    sys.path.insert(0, str(_HERE))  # the clone is the package: its ipa_rt/ folder, dependencies already present

import ipa_rt  # noqa: E402  (after the sys.path fallback above)
from ipa_rt.comfyui import comfy_entrypoint  # noqa: E402

# one line in ComfyUI's log: a stale `pip install` of an older clone shadows this folder's code, and shows here
logging.info("ipa_rt %s: ComfyUI nodes from %s", ipa_rt.__version__, Path(ipa_rt.__file__).resolve().parent)

__all__ = ["comfy_entrypoint"]
