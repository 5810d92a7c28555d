"""Run-it-for-months checks on the GPU: where a job's first minutes go, a card shared with other
processes, a job too big for the card that heals itself, and pause/resume freeing the card.

Run on a GPU machine from the repository root (see docs/gpu.md):
    scripts/gpu-lifecycle [--out DIR] [--budget-s 540]
It starts the service as a user would and builds a ~300M-parameter random-weight Llama. Phases
run in order while the budget lasts (a skipped phase says so):

1. fast_start: seconds from POST to the first step and to `succeeded`, and the trainer's own
   phase-by-phase startup event, for two jobs of one model with a trainer started per job
   (TRAINER_STANDBY=0, before) and two with the standby trainer (=1, after). `startup` (the
   same for one service) and `imports` (python -X importtime of Unsloth) are there on request.
2. shared: another process holds memory on the card before a job starts (the job's events name
   it, with the plan's verdict for the free memory), then starts heavy compute mid-training (the
   slowdown event names it).
3. oom: a job sized far past the card (micro-batch 512 of packed 4096-token sequences; the API is
   told the card is 1 TiB so it does not refuse it) that halves its micro-batch until it fits and
   ends `succeeded`.
4. pause: a running job is paused (the card's memory returns to idle), resumed, and succeeds.

Prints a table; writes everything to OUT/lifecycle.json; exits 1 on a failed check."""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts import nvidia_smi
from scripts.service_harness import Service, wait_until
from tests.builders import SMALL_LLAMA, WORDS, build_llama, chat_rows, write_jsonl

GIB = 1024**3
HERE = Path(__file__).resolve().parent


def iso(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class Lifecycle:
    def __init__(self, out: Path, budget_s: float) -> None:
        self.out = out
        self.deadline = time.monotonic() + budget_s
        self.checks: list[tuple[str, bool, str]] = []
        self.results: dict[str, Any] = {"card": None, "date": time.strftime("%Y-%m-%d")}
        self.hogs: list[subprocess.Popen[bytes]] = []

    def check(self, name: str, ok: bool, detail: object = "") -> None:
        self.checks.append((name, bool(ok), str(detail)))
        print(f"[{'ok' if ok else 'FAIL'}] {name} {detail}", flush=True)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        self.results["checks"] = self.checks
        (self.out / "lifecycle.json").write_text(json.dumps(self.results, indent=2))

    def hog(self, gib: float, *, compute: bool = False) -> subprocess.Popen[bytes]:
        ready = self.out / f"hog-{len(self.hogs)}.ready"
        args = [sys.executable, str(HERE / "gpu_hog.py"), "--gib", str(gib), "--ready", str(ready)]
        self.hogs.append(subprocess.Popen(args + (["--compute"] if compute else [])))
        wait_until(ready.exists, 120, "the other GPU tenant to hold its memory", interval_s=0.2)
        return self.hogs[-1]

    def stop_hogs(self) -> None:
        for hog in self.hogs:
            hog.kill()
            hog.wait(30)
        self.hogs.clear()


def events(service: Service, job_id: int) -> list[dict[str, Any]]:
    return list(service.http().get(f"/jobs/{job_id}/events").json()["items"])


def timings(service: Service, job_id: int) -> dict[str, Any]:
    http = service.http()
    record = http.get(f"/jobs/{job_id}").json()
    logs = http.get(f"/jobs/{job_id}/logs", params={"limit": 5000}).json()["items"]
    posted = iso(record["created_at"])
    found = events(service, job_id)
    startup = next((e["message"] for e in found if e["kind"] == "startup"), None)
    return {
        "job_id": job_id,
        "status": record["status"],
        "post_to_first_step_s": round(iso(logs[0]["created_at"]) - posted, 1) if logs else None,
        "post_to_finished_s": round(iso(record["finished_at"]) - posted, 1) if record["finished_at"] else None,
        "startup_event": startup,
        "tokens_per_second_last": record["metrics"].get("tokens_per_second"),
    }


def import_times(out: Path) -> dict[str, Any]:
    """Where the trainer's `importing` phase goes: each library's import alone, in a fresh
    interpreter, and the slowest modules under `import unsloth` (python -X importtime)."""
    found: dict[str, Any] = {}
    for name, code in (
        ("torch", "import torch"),
        ("torch+cuda_init", "import torch; torch.cuda.init()"),
        ("transformers+trl+datasets", "import torch, transformers, trl, datasets"),
        ("unsloth", "import unsloth"),
    ):
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True)
        found[name] = round(time.monotonic() - started, 1)
        if name == "unsloth":
            rows = []
            for line in done.stderr.splitlines():
                parts = line.split("|")
                if len(parts) == 3 and parts[1].strip().isdigit():
                    rows.append((int(parts[1]), parts[2].rstrip()))
            (out / "importtime-unsloth.txt").write_text(done.stderr)
            top = sorted(rows, reverse=True)[:25]
            found["unsloth_slowest_cumulative_s"] = [(round(us / 1e6, 2), module) for us, module in top]
            found["unsloth_returncode"] = done.returncode
    return found


def fast_start(run: Lifecycle, out: Path, spec: Any) -> dict[str, Any]:
    """Before and after, in one call: two jobs of one model with trainers started for each job
    (TRAINER_STANDBY=0), then two with the standby trainer (=1). Both services share DATA_DIR's
    compile cache, as one worker's jobs do."""
    found: dict[str, Any] = {}
    data_dir = out / "fast-start-data"
    for standby in ("0", "1"):
        service = Service(
            out / f"fast-start-{standby}",
            data_dir=data_dir,
            allowed_roots=[out / "models", out / "datasets"],
            settings={"TRAINER_STANDBY": standby},
        )
        service.start()
        try:
            log = data_dir / "standby" / "standby.log"
            for count, name in enumerate(("first", "second"), start=1):
                if standby == "1":  # jobs that come while the worker waits for work: its standby is ready
                    wait_until(
                        lambda count=count, log=log: log.exists() and log.read_text().count("ready in") >= count,
                        120,
                        "the standby trainer",
                    )
                job_id = service.submit(spec(20))
                service.wait_for(job_id, timeout_s=max(60, run.time_left()), echo=True)
                found[f"standby_{standby}_{name}"] = timings(service, job_id)
                print(json.dumps(found[f"standby_{standby}_{name}"], indent=1), flush=True)
        finally:
            service.stop()
    before, after = found["standby_0_second"], found["standby_1_second"]
    run.check(
        "POST to first step, second job: standby trainer vs trainer started per job",
        (after["post_to_first_step_s"] or 1e9) < (before["post_to_first_step_s"] or 0),
        f"{after['post_to_first_step_s']} s vs {before['post_to_first_step_s']} s",
    )
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu-lifecycle"))
    parser.add_argument("--budget-s", type=float, default=540)
    parser.add_argument("--phases", default="fast_start,shared,oom,pause")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    run = Lifecycle(out, args.budget_s)
    phases = args.phases.split(",")

    import torch

    run.results["card"] = torch.cuda.get_device_name(0)
    model = build_llama(out / "models" / "small-llama", shape=SMALL_LLAMA, dtype="bfloat16", device="cuda")
    chat = write_jsonl(out / "datasets" / "chat.jsonl", chat_rows(4000, words=60, system=True))
    rng = random.Random(0)
    # Long text rows, packed into full 4096-token sequences: activations that scale with the batch.
    long_text = write_jsonl(
        out / "datasets" / "long.jsonl",
        [{"text": " ".join(rng.choice(WORDS) for _ in range(3000))} for _ in range(1400)],
    )

    def spec(steps: int, **hp: Any) -> dict[str, Any]:
        return {
            "model": str(model),
            "dataset": {"source": str(chat)},
            "backend": "unsloth",
            "hyperparameters": {
                "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 2,
                "max_seq_length": 1024,
                "learning_rate": 1e-4,
                "max_steps": steps,
                "logging_steps": 1,
                "save_steps": 100_000,
                **hp,
            },
        }

    if "fast_start" in phases:
        run.results["fast_start"] = fast_start(run, out, spec)
        run.save()

    service = Service(
        out / "service",
        allowed_roots=[out / "models", out / "datasets"],
        settings={"GPU_MEMORY_BYTES": str(1024 * GIB)},
    )
    service.start()
    http = service.http()
    try:
        if "startup" in phases:
            for name in ("cold", "warm"):
                job_id = http.post("/jobs", json=spec(20)).json()["id"]
                service.wait_for(job_id, timeout_s=max(60, run.time_left()), echo=True)
                run.results[f"startup_{name}"] = timings(service, job_id)
                run.check(f"{name} job succeeded", run.results[f"startup_{name}"]["status"] == "succeeded")
                print(json.dumps(run.results[f"startup_{name}"], indent=1), flush=True)
            run.save()

        if "imports" in phases:
            run.results["imports"] = import_times(out)
            print(json.dumps(run.results["imports"], indent=1), flush=True)
            run.save()

        if "shared" in phases and run.time_left() > 120:
            idle = nvidia_smi.used_bytes(0)
            free_gib = (torch.cuda.mem_get_info()[1] - idle) / GIB
            run.hog(free_gib - 30)  # leaves about 30 GiB: the job fits
            job_id = http.post("/jobs", json=spec(100)).json()["id"]
            service.wait_for_step(job_id, 30, timeout_s=max(60, run.time_left()))
            run.hog(2, compute=True)  # a second tenant that computes
            service.wait_for(job_id, timeout_s=max(60, run.time_left()), echo=True)
            found = events(service, job_id)
            shared = [e["message"] for e in found if e["kind"] == "gpu_shared"]
            slow = [e["message"] for e in found if e["kind"] == "slowdown"]
            run.results["shared"] = {**timings(service, job_id), "gpu_shared": shared, "slowdown": slow}
            run.check("the job names the other process on its GPU", len(shared) == 1 and "pid " in shared[0], shared)
            run.check("the slowdown is told with its cause", any("other processes hold" in m for m in slow), slow)
            run.stop_hogs()
            run.save()
        elif "shared" in phases:
            run.check("shared phase skipped: out of time", False)

        if "oom" in phases and run.time_left() > 120:
            big = spec(2, per_device_train_batch_size=512, gradient_accumulation_steps=1, max_seq_length=4096)
            big["dataset"] = {"source": str(long_text)}
            big["hyperparameters"]["packing"] = True
            job_id = http.post("/jobs", json=big).json()["id"]
            record = service.wait_for(job_id, timeout_s=max(60, run.time_left()), echo=True)
            halved = [e["message"] for e in events(service, job_id) if e["kind"] == "batch_halved"]
            hp = record["spec"]["hyperparameters"]
            run.results["oom"] = {
                **timings(service, job_id),
                "batch_halved": halved,
                "final_micro_batch": hp["per_device_train_batch_size"],
                "final_accumulation": hp["gradient_accumulation_steps"],
                "device_used_peak_gib": record["vram"].get("device_used_peak_gib"),
            }
            run.check("the oversized job healed and succeeded", record["status"] == "succeeded", record["error"])
            run.check("its micro-batch was halved at least once", len(halved) >= 1, halved)
            run.check(
                "the effective batch stayed 512",
                hp["per_device_train_batch_size"] * hp["gradient_accumulation_steps"] == 512,
                hp,
            )
            run.save()
        elif "oom" in phases:
            run.check("oom phase skipped: out of time", False)

        if "pause" in phases and run.time_left() > 90:
            idle = nvidia_smi.used_bytes(0)
            job_id = http.post("/jobs", json=spec(300)).json()["id"]
            service.wait_for_step(job_id, 20, timeout_s=max(60, run.time_left()))
            busy = nvidia_smi.used_bytes(0)
            http.post(f"/jobs/{job_id}/pause")
            paused = service.wait_for(job_id, {"paused", "succeeded", "failed"}, timeout_s=120)
            time.sleep(2)
            after = nvidia_smi.used_bytes(0)
            run.check("paused", paused["status"] == "paused", paused["status"])
            run.check(
                "the GPU's memory returned when paused",
                after <= idle + GIB // 2,
                f"idle {idle / GIB:.2f}, training {busy / GIB:.2f}, paused {after / GIB:.2f} GiB",
            )
            http.post(f"/jobs/{job_id}/resume")
            record = service.wait_for(job_id, timeout_s=max(60, run.time_left()), echo=True)
            steps = [r["step"] for r in http.get(f"/jobs/{job_id}/logs", params={"limit": 5000}).json()["items"]]
            run.check("resumed and succeeded", record["status"] == "succeeded", record["error"])
            run.check("every step logged once", steps == list(range(1, 301)), steps[:5])
            run.results["pause"] = {
                "paused_at": paused["progress"]["step"],
                "idle_gib": round(idle / GIB, 2),
                "training_gib": round(busy / GIB, 2),
                "paused_gib": round(after / GIB, 2),
            }
            run.save()
        elif "pause" in phases:
            run.check("pause phase skipped: out of time", False)
    finally:
        run.stop_hogs()
        service.stop()
        run.save()

    print(f"\n{'check':<55} result")
    for name, ok, detail in run.checks:
        print(f"{name:<55} {'ok' if ok else 'FAIL'}  {detail[:140]}")
    return 0 if all(ok for _n, ok, _d in run.checks) else 1


if __name__ == "__main__":
    sys.exit(main())
