"""Variant (a): the same training as a job through the service (API + worker + trainer child),
twice: the second job of the same model finds the first one's compile cache under DATA_DIR.

    python3 bench/service_jobs.py --out DIR [--shape ...] [--steps N] [--second-steps N]"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    ROOT,
    add_workload_args,
    dataset_rows,
    model_flops_per_token,
    prepare,
    save,
    settings,
    step_rate,
    tokens_per_step,
)

sys.path.insert(0, str(ROOT))
from scripts.nvidia_smi import MemorySampler
from scripts.service_harness import Service


def iso(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def run_job(service: Service, spec: dict, steps: int, s: dict, workdir: Path) -> dict:
    http = service.http()
    spec = {**spec, "hyperparameters": {**spec["hyperparameters"], "max_steps": steps}}
    with MemorySampler(workdir / "nvidia-smi.csv") as smi:
        posted = time.time()
        job_id = http.post("/jobs", json=spec).json()["id"]
        record = service.wait_for(job_id, timeout_s=560, echo=True)
    if record["status"] != "succeeded":
        raise SystemExit(f"job {job_id} {record['status']}: {record['error']}")
    smi_peak = smi.peak_bytes()
    logs = http.get(f"/jobs/{job_id}/logs").json()["items"]
    events = http.get(f"/jobs/{job_id}/events").json()["items"]
    job_dir = workdir / "service" / "data" / "jobs" / str(job_id)
    result = json.loads((job_dir / "result.json").read_text())
    shutil.rmtree(job_dir / "checkpoints")  # 16 GB a job: the next one needs the disk
    step_ends = [(row["step"], iso(row["created_at"])) for row in logs]
    reported = [row["tokens_per_second"] for row in logs[1:] if row["tokens_per_second"]]
    started = next(iso(e["created_at"]) for e in events if e["kind"] == "started")
    vram = record["vram"]
    return {
        "job_id": job_id,
        **step_rate(step_ends, tokens_per_step(s)),
        "reported_tokens_per_second_mean": round(sum(reported) / len(reported), 1) if reported else None,
        "reported_tokens_per_step": (logs[-1]["num_tokens"] / logs[-1]["step"]) if logs else None,
        "first_step_seconds": result.get("first_step_seconds"),
        "post_to_first_step_seconds": round(step_ends[0][1] - posted, 2),
        "post_to_started_seconds": round(started - posted, 2),
        "torch_peak_allocated_bytes": vram["peak_allocated"],
        "nvml_device_used_peak_bytes": vram["device_used_peak"],
        "nvidia_smi_peak_bytes": smi_peak,
        "record_vs_nvidia_smi_peak": round(abs(vram["device_used_peak"] - smi_peak) / smi_peak, 4),
        "device_total_bytes": vram["device_total"],
        "callback_overhead_seconds": result.get("callback_overhead_seconds"),
        "train_seconds": result.get("train_seconds"),
        "callback_overhead_share": round(result["callback_overhead_seconds"] / result["train_seconds"], 5)
        if result.get("train_seconds")
        else None,
        "versions": record["versions"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    add_workload_args(parser)
    parser.add_argument("--second-steps", type=int, default=3, help="0 skips the second (warm-cache) job")
    args = parser.parse_args()
    s = settings(args)
    workdir = Path(args.workdir)
    model_dir, dataset = prepare(workdir, args.shape, args.seq_len, dataset_rows(args))
    spec = {
        "model": str(model_dir),
        "dataset": {"source": str(dataset)},
        "backend": "unsloth",
        "hyperparameters": {
            "per_device_train_batch_size": args.micro_batch,
            "gradient_accumulation_steps": args.grad_accum,
            "max_seq_length": args.seq_len,
            "learning_rate": 5e-6,
            "warmup_ratio": 0.03,
            "optim": "paged_adamw_8bit",
            "logging_steps": 1,
            "save_steps": 100_000,
            "seed": 42,
        },
    }
    shutil.rmtree(workdir / "service", ignore_errors=True)  # a cold compile cache for the first job
    with Service(workdir / "service", allowed_roots=[workdir / "models", workdir / "datasets"]) as service:
        first = run_job(service, spec, args.steps, s, workdir)
        config = json.loads((model_dir / "config.json").read_text())
        import torch

        summary = {
            "variant": "a: job through the service",
            "settings": s,
            **first,
            "flops_per_token": model_flops_per_token(config, args.seq_len),
            "card": torch.cuda.get_device_name(0),
            "second_job": None,
        }
        save(Path(args.out), "service", summary)  # kept even if the second job fails
        second = run_job(service, spec, args.second_steps, s, workdir) if args.second_steps else None
    save(
        Path(args.out),
        "service",
        {
            **summary,
            "second_job": None
            if second is None
            else {
                k: second[k]
                for k in (
                    "post_to_first_step_seconds",
                    "post_to_started_seconds",
                    "first_step_seconds",
                    "tokens_per_second",
                )
            },
        },
    )


if __name__ == "__main__":
    main()
