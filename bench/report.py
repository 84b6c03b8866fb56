"""Writing a benchmark's results: JSON for tools, a markdown table for people (quoted in the README)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d")}


def write(name: str, report: dict, title: str, note: str, header: list[str], rows: list[list], extra=()) -> None:
    """bench/results/NAME.json (the report) and NAME.md (title, machine line + note, table, extra lines)."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# {title}", "", f"{report['machine']}, {report['date']}. {note}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    (RESULTS / f"{name}.md").write_text("\n".join([*lines, *extra]) + "\n")
