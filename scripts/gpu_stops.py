"""Cancel, pause and stall on the GPU, with Unsloth and the standby trainer: the moments where a
cancel was once accepted and not honoured (issue: a trainer ran on for 2 minutes), and where a
pause in a job's first second killed its trainer.

Run on a GPU machine from the repository root (see docs/gpu.md):
    scripts/gpu-stops [--out DIR] [--budget-s 500]
It starts the service as a user would (TRAINER_STANDBY=1, STALL_AFTER_S=8) and builds a ~300M
random-weight Llama. Each scenario submits a job and, at its moment, cancels or pauses it:

- cancel or pause in the job's first second (the trainer is still starting: no signal handlers);
- cancel while the model loads, during the first (compiling) step, and mid-training (3 times);
- pause then cancel 1.5 s later (the later, stronger request wins);
- a trainer frozen with SIGSTOP (the `stalled` event), then let go (`stall_ended`).

For each: the final status, the seconds from the cancel's POST to `cancelled`, whether the job was
ever queued again, and whether a trainer process is left. Prints a table; writes OUT/stops.json;
exits 1 on a failed check."""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.service_harness import Service, trainer_pids, wait_until
from tests.builders import SMALL_LLAMA, build_llama, chat_rows, write_jsonl

FINISHED = {"succeeded", "failed", "cancelled"}


def read(path: Path) -> str:
    """A log that may not exist (a job cancelled before its trainer started has none)."""
    return path.read_text(errors="replace") if path.exists() else ""


class Stops:
    def __init__(self, service: Service, spec: dict[str, Any], budget_s: float) -> None:
        self.service = service
        self.http = service.http()
        self.spec = spec
        self.deadline = time.monotonic() + budget_s
        self.rows: list[dict[str, Any]] = []
        self.checks: list[tuple[str, bool, str]] = []

    def check(self, name: str, ok: bool, detail: object = "") -> None:
        self.checks.append((name, bool(ok), str(detail)))
        print(f"[{'ok' if ok else 'FAIL'}] {name} {detail}", flush=True)

    def record(self, job_id: int) -> dict[str, Any]:
        return dict(self.http.get(f"/jobs/{job_id}").json())

    def kinds(self, job_id: int) -> list[str]:
        return [e["kind"] for e in self.http.get(f"/jobs/{job_id}/events").json()["items"]]

    def wait(self, job_id: int, predicate: Any, what: str, timeout_s: float = 180) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            record = self.record(job_id)
            return record if predicate(record) else None

        return dict(wait_until(reached, timeout_s, f"job {job_id}: {what}", interval_s=0.05))

    def scenario(self, name: str, moment: Any, action: str, then_cancel_after_s: float | None = None) -> None:
        if time.monotonic() > self.deadline - 30:
            self.check(f"{name}: skipped, out of time", False)
            return
        job_id = self.service.submit(self.spec)
        at = self.wait(job_id, moment, f"the moment of {name}")
        asked = time.monotonic()
        response = self.http.post(f"/jobs/{job_id}/{action}")
        assert response.status_code == 200, response.text
        cancel_at = asked
        if then_cancel_after_s is not None:
            time.sleep(then_cancel_after_s)
            cancel_at = time.monotonic()
            assert self.http.post(f"/jobs/{job_id}/cancel").status_code == 200
        wanted = "paused" if action == "pause" and then_cancel_after_s is None else "cancelled"
        final = self.wait(job_id, lambda r: r["status"] in FINISHED | {"paused"}, "its end", timeout_s=120)
        ended = time.monotonic()
        if final["status"] == "paused" and wanted == "paused":
            self.http.post(f"/jobs/{job_id}/cancel")  # done with it
        try:
            left = bool(wait_until(lambda: not trainer_pids(self.service.data_dir, job_id), 30, "its trainer to end"))
        except AssertionError:
            left = False
        kinds = self.kinds(job_id)
        row = {
            "scenario": name,
            "job_id": job_id,
            "phase_at_request": at.get("phase"),
            "step_at_request": at["progress"]["step"],
            "status": final["status"],
            "seconds_to_end": round(ended - cancel_at, 2),
            "message": (final.get("error") or {}).get("message"),
            "requeued": any(k in ("requeued", "retried") for k in kinds),
            "standby": "takes job" in read(self.service.job_dir(job_id) / "trainer.log"),
        }
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.check(f"{name}: {wanted}", final["status"] == wanted, final.get("error"))
        self.check(f"{name}: never queued again", not row["requeued"], kinds)
        self.check(f"{name}: no trainer left", left)

    def stall(self) -> None:
        job_id = self.service.submit(self.spec)
        self.wait(job_id, lambda r: r["progress"]["step"] >= 3, "step 3")
        pid = trainer_pids(self.service.data_dir, job_id)[0]
        os.kill(pid, signal.SIGSTOP)
        frozen = time.monotonic()
        try:
            wait_until(lambda: "stalled" in self.kinds(job_id), 60, "the stalled event", interval_s=0.2)
            noticed = time.monotonic() - frozen
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_until(lambda: "stall_ended" in self.kinds(job_id), 60, "the stall_ended event", interval_s=0.2)
        self.http.post(f"/jobs/{job_id}/cancel")
        final = self.wait(job_id, lambda r: r["status"] in FINISHED, "its end")
        self.rows.append({"scenario": "stall", "job_id": job_id, "seconds_to_stalled_event": round(noticed, 1)})
        self.check("stall: reported after STALL_AFTER_S=8", 8 <= noticed < 20, f"{noticed:.1f} s")
        self.check("stall: cancelled afterwards", final["status"] == "cancelled", final.get("error"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu-stops"))
    parser.add_argument("--budget-s", type=float, default=500)
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    import torch

    card = torch.cuda.get_device_name(0)
    model = build_llama(out / "models" / "small-llama", shape=SMALL_LLAMA, dtype="bfloat16", device="cuda")
    chat = write_jsonl(out / "datasets" / "chat.jsonl", chat_rows(4000, words=60, system=True))
    spec = {
        "model": str(model),
        "dataset": {"source": str(chat)},
        "backend": "unsloth",
        "hyperparameters": {
            # 16 micro-batches a step: a cancel that waited for the step's end would wait for all of them.
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 16,
            "max_seq_length": 1024,
            "learning_rate": 1e-5,
            "max_steps": 10_000,
            "logging_steps": 1,
            "save_steps": 100_000,
        },
    }
    service = Service(
        out / "service",
        allowed_roots=[out / "models", out / "datasets"],
        settings={"TRAINER_STANDBY": "1", "STALL_AFTER_S": "8"},
    )
    service.start()
    run = Stops(service, spec, args.budget_s)
    try:
        running = lambda r: r["status"] == "running"  # noqa: E731
        run.scenario("cancel in the first second", running, "cancel")
        run.scenario("pause in the first second", running, "pause")
        run.scenario("cancel while loading", lambda r: r.get("phase") in ("loading_model", "preparing"), "cancel")
        run.scenario(
            "cancel in the first (compiling) step",
            lambda r: r.get("phase") == "training" and r["progress"]["step"] == 0,
            "cancel",
        )
        for count in range(3):
            run.scenario(f"cancel mid-training #{count + 1}", lambda r: r["progress"]["step"] >= 3, "cancel")
        run.scenario("pause, then cancel 1.5 s later", lambda r: r["progress"]["step"] >= 3, "pause", 1.5)
        run.stall()
    finally:
        service.stop()
    latencies = [r["seconds_to_end"] for r in run.rows if r.get("status") == "cancelled"]
    result = {
        "card": card,
        "date": time.strftime("%Y-%m-%d"),
        "rows": run.rows,
        "cancel_seconds": {
            "n": len(latencies),
            "median": statistics.median(latencies) if latencies else None,
            "max": max(latencies, default=None),
        },
        "checks": run.checks,
    }
    (out / "stops.json").write_text(json.dumps(result, indent=2))
    print(f"\n{card}, {result['date']}")
    print(f"{'scenario':<40} {'phase':<14} {'step':>4} {'status':<10} {'s to end':>8} standby")
    for row in run.rows:
        if "status" in row:
            print(
                f"{row['scenario']:<40} {str(row['phase_at_request']):<14} {row['step_at_request']:>4} "
                f"{row['status']:<10} {row['seconds_to_end']:>8} {row['standby']}"
            )
    failed = [c for c in run.checks if not c[1]]
    ok = len(run.checks) - len(failed)
    print(f"{ok}/{len(run.checks)} checks ok; cancel -> cancelled: {result['cancel_seconds']}")
    for name, _ok, detail in failed:
        print(f"FAIL {name}: {detail[:200]}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
