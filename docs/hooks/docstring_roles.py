"""MkDocs hook: Sphinx cross-reference roles in docstrings (``:meth:`x```, ``:class:`~a.b.C```) shown as code.

ipa_rt's docstrings use Sphinx roles, which mkdocstrings' Google-style parser leaves as text (``:meth:x``); this
hook drops the role and, as Sphinx does for ``~``, keeps only the last name of a ``~``-prefixed path.
"""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:py:)?(?:meth|class|func|attr|data|mod|exc|obj|const):<code>(~?)([^<]*)</code>")


def _code(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if tilde else target}</code>"


def on_page_content(html: str, page, config, files) -> str:
    return ROLE.sub(_code, html)
