"""The same 1-GPU job through the default path and through Ray (RAY_ADDRESS), on the same card in
one call: Ray's tokens/s against the default's, and what Ray adds before the first step.

Run from the repository root on the GPU machine (docs/cluster.md, docs/gpu.md):
    scripts/gpu-cluster [--out DIR] [--shape 8b|smoke] [--steps 10] [--budget-s 560]

1. Builds a random-weight model of `--shape` on the GPU (8b: Llama-3.1-8B's shape) and a dataset.
2. `default`: the service as on one host (a worker of GPU 0, no standby trainer), the job.
3. `ray`: a one-node Ray head on this machine (`ray start --head --num-gpus 1`), the service with
   RAY_ADDRESS and a shared folder as STORAGE_URL, the same job: Ray Train places its one rank.
Each path has a DATA_DIR of its own, so both start with cold compile caches.

Per run: tokens/s (the median of the logging windows after the first), the seconds from the
job's start (its claim by a worker) to its first logged step, and the startup event. Writes
OUT/cluster.json (card, date, runs, `tokens_per_second_ratio` = ray / default,
`first_step_overhead_s` = ray - default) and prints a table last; exits 1 on a failed check."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.service_harness import Service, free_port
from tests.builders import LLAMA_3_1_8B, SMALL_LLAMA, WORDS, build_llama, write_jsonl

GIB = 1024**3


def spec_for(model: Path, dataset: Path, steps: int, shape: str) -> dict[str, Any]:
    return {
        "model": str(model),
        "dataset": {"source": str(dataset)},
        "backend": "unsloth",
        "hyperparameters": {
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 4,
            "max_seq_length": 4096 if shape == "8b" else 1024,
            "packing": True,
            "learning_rate": 1e-5,
            "max_steps": steps,
            "logging_steps": 1,
            "save_steps": 100_000,
        },
    }


def seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return round((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds(), 1)


def run_path(label: str, service: Service, spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    http = service.http()
    job_id = http.post("/jobs", json=spec).json()["id"]
    service.wait_for(job_id, timeout_s=timeout_s, echo=True)
    record = http.get(f"/jobs/{job_id}").json()
    rows = http.get(f"/jobs/{job_id}/logs", params={"limit": 5000}).json()["items"]
    events = http.get(f"/jobs/{job_id}/events").json()["items"]
    rates = [r["tokens_per_second"] for r in rows if r["tokens_per_second"]]
    steady = rates[1:] or rates
    first = rows[0] if rows else {}
    return {
        "label": label,
        "job_id": job_id,
        "status": record["status"],
        "error": record["error"],
        "backend": record["backend"],
        "placement": record["placement"],
        "steps_logged": [r["step"] for r in rows],
        "tokens_per_second_windows": rates,
        "tokens_per_second": round(statistics.median(steady), 1) if steady else None,
        "start_to_first_step_s": seconds_between(record["started_at"], first.get("created_at")),
        "created_to_first_step_s": seconds_between(record["created_at"], first.get("created_at")),
        "nvml_peak_gib": round((record["vram"] or {}).get("device_used_peak", 0) / GIB, 2),
        "events": [f"{e['kind']}: {e['message'][:300]}" for e in events],
    }


def start_ray_head(out: Path) -> tuple[str, list[str]]:
    """A one-node Ray cluster: `ray start --head` through the module (the bundle has no console
    scripts). Returns its address and the command that stops it."""
    port = free_port()
    temp = Path("/tmp/ray-gpu-cluster")
    shutil.rmtree(temp, ignore_errors=True)
    ray = [sys.executable, "-m", "ray.scripts.scripts"]
    started = time.monotonic()
    done = subprocess.run(
        [
            *ray,
            "start",
            "--head",
            f"--port={port}",
            "--num-gpus=1",
            f"--num-cpus={min(8, os.cpu_count() or 1)}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    (out / "ray-start.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"ray start failed: {done.stderr[-2000:]}")
    print(f"Ray head up in {time.monotonic() - started:.1f} s on port {port}", flush=True)
    return f"127.0.0.1:{port}", [*ray, "stop", "--force"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu-cluster"))
    parser.add_argument("--shape", choices=["8b", "smoke"], default="8b")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=560)
    parser.add_argument("--order", default="default,ray", help="which path first")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s

    import torch

    results: dict[str, Any] = {
        "card": torch.cuda.get_device_name(0),
        "date": time.strftime("%Y-%m-%d"),
        "shape": args.shape,
        "steps": args.steps,
        "runs": [],
    }
    checks: list[tuple[str, bool, str]] = []

    def check(name: str, ok: bool, detail: object = "") -> None:
        checks.append((name, bool(ok), str(detail)[:600]))
        print(f"[{'ok' if ok else 'FAIL'}] {name} {str(detail)[:600]}", flush=True)

    def save() -> None:
        results["checks"] = checks
        (out / "cluster.json").write_text(json.dumps(results, indent=2))

    started = time.monotonic()
    model = build_llama(
        out / "models" / args.shape,
        shape=LLAMA_3_1_8B if args.shape == "8b" else SMALL_LLAMA,
        dtype="bfloat16",
        device="cuda",
    )
    torch.cuda.empty_cache()
    print(f"built the {args.shape} model in {time.monotonic() - started:.0f} s", flush=True)
    import random

    rng = random.Random(0)
    dataset = write_jsonl(
        out / "datasets" / "long.jsonl",
        [{"text": " ".join(rng.choice(WORDS) for _ in range(3000))} for _ in range(600)],
    )
    spec = spec_for(model, dataset, args.steps, args.shape)
    roots = [out / "models", out / "datasets"]
    stop_ray: list[str] | None = None
    try:
        for label in args.order.split(","):
            left = deadline - time.monotonic()
            if left < 120:
                check(f"{label}: skipped, out of time", False, f"{left:.0f} s left")
                continue
            settings = {"TRAINER_STANDBY": "0"}
            if label == "ray":
                address, stop_ray = start_ray_head(out)
                settings.update(RAY_ADDRESS=address, STORAGE_URL=str(out / "ray" / "shared"))
            service = Service(out / label, allowed_roots=roots, settings=settings)
            try:
                service.start(WORKER_GPUS="0")
                figures = run_path(label, service, spec, timeout_s=max(60, deadline - time.monotonic()))
            except AssertionError as exc:
                check(f"{label}: finished within the budget", False, exc)
                continue
            finally:
                service.stop()
                (out / f"{label}-logs.txt").write_text(service.logs(tail_chars=20000))
            results["runs"].append(figures)
            check(f"{label}: succeeded", figures["status"] == "succeeded", figures["error"])
            steps = figures["steps_logged"]
            check(f"{label}: each step logged once", steps == list(range(1, args.steps + 1)), steps)
            save()
    finally:
        if stop_ray is not None:
            subprocess.run(stop_ray, capture_output=True, check=False)
        save()

    by_label = {r["label"]: r for r in results["runs"]}
    default, ray = by_label.get("default"), by_label.get("ray")
    if default and ray and default["tokens_per_second"] and ray["tokens_per_second"]:
        results["tokens_per_second_ratio"] = round(ray["tokens_per_second"] / default["tokens_per_second"], 4)
        if default["start_to_first_step_s"] is not None and ray["start_to_first_step_s"] is not None:
            results["first_step_overhead_s"] = round(ray["start_to_first_step_s"] - default["start_to_first_step_s"], 1)
        check("ray placed the rank", any("placed by Ray" in e for e in ray["events"]), ray["placement"])
        check(
            "tokens/s through Ray >= 0.98 of the default's",
            results["tokens_per_second_ratio"] >= 0.98,
            results["tokens_per_second_ratio"],
        )
    save()

    print(f"\n{results['card']}, {results['date']}, shape {args.shape}, {args.steps} steps")
    print("| path | tokens/s | start -> first step (s) | submit -> first step (s) | NVML peak GiB |")
    print("|---|---|---|---|---|")
    for r in results["runs"]:
        print(
            f"| {r['label']} | {r['tokens_per_second']} | {r['start_to_first_step_s']} | "
            f"{r['created_to_first_step_s']} | {r['nvml_peak_gib']} |"
        )
    print(
        f"tokens/s ratio (ray / default): {results.get('tokens_per_second_ratio')}; "
        f"first-step overhead of Ray: {results.get('first_step_overhead_s')} s"
    )
    failed = [c for c in checks if not c[1]]
    print(f"\n{len(checks) - len(failed)} checks passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
