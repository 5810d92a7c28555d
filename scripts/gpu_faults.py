"""GPU fault check: a worker killed while Unsloth writes a checkpoint, and the job resumed.

Run on a GPU machine from the repository root (see docs/gpu.md):
    scripts/gpu-faults [--out DIR]
It starts redis-server, the API and a worker whose trainer is held (a failpoint) in the middle
of writing checkpoint-20 of an Unsloth full fine-tune on a ~300M-parameter random Llama; kills
the worker, its work horse and the trainer with SIGKILL; checks that no incomplete checkpoint is
visible and the GPU's memory is returned; starts a new worker, and checks that the job resumes
from checkpoint-10 on Unsloth, logs every step once and ends `succeeded` with loadable weights.
Prints the seconds each checkpoint's fsync and rename took. Exits 1 on a failed check."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts import nvidia_smi
from scripts.service_harness import Service, process_tree
from tests.builders import SMALL_LLAMA, build_llama, chat_rows, write_jsonl

GIB = 1024**3
MIB = 1024**2


def gpu_used_bytes(cpu_smoke: bool) -> int:
    if cpu_smoke:
        return 0
    return nvidia_smi.used_bytes(0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu-faults"))
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="a tiny model on the CPU with the transformers backend: checks this script, not Unsloth",
    )
    args = parser.parse_args()
    backend, shape, device, dtype = (
        ("transformers", None, "cpu", "float32") if args.cpu_smoke else ("unsloth", SMALL_LLAMA, "cuda", "bfloat16")
    )
    out: Path = args.out
    checks: list[tuple[str, bool, str]] = []

    def check(name: str, ok: bool, detail: object = "") -> None:
        checks.append((name, bool(ok), str(detail)))
        print(f"[{'ok' if ok else 'FAIL'}] {name} {detail}", flush=True)

    model_dir = build_llama(out / "models" / "small-llama", shape=shape, dtype=dtype, device=device)
    dataset = write_jsonl(out / "datasets" / "chat.jsonl", chat_rows(4000, words=60, system=True))
    idle_used = gpu_used_bytes(args.cpu_smoke)
    spec = {
        "model": str(model_dir),
        "dataset": {"source": str(dataset)},
        "backend": backend,
        "hyperparameters": {
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 2,
            "max_seq_length": 64 if args.cpu_smoke else 1024,
            "learning_rate": 1e-4,
            "max_steps": 30,
            "logging_steps": 1,
            "save_steps": 10,
        },
    }
    service = Service(
        out / "service",
        allowed_roots=[out / "models", out / "datasets"],
        settings={"STALE_AFTER_S": "10", "HEARTBEAT_INTERVAL_S": "2", "RECONCILE_INTERVAL_S": "3"},
    )
    service.start(worker=False)
    try:
        worker = service.start_worker(FINETUNE_FAILPOINTS="checkpoint_writing@20=pause")
        http = service.http()
        job_id = http.post("/jobs", json=spec).json()["id"]
        job_dir = out / "service" / "data" / "jobs" / str(job_id)
        marker = job_dir / "failpoint-checkpoint_writing"
        deadline = time.monotonic() + 480
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        check("trainer held while writing checkpoint-20", marker.exists())
        checkpoints = job_dir / "checkpoints"
        visible = sorted(p.name for p in checkpoints.iterdir() if p.is_dir())
        check(
            "half-written checkpoint-20 is not visible", visible == [".partial-checkpoint-20", "checkpoint-10"], visible
        )
        trainer = int(marker.read_text())
        for pid in process_tree(worker.pid):
            os.kill(pid, signal.SIGKILL)
        worker.wait(30)
        time.sleep(3)
        check("the killed trainer is gone", not Path(f"/proc/{trainer}").exists(), trainer)
        returned = gpu_used_bytes(args.cpu_smoke)
        check(
            "the GPU's memory is returned",
            returned <= idle_used + 512 * MIB,
            f"{returned / GIB:.2f} GiB used (idle {idle_used / GIB:.2f} GiB)",
        )

        service.start_worker()
        record = service.wait_for(job_id, timeout_s=480, echo=True)
        check("job succeeded after the crash", record["status"] == "succeeded", record["error"])
        check("two attempts", record["attempts"] == 2, record["attempts"])
        events = http.get(f"/jobs/{job_id}/events").json()["items"]
        resumed = [e["message"] for e in events if e["kind"] == "resumed"]
        check(
            "resumed from checkpoint-10",
            resumed == ["resuming from checkpoint-10, the newest complete checkpoint"],
            resumed,
        )
        discarded = [e["message"] for e in events if e["kind"] == "checkpoint_discarded"]
        check(
            "the unfinished checkpoint-20 was removed",
            len(discarded) == 1 and ".partial-checkpoint-20" in discarded[0],
            discarded,
        )
        steps = [r["step"] for r in http.get(f"/jobs/{job_id}/logs").json()["items"]]
        check("every step logged once", steps == list(range(1, 31)), steps)
        names = [c["name"] for c in http.get(f"/jobs/{job_id}/checkpoints").json()["items"]]
        check(
            "checkpoints 10, 20, 30 and final",
            names == ["checkpoint-10", "checkpoint-20", "checkpoint-30", "final"],
            names,
        )
        publish = [
            (m.group(1), float(m.group(3)), int(m.group(2)))
            for e in events
            if e["kind"] == "checkpoint"
            and (
                m := re.match(r"saved (\S+) at step \d+ \((\d+) bytes.*fsync and rename took ([\d.]+) s", e["message"])
            )
        ]
        check(
            "fsync and rename timed for every save",
            [n for n, _s, _b in publish] == ["checkpoint-10", "checkpoint-20", "checkpoint-30", "final"],
            publish,
        )
        check("no staging folder left", not list(checkpoints.glob(".partial-*")))
    finally:
        service.stop()

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoints / "final", dtype=torch.bfloat16)
    check("final loads", model.num_parameters() > 0, f"{model.num_parameters():,} parameters")
    card = "cpu smoke" if args.cpu_smoke else torch.cuda.get_device_name(0)
    summary = {
        "card": card,
        "backend": backend,
        "date": time.strftime("%Y-%m-%d"),
        "publish_seconds": [{"name": n, "seconds": s, "bytes": b} for n, s, b in publish],
        "checks_failed": [c[0] for c in checks if not c[1]],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n| check | result | detail |\n|---|---|---|")
    for name, ok, detail in checks:
        print(f"| {name} | {'ok' if ok else 'FAIL'} | {detail[:100]} |")
    print(json.dumps(summary))
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
