"""Writing a benchmark's results: JSON for tools, a markdown table for people, and (`python -m bench.report`,
the last step of `just bench`) one summary table of every benchmark's headline rows (the README links it
and quotes three)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
COMPETITOR_SECONDS = 900  # a competing process ends by itself after this, should its benchmark die


@contextlib.contextmanager
def beside_a_busy_process(busy: bool = True) -> Iterator[None]:
    """The block runs beside one CPU-bound Python process (`while True: pass`), started before and
    stopped after it; busy=False: alone."""
    if not busy:
        yield
        return
    code = f"import time\nend = time.time() + {COMPETITOR_SECONDS}\nwhile time.time() < end: pass"
    competitor = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(0.5)  # running before the measured work starts
        yield
    finally:
        competitor.kill()
        competitor.wait()


def machine() -> dict:
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }


def write(
    name: str,
    report: dict,
    title: str,
    note: str,
    header: list[str],
    rows: list[list],
    headline: list[tuple[str, str]],
    extra=(),
) -> None:
    """bench/results/NAME.json (the report, with its `headline` (setting, result) rows for the summary) and
    NAME.md (title, machine line + note, table, extra lines)."""
    RESULTS.mkdir(exist_ok=True)
    report = {**report, "headline": [list(row) for row in headline]}
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# {title}",
        "",
        f"{report['machine']}, {report['date']}. {note}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    (RESULTS / f"{name}.md").write_text("\n".join([*lines, *extra]) + "\n")


def summarize() -> Path:
    """bench/results/summary.md: every benchmark's headline rows in one table."""
    lines = [
        "# userpipe benchmarks",
        "",
        "Written by `just bench`; details in each NAME.md beside this file.",
        "",
        "| benchmark | setting | result | machine, date |",
        "|---|---|---|---|",
    ]
    for path in sorted(RESULTS.glob("*.json")):
        report = json.loads(path.read_text())
        for setting, result in report.get("headline", []):
            lines.append(
                f"| [{path.stem}]({path.stem}.md) | {setting} | {result} | {report['machine']}, "
                f"{report['date']} |"
            )
    out = RESULTS / "summary.md"
    out.write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    print(summarize().read_text())
