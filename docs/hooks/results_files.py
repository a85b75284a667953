"""MkDocs hook: the committed benchmark results (``benchmarks/results/*.{json,md,png}``) served as ``results/...``.

The performance page (rendered by ``benchmarks/report.py``) links each table to its results files and shows the
plots; the files stay where the benchmarks write them and are not copied into ``docs/``: this hook adds them to
the site at build time, so ``docs/performance.md`` can link ``results/<name>`` and ``mkdocs build --strict``
checks those links like any other.
"""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
PREFIX = "results/"  # where they appear, relative to docs/
SUFFIXES = (".json", ".md", ".png")


def result_files() -> dict[str, Path]:
    """``{path relative to docs/: the file it is}``; the link test (tests/test_docs.py) resolves links with it."""
    return {f"{PREFIX}{p.name}": p for p in sorted(RESULTS.iterdir()) if p.suffix in SUFFIXES and p.is_file()}


def on_files(files, config):
    from mkdocs.structure.files import File

    for uri, path in result_files().items():
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
