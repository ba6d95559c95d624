"""Print the configuration table of README.md from the fields of ``tessera.common.config.Settings``.

    .venv/bin/python scripts/settings_table.py                  # print the Markdown table
    .venv/bin/python scripts/settings_table.py --update README.md  # rewrite it between the markers
    .venv/bin/python scripts/settings_table.py --check README.md   # exit 1 if README.md is stale

The table sits in README.md between ``<!-- settings-table:start -->`` and
``<!-- settings-table:end -->``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic.fields import FieldInfo

from tessera.common.config import Settings

START, END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"


def _default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, Path):
        try:
            value = "~/" + value.relative_to(Path.home()).as_posix()
        except ValueError:
            value = value.as_posix()
    elif isinstance(value, list | tuple):
        value = ",".join(str(v) for v in value)
    text = str(value)
    return f"`{text}`" if text else "(empty)"


def table() -> str:
    prefix = Settings.model_config.get("env_prefix", "")
    rows = ["| Setting | Environment variable | Default | Description |", "| --- | --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        desc = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | `{prefix}{name.upper()}` | {_default(field)} | {desc} |")
    return "\n".join(rows)


def _splice(text: str, body: str) -> str:
    head, sep, rest = text.partition(START)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise SystemExit(f"markers {START} / {END} not found")
    return f"{head}{START}\n{body}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--update", metavar="FILE", type=Path, help="rewrite the table in FILE")
    group.add_argument("--check", metavar="FILE", type=Path, help="exit 1 if the table in FILE is stale")
    args = ap.parse_args(argv)
    body = table()
    if args.update:
        args.update.write_text(_splice(args.update.read_text(), body))
    elif args.check:
        current = args.check.read_text()
        if _splice(current, body) != current:
            print(f"{args.check}: the settings table is stale; run scripts/settings_table.py --update {args.check}",
                  file=sys.stderr)
            return 1
    else:
        print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
