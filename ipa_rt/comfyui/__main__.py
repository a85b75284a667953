"""``python -m ipa_rt.comfyui install COMFYUI_DIR``: put ipa_rt's node pack on ComfyUI's custom-node path.

It writes ``COMFYUI_DIR/custom_nodes/ipa_rt_nodes/__init__.py``, a two-line shim that loads the node pack of the
ipa_rt installed in the Python that runs ComfyUI (so upgrading ipa_rt upgrades the nodes)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ConfigError

FOLDER = "ipa_rt_nodes"
SHIM = (
    "# written by `python -m ipa_rt.comfyui install`: ipa_rt's ComfyUI nodes, from the ipa_rt in this Python\n"
    "from ipa_rt.comfyui import comfy_entrypoint  # noqa: F401\n"
)


def _check(root: Path) -> None:
    if not (root / "main.py").is_file() or not (root / "comfy_api").is_dir():
        raise ConfigError(f"COMFYUI_DIR: '{root}' has no main.py and comfy_api/; expected a ComfyUI folder")


def install(comfyui: str | Path) -> Path:
    """Write the shim into ``comfyui``'s ``custom_nodes`` (atomically); returns its folder."""
    from ..cache import atomic_write_bytes

    root = Path(comfyui).expanduser()
    _check(root)
    target = root / "custom_nodes" / FOLDER
    target.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target / "__init__.py", SHIM.encode())
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ipa_rt.comfyui", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    install_parser = sub.add_parser("install", help="write the node pack's shim into COMFYUI_DIR/custom_nodes")
    install_parser.add_argument("comfyui", metavar="COMFYUI_DIR")
    example = sub.add_parser("example", help="tiny models + the example workflows filled in, ready for curl")
    example.add_argument("comfyui", metavar="COMFYUI_DIR")
    example.add_argument("out", metavar="OUT")
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            print(f"ipa_rt nodes installed in {install(args.comfyui)}; restart ComfyUI to load them")
        else:
            _check(Path(args.comfyui).expanduser())
            from .examples import write_examples

            for path in write_examples(args.comfyui, args.out):
                print(f"curl -s -X POST http://127.0.0.1:8188/prompt -H 'Content-Type: application/json' -d @{path}")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
