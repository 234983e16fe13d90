"""Render the fault suite's JSONL records as the markdown table of docs/faults.md.

python -m tests.faults.report runs/faults/report.jsonl
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def table(path: Path) -> str:
    rows: dict[str, dict] = defaultdict(
        lambda: {"tests": 0, "trials": 0, "faults": 0, "survived": 0, "lost": 0, "repeated": 0, "rec": []}
    )
    for line in path.read_text().splitlines():
        record = json.loads(line)
        row = rows[record["scenario"]]
        row["tests"] += 1
        for key in ("trials", "faults", "survived", "lost", "repeated"):
            row[key] += record[key]
        row["rec"] += record["recovery_s"]
    out = [
        "| scenario | tests | trials | faults injected | faults survived | samples lost | samples repeated "
        "| time to recover (median / max) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in sorted(rows, key=lambda n: (int(n.split(".")[0]) if n[0].isdigit() else 99, n)):
        row = rows[name]
        recovery = sorted(row["rec"])
        timing = f"{recovery[len(recovery) // 2]:.1f} s / {recovery[-1]:.1f} s" if recovery else "—"
        out.append(
            f"| {name} | {row['tests']} | {row['trials']} | {row['faults']} | {row['survived']} "
            f"| {row['lost']} | {row['repeated']} | {timing} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tests.faults.report REPORT.jsonl", file=sys.stderr)
        return 2
    print(table(Path(args[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
