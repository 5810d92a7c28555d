"""Where the suite's time goes, per test file, from pytest's JUnit XML report:

    scripts/test --junitxml=report.xml          # the suite, keeping each test's time
    python -m scripts.test_times report.xml     # a Markdown table, slowest files first
    python -m scripts.test_times before.xml after.xml   # the two side by side

A test's time is its setup, call and teardown as pytest measured them, in one of the parallel
test processes: on a loaded machine they overlap, so the column sums to more than the run's wall
time. The sum says which files cost the most machine time, which is what a 2-core run pays for."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ElementTree
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class FileTimes:
    tests: int = 0
    seconds: float = 0.0
    slowest: tuple[float, str] = (0.0, "")
    failed: int = 0
    names: list[str] = field(default_factory=list)


def file_times(report: str) -> dict[str, FileTimes]:
    files: dict[str, FileTimes] = defaultdict(FileTimes)
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        path = case.get("file") or case.get("classname", "").replace(".", "/") + ".py"
        seconds = float(case.get("time") or 0)
        entry = files[path]
        entry.tests += 1
        entry.seconds += seconds
        entry.slowest = max(entry.slowest, (seconds, case.get("name", "")))
        entry.failed += any(child.tag in ("failure", "error") for child in case)
    return dict(files)


def table(reports: list[str]) -> str:
    runs = [file_times(report) for report in reports]
    paths = sorted(
        {path for run in runs for path in run}, key=lambda p: -max(r.get(p, FileTimes()).seconds for r in runs)
    )
    if len(runs) == 1:
        lines = ["| file | tests | seconds | slowest test |", "|---|---:|---:|---|"]
        for path in paths:
            entry = runs[0][path]
            lines.append(
                f"| {path} | {entry.tests} | {entry.seconds:.0f} | {entry.slowest[1]} ({entry.slowest[0]:.0f} s) |"
            )
        total = sum(e.seconds for e in runs[0].values())
        lines.append(f"| all | {sum(e.tests for e in runs[0].values())} | {total:.0f} | |")
        return "\n".join(lines)
    lines = ["| file | tests before | seconds before | tests after | seconds after |", "|---|---:|---:|---:|---:|"]
    before, after = runs[0], runs[-1]
    for path in paths:
        old, new = before.get(path, FileTimes()), after.get(path, FileTimes())
        lines.append(f"| {path} | {old.tests} | {old.seconds:.0f} | {new.tests} | {new.seconds:.0f} |")
    lines.append(
        f"| all | {sum(e.tests for e in before.values())} | {sum(e.seconds for e in before.values()):.0f} "
        f"| {sum(e.tests for e in after.values())} | {sum(e.seconds for e in after.values()):.0f} |"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    if not 2 <= len(sys.argv) <= 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    print(table(sys.argv[1:]))
