"""Jobs on several GPUs, measured through the service on a machine of two or more GPUs.

Run from the repository root on the GPU machine (docs/gpu.md):
    scripts/gpu-multi [--out DIR] [--budget-s 560] [--phases smoke,scaling] [--ddp-compile whole]

One worker leases the host's GPUs (`--gpus 0,1`). Phases, in order while the budget lasts:

- smoke: a ~300M Llama on 2 GPUs, once with DDP (backend auto: Unsloth) and once with FSDP
  (backend auto: transformers): each must succeed, name its GPUs, report VRAM per GPU, save a
  `final` that loads and generates, and leave no process on the GPUs.
- scaling: the Llama-3.1-8B shape at seq 4096 (micro-batch 2, accumulation 4, packed), on 1 GPU
  and then on 2 GPUs with DDP, in this one call: tokens/s of the whole job (the median of its
  logging windows after the first step), torch and NVML peaks per GPU, and the scaling.

Writes OUT/multi-gpu.json (with `card`, `gpus`, `strategy`, `tokens_per_second`, `scaling_vs_1gpu`
per run) and prints a table last; exits 1 on a failed check."""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.service_harness import Service
from tests.builders import LLAMA_3_1_8B, SMALL_LLAMA, WORDS, build_llama, chat_rows, write_jsonl

GIB = 1024**3


class Run:
    def __init__(self, out: Path, budget_s: float) -> None:
        self.out = out
        self.deadline = time.monotonic() + budget_s
        self.checks: list[tuple[str, bool, str]] = []
        self.results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "runs": []}

    def check(self, name: str, ok: bool, detail: object = "") -> None:
        self.checks.append((name, bool(ok), str(detail)[:600]))
        print(f"[{'ok' if ok else 'FAIL'}] {name} {str(detail)[:600]}", flush=True)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        self.results["checks"] = self.checks
        (self.out / "multi-gpu.json").write_text(json.dumps(self.results, indent=2))


def gpu_processes() -> list[str]:
    found = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    own = str(os.getpid())  # this script's own context, from building the models on the GPU
    return [line for line in found.splitlines() if line.strip() and line.split(",")[0].strip() != own]


def job_figures(service: Service, job_id: int) -> dict[str, Any]:
    http = service.http()
    record = http.get(f"/jobs/{job_id}").json()
    rows = http.get(f"/jobs/{job_id}/logs", params={"limit": 5000}).json()["items"]
    rates = [r["tokens_per_second"] for r in rows if r["tokens_per_second"]]
    steady = rates[1:] or rates  # the first window can still hold compile work
    per_gpu = record["vram"].get("per_gpu") or [record["vram"]]
    return {
        "job_id": job_id,
        "status": record["status"],
        "error": record["error"],
        "backend": record["backend"],
        "placement": record["placement"],
        "steps_logged": [r["step"] for r in rows],
        "tokens_per_second_windows": rates,
        "tokens_per_second": round(statistics.median(steady), 1) if steady else None,
        "torch_peak_gib_per_gpu": [round((g.get("peak_allocated") or 0) / GIB, 2) for g in per_gpu],
        "nvml_peak_gib_per_gpu": [round((g.get("device_used_peak") or 0) / GIB, 2) for g in per_gpu],
        "card_gib": round((per_gpu[0].get("device_total") or 0) / GIB, 1),
        "events": [f"{e['kind']}: {e['message'][:300]}" for e in http.get(f"/jobs/{job_id}/events").json()["items"]],
    }


def final_generates(service: Service, job_id: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = service.job_dir(job_id) / "checkpoints" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    out = model.generate(**tokenizer("hello there", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    return str(tokenizer.decode(out[0]))


def run_job(run: Run, service: Service, spec: dict[str, Any], label: str) -> dict[str, Any]:
    job_id = service.http().post("/jobs", json=spec).json()["id"]
    service.wait_for(job_id, timeout_s=max(60, run.time_left()), echo=True)
    figures = {"label": label, **job_figures(service, job_id)}
    run.check(f"{label}: succeeded", figures["status"] == "succeeded", figures["error"])
    run.check(
        f"{label}: steps logged once",
        len(figures["steps_logged"]) == len(set(figures["steps_logged"])),
        figures["steps_logged"],
    )
    time.sleep(3)
    run.check(f"{label}: no process left on the GPUs", not gpu_processes(), gpu_processes())
    return figures


def scaling(run: Run, service: Service, model: Path, dataset: Path, args: argparse.Namespace) -> None:
    """The 8B shape on 1 GPU, then on 2 with DDP for each DDP_COMPILE in --ddp-compile (a worker
    of its own each: the setting is the worker's). A variant given a cap in --cap-s (e.g.
    whole:150) is cancelled if its first step has not come by then, with torch's recompile and
    graph-break logs in its trainer logs."""
    caps = dict(item.split(":") for item in args.cap_s.split(",") if item)
    baseline: float | None = None
    for count, compile_mode in [(1, None), *((2, mode) for mode in args.ddp_compile.split(","))]:
        label = f"8b-{count}gpu" + (f"-compile-{compile_mode}" if compile_mode else "")
        if run.time_left() < 150:
            run.check(f"{label} skipped: out of time", False)
            continue
        cap = float(caps[compile_mode]) if compile_mode in caps else None
        worker_env = {"DDP_COMPILE": compile_mode or "whole"}
        if cap is not None:
            worker_env["TORCH_LOGS"] = "recompiles,graph_breaks"
        service.stop_workers()
        service.start_worker(WORKER_GPUS=",".join(str(i) for i in range(count)), **worker_env)
        spec = {
            "model": str(model),
            "dataset": {"source": str(dataset)},
            "gpus": count,
            "strategy": "ddp",
            "backend": "unsloth",
            "hyperparameters": {
                "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 4,
                "max_seq_length": 4096,
                "packing": True,
                "learning_rate": 1e-5,
                "max_steps": args.steps,
                "logging_steps": 1,
                "save_steps": 100_000,
            },
        }
        if cap is not None:
            job_id = service.http().post("/jobs", json=spec).json()["id"]
            reached = first_step_within(service, job_id, cap)
            run.check(f"{label}: first step within {cap:.0f} s of training start", reached)
            if not reached:
                service.http().post(f"/jobs/{job_id}/cancel")
                service.wait_for(job_id, timeout_s=120)
                run.results["runs"].append({"label": label, **job_figures(service, job_id), "reached_step": False})
                run.save()
                continue
            service.wait_for(job_id, timeout_s=max(60, run.time_left()), echo=True)
            figures = {"label": label, **job_figures(service, job_id)}
        else:
            figures = run_job(run, service, spec, label)
        figures.update(card=run.results["card"], gpus=count, strategy="single" if count == 1 else "ddp")
        figures["ddp_compile"] = compile_mode
        rate = figures["tokens_per_second"]
        if count == 1:
            baseline = rate
        figures["scaling_vs_1gpu"] = round(rate / baseline, 3) if rate and baseline else None
        run.results["runs"].append(figures)
        with service.http() as http:  # 16 GB of `final` each: give the disk back
            http.delete(f"/jobs/{figures['job_id']}")
        run.save()


def first_step_within(service: Service, job_id: int, cap_s: float) -> bool:
    """Whether the job logs its first step within cap_s of entering the training phase."""
    training_since: float | None = None
    while True:
        record = service.job(job_id)
        if record["status"] not in ("queued", "running"):
            return False
        if record["progress"]["step"] >= 1:
            return True
        if record["phase"] == "training" and training_since is None:
            training_since = time.monotonic()
            print(f"  job {job_id}: training phase entered; waiting up to {cap_s:.0f} s for step 1", flush=True)
        if training_since is not None and time.monotonic() - training_since > cap_s:
            return False
        time.sleep(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu-multi"))
    parser.add_argument("--budget-s", type=float, default=560)
    parser.add_argument("--phases", default="smoke,scaling")
    parser.add_argument("--ddp-compile", default="off,whole", help="DDP_COMPILE values to run on 2 GPUs, in order")
    parser.add_argument("--cap-s", default="", help="e.g. whole:150: give up on a variant's first step after that")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--smoke", default="ddp,fsdp", help="strategies the smoke phase runs")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, args.budget_s)
    phases = args.phases.split(",")

    import torch

    gpus = torch.cuda.device_count()
    run.results["card"] = torch.cuda.get_device_name(0)
    run.results["host_gpus"] = gpus
    chat = write_jsonl(out / "datasets" / "chat.jsonl", chat_rows(4000, words=60, system=True))
    rng = random.Random(0)
    long_text = write_jsonl(
        out / "datasets" / "long.jsonl",
        [{"text": " ".join(rng.choice(WORDS) for _ in range(3000))} for _ in range(1500)],
    )
    service = Service(
        out / "service",
        allowed_roots=[out / "models", out / "datasets"],
        settings={"TRAINER_STANDBY": "0", "DDP_COMPILE": "off"},
    )
    service.start(WORKER_GPUS=",".join(str(i) for i in range(min(gpus, 2))))
    try:
        if "smoke" in phases:
            small = build_llama(out / "models" / "small-llama", shape=SMALL_LLAMA, dtype="bfloat16", device="cuda")
            for strategy in args.smoke.split(","):
                if run.time_left() < 90:
                    run.check(f"smoke {strategy} skipped: out of time", False)
                    continue
                spec = {
                    "model": str(small),
                    "dataset": {"source": str(chat)},
                    "gpus": 2,
                    "strategy": strategy,
                    "hyperparameters": {
                        "per_device_train_batch_size": 4,
                        "gradient_accumulation_steps": 2,
                        "max_seq_length": 1024,
                        "learning_rate": 1e-4,
                        "max_steps": 20,
                        "logging_steps": 2,
                        "save_steps": 10,
                    },
                }
                figures = run_job(run, service, spec, f"smoke-{strategy}")
                placed = figures["placement"] or {}
                run.check(
                    f"smoke-{strategy}: names its 2 GPUs",
                    len(placed.get("gpus", [])) == 2 and all(g["uuid"].startswith("GPU-") for g in placed["gpus"]),
                    placed,
                )
                run.check(f"smoke-{strategy}: VRAM per GPU", len(figures["torch_peak_gib_per_gpu"]) == 2, figures)
                if figures["status"] == "succeeded":
                    try:
                        text = final_generates(service, figures["job_id"])
                        run.check(f"smoke-{strategy}: final loads and generates", bool(text), text)
                    except Exception as exc:
                        run.check(f"smoke-{strategy}: final loads and generates", False, repr(exc))
                run.results["runs"].append(figures)
                run.save()

        if "scaling" in phases:
            big = build_llama(out / "models" / "llama-8b", shape=LLAMA_3_1_8B, dtype="bfloat16", device="cuda")
            torch.cuda.empty_cache()
            scaling(run, service, big, long_text, args)
    finally:
        service.stop()
        run.save()

    print("\n| run | backend | strategy | tokens/s | scaling | torch peak GiB/GPU | NVML peak GiB/GPU |")
    print("|---|---|---|---|---|---|---|")
    for r in run.results["runs"]:
        placed = r.get("placement") or {}
        print(
            f"| {r['label']} | {r['backend']} | {placed.get('strategy')} | {r['tokens_per_second']} | "
            f"{r.get('scaling_vs_1gpu')} | {r['torch_peak_gib_per_gpu']} | {r['nvml_peak_gib_per_gpu']} |"
        )
    failed = [c for c in run.checks if not c[1]]
    print(f"\n{len(run.checks) - len(failed)} checks passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
