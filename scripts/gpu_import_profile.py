"""Where `import unsloth` spends its 22 s on the GPU machine (issue 25: the first job after a start
waits for the standby trainer's imports). Each measurement is a fresh Python process, as a trainer is:

1. `import torch`, then `import unsloth`, timed, --runs times (the first run reads the packages
   from disk; the others are what a standby started later pays). Where no bytecode is cached (a
   package folder unpacked from an archive, PYTHONDONTWRITEBYTECODE set, as on the lent machine)
   every import compiles its modules from source: the runs are repeated after
   `python -m compileall` of the packages not yet compiled (what pip does when it installs them),
   so the JSON says what an installed environment pays and what the bundle's costs.
2. `-X importtime`: each module's own import time, summed by top-level package, the largest first.
3. cProfile of `import unsloth` (torch imported first): the functions with the most cumulative and
   own time, outside the import machinery.

Run on the GPU machine from the repository root, the package bundle carried as .gpu/ (docs/gpu.md):
    python3 scripts/gpu_import_profile.py --out $OUT/import
It writes import.json and prints a short table."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

TIMED = (
    "import time; t0 = time.perf_counter(); import torch; t1 = time.perf_counter(); "
    "torch.cuda.init(); t2 = time.perf_counter(); import unsloth; t3 = time.perf_counter(); "
    "import trl, datasets; t4 = time.perf_counter(); "
    "print('TIMES', t1 - t0, t2 - t1, t3 - t2, t4 - t3)"
)
PROFILED = (
    "import cProfile, pstats, io, torch; torch.cuda.init(); p = cProfile.Profile(); p.enable(); import unsloth; "
    "p.disable(); s = pstats.Stats(p); s.dump_stats('{path}')"
)
# The import machinery's own frames, which every import's cumulative time passes through.
MACHINERY = re.compile(
    r"<frozen importlib|importlib/__init__|<built-in method builtins.exec>|_call_with_frames_removed"
)


def timed_run(env: dict[str, str]) -> dict[str, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", TIMED], env=env, capture_output=True, text=True, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("TIMES")), None)
    if line is None:
        return {"error": done.stderr[-2000:], "wall_s": round(time.perf_counter() - started, 2)}  # type: ignore[dict-item]
    torch_s, cuda_s, unsloth_s, rest_s = (float(x) for x in line.split()[1:])
    return {
        "import_torch_s": round(torch_s, 2),
        "cuda_init_s": round(cuda_s, 2),
        "import_unsloth_s": round(unsloth_s, 2),
        "import_trl_datasets_after_s": round(rest_s, 2),
        "process_wall_s": round(time.perf_counter() - started, 2),
    }


def uncompiled_package_folders() -> list[str]:
    """The folders on sys.path (outside the standard library) with .py files and no bytecode for
    this interpreter next to them: what compileall would write."""
    import importlib.util

    folders = []
    for entry in sys.path:
        folder = Path(entry)
        if not entry or not folder.is_dir() or "site-packages" not in entry and "gpu-bundle" not in entry:
            continue
        sources = list(folder.glob("*/__init__.py"))[:200]
        if sources and not any(Path(importlib.util.cache_from_source(str(s))).exists() for s in sources):
            folders.append(str(folder))
    return folders


def compile_bytecode(folders: list[str]) -> dict[str, object]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j", "0", *folders], capture_output=True, text=True, check=False
    )
    return {"folders": folders, "seconds": round(time.perf_counter() - started, 1), "rc": done.returncode}


def importtime_by_package(env: dict[str, str]) -> list[tuple[str, float]]:
    """`python -X importtime`: self microseconds per module, summed by top-level package."""
    code = "import torch; torch.cuda.init(); import unsloth"
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], env=env, capture_output=True, text=True, check=False
    )
    totals: dict[str, float] = defaultdict(float)
    for line in done.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|\s+(\S+)", line.strip())
        if match:
            totals[match.group(3).split(".")[0]] += int(match.group(1)) / 1e6
    return sorted(((name, round(s, 2)) for name, s in totals.items()), key=lambda x: -x[1])[:25]


def profiled(env: dict[str, str], out: Path) -> dict[str, list[tuple[str, float]]]:
    import pstats

    path = out / "unsloth-import.prof"
    subprocess.run([sys.executable, "-c", PROFILED.format(path=path)], env=env, capture_output=True, check=False)
    if not path.exists():
        return {}
    stats = pstats.Stats(str(path))
    rows = []
    for (filename, line, name), (_cc, _nc, own, cumulative, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{filename}:{line}({name})"
        if not MACHINERY.search(where):
            rows.append((where, own, cumulative))
    short = [(re.sub(r".*/site-packages/", "", w), own, cum) for w, own, cum in rows]
    return {
        "cumulative": [(w, round(c, 2)) for w, _o, c in sorted(short, key=lambda r: -r[2])[:40]],
        "own": [(w, round(o, 2)) for w, o, _c in sorted(short, key=lambda r: -r[1])[:30]],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    results: dict[str, object] = {
        "python": sys.version.split()[0],
        "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE"),
        "runs": [timed_run(env) for _ in range(args.runs)],
    }
    uncompiled = uncompiled_package_folders()
    results["uncompiled_package_folders"] = uncompiled
    if uncompiled:
        results["compileall"] = compile_bytecode(uncompiled)
        results["runs_with_bytecode"] = [timed_run(env) for _ in range(args.runs)]
    results["importtime_by_package_s"] = importtime_by_package(env)
    results["profile"] = profiled(env, args.out)
    (args.out / "import.json").write_text(json.dumps(results, indent=2))
    print("PYTHONDONTWRITEBYTECODE:", results["PYTHONDONTWRITEBYTECODE"], "compileall:", results.get("compileall"))
    for key in ("runs", "runs_with_bytecode"):
        for run in results.get(key, []):  # type: ignore[attr-defined]
            print(key, run)
    print("importtime, own seconds by package:", results["importtime_by_package_s"][:15])  # type: ignore[index]
    for row in (results["profile"] or {}).get("cumulative", [])[:25]:  # type: ignore[attr-defined]
        print(f"{row[1]:7.2f} {row[0][:150]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
