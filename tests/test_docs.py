"""README stays short, every relative link in README and docs/ resolves, and the documentation site builds strictly."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README_MAX_LINES = 150
# the site serves benchmarks/results/ as docs/results/ (docs/hooks/results_files.py): links there resolve to it
SERVED = {DOCS / "results": ROOT / "benchmarks" / "results"}

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def relative_links(path: Path) -> list[str]:
    text = CODE.sub("", FENCE.sub("", path.read_text()))  # links inside code are not links
    out = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith(("#", "//")):
            continue  # http(s), mailto, ...; same-page anchors
        out.append(target)
    return out


def resolves(page: Path, target: str) -> bool:
    path = (page.parent / target.split("#", 1)[0]).resolve()
    for served, real in SERVED.items():
        if path.is_relative_to(served):
            path = real / path.relative_to(served)
    return path.exists()


def test_readme_is_at_most_150_lines():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/ (limit {README_MAX_LINES})"


def test_every_relative_link_resolves():
    assert (DOCS / "index.md").is_file()
    broken = [
        f"{page.relative_to(ROOT)}: {target}"
        for page in pages()
        for target in relative_links(page)
        if not resolves(page, target)
    ]
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def test_the_link_check_sees_links():
    """The checker itself: a broken link is found, code is skipped, anchors and results/ links resolve."""
    page = DOCS / "performance.md"
    assert "results/2026-11-24-cpu.json" in relative_links(page)
    assert resolves(page, "results/2026-11-24-cpu.json") and not resolves(page, "results/missing.json")
    assert resolves(DOCS / "index.md", "guides/gpu.md#first-light-on-a-gpu")
    assert not resolves(DOCS / "index.md", "guides/missing.md")


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    missing = [m for m in ("mkdocs", "material", "mkdocstrings_handlers.python") if not _importable(m)]
    if missing:
        pytest.skip(f'{", ".join(missing)} not installed (pip install -e ".[docs]")')
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    # not --quiet: it hides the warnings (griffe's among them) that --strict turns into a failed build, as CI runs it
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    site = tmp_path / "site"
    assert (site / "index.html").is_file() and (site / "results" / "2026-11-23-cpu.png").is_file()
    cli = (site / "reference" / "cli" / "index.html").read_text()
    assert "ipa_rt build" in cli and "--ip-adapter" in cli and "<!-- cli-reference -->" not in cli  # the hook ran
    assert 'id="ipa_rt.Pipeline"' in (site / "reference" / "python" / "index.html").read_text()  # mkdocstrings ran


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def code_map() -> list[tuple[list[str], str]]:
    """The rows of docs/design.md's code map: ``(paths named in the first column, the concern)``, with each bare file
    name of a package's row (``stack.py``) read as that package's file."""
    text = (DOCS / "design.md").read_text()
    table = text.split("## Code map", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != 2 or not cells[0].startswith("`"):
            continue
        named = re.findall(r"`([^`]+)`", cells[0])
        package = next((n for n in named if n.endswith("/")), None)
        files = [n for n in re.findall(r"`([\w/]+\.py|[\w/]+/)`", cells[1]) if package]
        rows.append(([*named, *(package + f for f in files)], cells[1]))
    return rows


def test_the_code_map_matches_the_tree():
    """Every path docs/design.md's code map names exists, and every module and package of ipa_rt/ is in it: a reader's
    map of the code is the code's."""
    rows = code_map()
    named = {p for paths, _ in rows for p in paths}
    assert len(rows) > 10 and "ipa_rt/runtime/" in named
    missing = sorted(p for p in named if p.startswith(("ipa_rt", "benchmarks")) and not (ROOT / p).exists())
    assert not missing, f"the code map names paths that do not exist: {missing}"
    top = ROOT / "ipa_rt"
    entries = {f"ipa_rt/{p.name}/" for p in top.iterdir() if (p / "__init__.py").exists()}
    entries |= {f"ipa_rt/{p.name}" for p in top.glob("*.py") if p.name not in {"__main__.py", "_version.py"}}
    unmapped = sorted(entries - named)
    assert not unmapped, f"modules or packages of ipa_rt/ the code map leaves out: {unmapped}"
