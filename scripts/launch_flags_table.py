"""Regenerate docs/CONFIG.md's table of launch/train.py's flags from its argument parser (between
the `<!-- launch flags ... -->` and `<!-- end of launch flags -->` markers):

    python scripts/launch_flags_table.py          # rewrites docs/CONFIG.md in place
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- launch flags: regenerate from launch/train.py --help -->", "<!-- end of launch flags -->"


def table() -> str:
    spec = importlib.util.spec_from_file_location("train", ROOT / "launch" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    parser = train.build_parser()
    parts = []
    for group in parser._action_groups[2:]:
        rows = []
        for action in group._group_actions:
            if action.help == argparse.SUPPRESS:
                continue
            flag = action.option_strings[0]
            if isinstance(action, argparse._StoreTrueAction):
                default = "off"
            elif action.default is None:
                default = "-"
            else:
                default = f"`{action.default}`"
            meaning = (action.help or "").replace("|", "\\|")
            if action.choices and "one of" not in meaning:
                meaning += f" ({' / '.join(map(str, action.choices))})"
            rows.append(f"| `{flag}` | {default} | {meaning} |")
        parts.append(f"**{group.title}**\n\n| flag | default | meaning |\n|---|---|---|\n" + "\n".join(rows))
    return "\n\n".join(parts)


def main() -> int:
    path = ROOT / "docs" / "CONFIG.md"
    text = path.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n\n{table()}\n\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
