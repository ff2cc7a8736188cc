"""docs/cli.md, generated from the `aligndial` argparse parser: every verb and every flag.

    python -m aligndial.clidocs > docs/cli.md      # regenerate
    python -m aligndial.clidocs --check docs/cli.md  # exit 1 if the file is stale (tests/test_readme.py)

One home per idea: a flag's help lives in `aligndial.cli.make_parser`, and this page is its image.
"""

from __future__ import annotations

import argparse
import sys

HEADER = """# `aligndial` command line

Every verb and flag. Generated from the argparse parser by `python -m aligndial.clidocs > docs/cli.md`;
`tests/test_readme.py` fails when this page is stale. `aligndial VERB --help` prints the same.
"""


def _subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser, str]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            out += [(name, sub, helps.get(name, "")) for name, sub in action.choices.items()]
    return out


def _flag(action: argparse.Action) -> str:
    names = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}`"
    if action.choices and not isinstance(action, argparse._SubParsersAction):
        names += " {" + "\\|".join(map(str, action.choices)) + "}"
    elif action.nargs != 0 and action.option_strings:
        names += " " + (action.metavar or {int: "N", float: "X"}.get(action.type, "VALUE"))
    return names


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _section(path: str, parser: argparse.ArgumentParser, summary: str, level: int) -> list[str]:
    lines = [f"{'#' * level} `{path}`", ""]
    text = parser.description or summary
    if text:
        lines += [_cell(text), ""]
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        default = "" if unset or action.nargs == 0 else f"`{action.default}`"
        required = " (required)" if action.required and action.option_strings else ""
        rows.append(f"| {_flag(action)}{required} | {default} | {_cell(action.help or '')} |")
    if rows:
        lines += ["| flag | default | what it does |", "|---|---|---|", *rows, ""]
    if parser.epilog:
        lines += [_cell(parser.epilog), ""]
    for name, sub, help_text in _subparsers(parser):
        lines += _section(f"{path} {name}", sub, help_text, min(level + 1, 4))
    return lines


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """The whole page for `parser` (default: `aligndial.cli.make_parser()`)."""
    if parser is None:
        from aligndial.cli import make_parser

        parser = make_parser()
    lines = [HEADER]
    verbs = _subparsers(parser)
    lines += ["Verbs: " + ", ".join(f"[`{name}`](#aligndial-{name})" for name, _, _ in verbs) + ".", ""]
    for name, sub, help_text in verbs:
        lines += _section(f"aligndial {name}", sub, help_text, 2)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    page = render()
    if argv[:1] == ["--check"]:
        path = argv[1] if len(argv) > 1 else "docs/cli.md"
        with open(path) as f:
            if f.read() != page:
                print(f"{path} is stale: regenerate it with `python -m aligndial.clidocs > {path}`", file=sys.stderr)
                return 1
        return 0
    sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
