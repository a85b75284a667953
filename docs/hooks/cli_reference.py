"""MkDocs hook: the CLI reference, generated from ipa_rt's argparse parsers at build time.

``docs/reference/cli.md`` holds a hand-written overview and the marker line below; this hook replaces the marker
with one section per subcommand (usage, then its arguments by group), read from ``ipa_rt.cli.build_parser()``
(``ipa_rt.cli._parser()`` where that does not exist yet) and, for ``ipa_rt serve``, from the parser of
``ipa_rt/serving/cli.py`` when the main parser passes ``serve`` on instead of describing it.
"""

from __future__ import annotations

import argparse
import importlib
import os

MARKER = "<!-- cli-reference -->"
WIDTH = 100  # argparse wraps usage lines at $COLUMNS: fixed, so the page does not depend on the terminal


def main_parser() -> argparse.ArgumentParser:
    cli = importlib.import_module("ipa_rt.cli")
    build = getattr(cli, "build_parser", None) or cli._parser
    return build()


def serve_parser() -> argparse.ArgumentParser | None:
    try:
        serving = importlib.import_module("ipa_rt.serving.cli")
    except ImportError:
        return None
    build = getattr(serving, "build_parser", None) or getattr(serving, "parser", None)
    return build() if callable(build) else None


def subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.ArgumentParser, str]]:
    """``{name: (parser, its one-line help)}`` of every subcommand."""
    out: dict[str, tuple[argparse.ArgumentParser, str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            out.update({name: (sub, helps.get(name, "")) for name, sub in action.choices.items()})
    return out


def passes_through(parser: argparse.ArgumentParser) -> bool:
    """A parser whose only argument is a REMAINDER (``bench``): its arguments belong to another program."""
    own = own_arguments(parser)
    return bool(own) and all(a.nargs == argparse.REMAINDER for a in own)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _names(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    return ", ".join(f"`{s}`" for s in action.option_strings)


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:  # store_true, version, help
        return ""
    if action.choices is not None:
        return " \\| ".join(f"`{c}`" for c in action.choices)
    if action.metavar:
        return f"`{action.metavar}`"
    kind = getattr(action.type, "__name__", None)
    return f"`{kind.upper()}`" if kind else f"`{action.dest.upper()}`"


def _default(action: argparse.Action) -> str:
    d = action.default
    if action.nargs == 0 or d is None or d is argparse.SUPPRESS or d == [] or d is False:
        return ""
    if action.dest == "device" and d in ("cpu", "cuda"):  # chosen when the parser is built: say the rule
        return "`cuda` if available, else `cpu`"
    return f"`{d!r}`" if d == "" else f"`{d}`"


def _usage(parser: argparse.ArgumentParser) -> str:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH)
    try:
        return parser.format_usage().strip()
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def own_arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def section(title: str, parser: argparse.ArgumentParser, note: str = "", summary: str = "") -> list[str]:
    lines = [f"## `{title}`", ""]
    if summary:
        lines += [f"*{summary}*", ""]
    if parser.description:
        lines += [parser.description, ""]
    if note:
        lines += [note, ""]
    lines += ["```text", _usage(parser), "```", ""]
    for group in parser._action_groups:
        skip = (argparse._HelpAction, argparse._SubParsersAction)
        actions = [a for a in group._group_actions if not isinstance(a, skip)]
        if not actions:
            continue
        lines += [f"**{group.title}**", "", "| argument | value | default | help |", "|---|---|---|---|"]
        for a in actions:
            help_text = "" if a.help in (None, argparse.SUPPRESS) else a.help % vars(a) if "%(" in a.help else a.help
            required = " (required)" if a.option_strings and a.required else ""
            lines.append(f"| {_names(a)}{required} | {_value(a)} | {_default(a)} | {_cell(help_text)} |")
        lines.append("")
    for group in parser._mutually_exclusive_groups:
        names = ", ".join(f"`{a.option_strings[0]}`" for a in group._group_actions if a.option_strings)
        lines += [f"{'Exactly' if group.required else 'At most'} one of {names}.", ""]
    return lines


def reference() -> str:
    parser = main_parser()
    lines = section(parser.prog, parser)
    commands = subcommands(parser)
    for name, (sub, summary) in commands.items():
        title = f"{parser.prog} {name}"
        if name == "serve" and (passes_through(sub) or not own_arguments(sub)):
            sub = serve_parser() or sub  # the main parser hands serve on: describe the parser that reads it
        if passes_through(sub):
            note = (
                "Every argument after the subcommand is handed to the benchmark script of its `--profile`: "
                "`cpu` (the default) runs `benchmarks/cpu.py`, `video` `benchmarks/video.py`, `serve` "
                "`benchmarks/serve.py`, `gpu` and `cpu-basic` `benchmarks/harness.py` (from a source checkout); "
                "`ipa_rt bench --profile P --help` prints that script's own options."
            )
            lines += [f"## `{title}`", "", f"*{summary}*" if summary else "", "", note, ""]
            continue
        lines += section(title, sub, summary=summary)
    if "serve" not in commands:  # dispatched before parsing: its own parser in ipa_rt/serving/cli.py
        serve = serve_parser()
        if serve is not None:
            lines += section(f"{parser.prog} serve", serve, 'Needs `pip install -e ".[serve]"` (Ray Serve).')
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, reference())
