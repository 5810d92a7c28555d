"""Jobs on several GPUs, measured through the service on a machine of two or more GPUs.

Run from the repository root on the GPU machine (docs/gpu.md):
    scripts/gpu-multi [--out DIR] [--budget-s 560] [--runs smoke-fsdp,8b-1gpu,8b-fsdp,8b-ddp-whole]

One worker leases the host's GPUs. `--runs` names the runs, in order, while the budget lasts:

- `smoke-ddp`, `smoke-fsdp`: a ~300M Llama on 2 GPUs (backend auto: Unsloth): each must
  succeed, name its GPUs, report VRAM per GPU, save `checkpoint-10` and a `final` that loads and
  generates, and leave no process on the GPUs.
- `<shape>-<mode>` with shape `8b` (Llama-3.1-8B), `14b` (phi-4) or `32b` (Qwen2.5-32B) and mode
  `1gpu`, `fsdp`, `fsdp-80gb` (FSDP planned for an 80 GB card: the layout such a card gets),
  `ddp-off`, `ddp-whole` or `ddp-split` (DDP_COMPILE): seq 4096, packed,
  micro-batch and accumulation from `--batch` (default 2x4), `--steps` steps; tokens/s of the whole
  job (the median of its logging windows after the first step), torch and NVML peaks per GPU,
  and `scaling_vs_1gpu` against the same shape's `1gpu` run of this call.

A run given a cap in `--cap-s` (e.g. `8b-ddp-whole:120`) is cancelled when its first step has not
come that many seconds after training began; `--dump-at 40,80` then takes stack dumps of every
trainer rank at those seconds (py-spy when it may attach, and always faulthandler's, which
`kill -QUIT` writes into the rank's log), saved under OUT/stacks/.

Writes OUT/multi-gpu.json (with `card`, `gpus`, `strategy`, `tokens_per_second`, `scaling_vs_1gpu`
per run) and prints a table last; exits 1 on a failed check."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.service_harness import Service, trainer_pids
from tests.builders import (
    LLAMA_3_1_8B,
    PHI_4_14B,
    QWEN_2_5_32B,
    SMALL_LLAMA,
    WORDS,
    build_llama,
    chat_rows,
    write_jsonl,
)

GIB = 1024**3
H100_80GB_BYTES = 81_559 * 1024**2  # what an H100 80GB HBM3 reports


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


SHAPES = {"8b": LLAMA_3_1_8B, "14b": PHI_4_14B, "32b": QWEN_2_5_32B}
MODES = {  # mode: (GPUs, strategy, DDP_COMPILE)
    "1gpu": (1, "auto", "whole"),
    "fsdp": (2, "fsdp", "whole"),
    "fsdp-80gb": (2, "fsdp", "whole"),  # planned as on an H100 80GB (GPU_MEMORY_BYTES): its FSDP layout
    "ddp-off": (2, "ddp", "off"),
    "ddp-whole": (2, "ddp", "whole"),
    "ddp-split": (2, "ddp", "split"),
}


def run_job(run: Run, service: Service, spec: dict[str, Any], label: str) -> dict[str, Any]:
    job_id = service.http().post("/jobs", json=spec).json()["id"]
    service.wait_for(job_id, timeout_s=max(60, run.time_left()), echo=True)
    return finish_job(run, service, job_id, label)


def finish_job(run: Run, service: Service, job_id: int, label: str) -> dict[str, Any]:
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


def smoke(run: Run, service: Service, model: Path, dataset: Path, strategy: str) -> None:
    spec = {
        "model": str(model),
        "dataset": {"source": str(dataset)},
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
    label = f"smoke-{strategy}"
    figures = run_job(run, service, spec, label)
    placed = figures["placement"] or {}
    run.check(
        f"{label}: names its 2 GPUs",
        len(placed.get("gpus", [])) == 2 and all(g["uuid"].startswith("GPU-") for g in placed["gpus"]),
        placed,
    )
    run.check(f"{label}: backend unsloth", figures["backend"] == "unsloth", figures["backend"])
    run.check(f"{label}: VRAM per GPU", len(figures["torch_peak_gib_per_gpu"]) == 2, figures)
    kept = sorted(p.name for p in (service.job_dir(figures["job_id"]) / "checkpoints").iterdir())
    run.check(f"{label}: checkpoint-10 and final kept", {"checkpoint-10", "final"} <= set(kept), kept)
    if figures["status"] == "succeeded":
        try:
            text = final_generates(service, figures["job_id"])
            run.check(f"{label}: final loads and generates", bool(text), text)
        except Exception as exc:
            run.check(f"{label}: final loads and generates", False, repr(exc))
    run.results["runs"].append(figures)
    run.save()


def measure(run: Run, service: Service, name: str, model: Path, dataset: Path, args: argparse.Namespace) -> None:
    """One `<shape>-<mode>` run on a worker of its own (DDP_COMPILE is the worker's setting)."""
    shape, mode = name.split("-", 1)
    count, strategy, compile_mode = MODES[mode]
    caps = dict(item.rsplit(":", 1) for item in args.cap_s.split(",") if item)
    cap = float(caps[name]) if name in caps else None
    service.stop_workers()
    card = {"GPU_MEMORY_BYTES": str(H100_80GB_BYTES)} if mode.endswith("-80gb") else {}
    service.start_worker(WORKER_GPUS=",".join(str(i) for i in range(count)), DDP_COMPILE=compile_mode, **card)
    micro, accumulation = (int(n) for n in args.batch.split("x"))
    spec = {
        "model": str(model),
        "dataset": {"source": str(dataset)},
        "gpus": count,
        "strategy": strategy,
        "backend": "unsloth",
        "hyperparameters": {
            "per_device_train_batch_size": micro,
            "gradient_accumulation_steps": accumulation,
            "max_seq_length": 4096,
            "packing": True,
            "learning_rate": 1e-5,
            "max_steps": args.steps,
            "logging_steps": 1,
            "save_steps": 100_000,
        },
    }
    job_id = service.http().post("/jobs", json=spec).json()["id"]
    if cap is not None:
        dumps = [float(t) for t in args.dump_at.split(",") if t]
        reached = first_step_within(service, job_id, cap, dumps, run.out / "stacks" / name)
        run.check(f"{name}: first step within {cap:.0f} s of training start", reached)
        if not reached:
            service.http().post(f"/jobs/{job_id}/cancel")
            service.wait_for(job_id, timeout_s=max(30, min(120, run.time_left())))
            keep_logs(service, job_id, run.out / "stacks" / name)
            run.results["runs"].append({"label": name, **job_figures(service, job_id), "reached_step": False})
            run.save()
            return
    try:
        service.wait_for(job_id, timeout_s=max(60, run.time_left()), echo=True)
    except AssertionError as exc:  # out of time (e.g. still saving `final`): keep what the record has
        run.check(f"{name}: finished within the budget", False, exc)
    figures = finish_job(run, service, job_id, name)
    figures.update(card=run.results["card"], gpus=count, strategy=(figures["placement"] or {}).get("strategy"))
    figures["ddp_compile"] = compile_mode if strategy == "ddp" and count > 1 else None
    figures["hyperparameters"] = spec["hyperparameters"]
    rate = figures["tokens_per_second"]
    baseline = next((r["tokens_per_second"] for r in run.results["runs"] if r["label"] == f"{shape}-1gpu"), None)
    figures["scaling_vs_1gpu"] = round(rate / baseline, 3) if rate and baseline else None
    run.results["runs"].append(figures)
    with service.http() as http:  # tens of GB of `final`: give the disk back
        http.delete(f"/jobs/{job_id}")
    run.save()


def first_step_within(service: Service, job_id: int, cap_s: float, dump_at: list[float], dumps: Path) -> bool:
    """Whether the job logs its first step within cap_s of entering the training phase; stack
    dumps of its ranks at the dump_at seconds meanwhile."""
    training_since: float | None = None
    pending = sorted(dump_at)
    while True:
        record = service.job(job_id)
        if record["status"] not in ("queued", "running"):
            return False
        if record["progress"]["step"] >= 1:
            return True
        if record["phase"] == "training" and training_since is None:
            training_since = time.monotonic()
            print(f"  job {job_id}: training phase entered; waiting up to {cap_s:.0f} s for step 1", flush=True)
        if training_since is not None:
            waited = time.monotonic() - training_since
            if pending and waited >= pending[0]:
                dump_stacks(service, job_id, dumps, f"{pending.pop(0):.0f}s")
            if waited > cap_s:
                return False
        time.sleep(1)


def dump_stacks(service: Service, job_id: int, folder: Path, tag: str) -> None:
    """Each rank's stack: py-spy's (with native frames) when it may attach, and faulthandler's
    into the rank's own log (trainer/__main__.py registers SIGQUIT)."""
    folder.mkdir(parents=True, exist_ok=True)
    spy = shutil.which("py-spy")
    for pid in trainer_pids(service.data_dir, job_id):
        if spy:
            command = [spy, "dump", "--native", "--pid", str(pid)]
            done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
            (folder / f"py-spy-{tag}-{pid}.txt").write_text(done.stdout + done.stderr)
        os.kill(pid, signal.SIGQUIT)
    print(f"  job {job_id}: stack dumps at {tag} -> {folder}", flush=True)


def keep_logs(service: Service, job_id: int, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for log in service.job_dir(job_id).glob("trainer*.log"):
        shutil.copy(log, folder / log.name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu-multi"))
    parser.add_argument("--budget-s", type=float, default=560)
    parser.add_argument("--runs", default="smoke-fsdp,8b-1gpu,8b-fsdp")
    parser.add_argument("--cap-s", default="", help="e.g. 8b-ddp-whole:120: give up on a run's first step after that")
    parser.add_argument("--dump-at", default="40,80", help="seconds into a capped run's training to dump stacks")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", default="2x4", help="micro-batch x accumulation of the measured runs")
    parser.add_argument("--keep-models", action="store_true", help="models built in OUT/models stay there")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, args.budget_s)
    names = [n for n in args.runs.split(",") if n]

    import torch

    gpus = torch.cuda.device_count()
    run.results["card"] = torch.cuda.get_device_name(0)
    run.results["host_gpus"] = gpus
    run.results["argv"] = sys.argv[1:]
    chat = write_jsonl(out / "datasets" / "chat.jsonl", chat_rows(4000, words=60, system=True))
    rng = random.Random(0)
    long_text = write_jsonl(
        out / "datasets" / "long.jsonl",
        [{"text": " ".join(rng.choice(WORDS) for _ in range(3000))} for _ in range(1500)],
    )
    service = Service(
        out / "service",
        allowed_roots=[out / "models", out / "datasets"],
        settings={"TRAINER_STANDBY": "0", "DDP_COMPILE": "whole"},
    )
    service.start(WORKER_GPUS=",".join(str(i) for i in range(min(gpus, 2))))
    built: dict[str, Path] = {}
    try:
        for name in names:
            shape = name.split("-", 1)[0]
            if run.time_left() < (90 if shape == "smoke" else 150):
                run.check(f"{name} skipped: out of time", False)
                continue
            if shape not in built:
                for old in built.values():  # one big model on the disk at a time
                    if not args.keep_models:
                        shutil.rmtree(old, ignore_errors=True)
                built.clear()
                started = time.monotonic()
                built[shape] = build_llama(
                    out / "models" / shape,
                    shape=SMALL_LLAMA if shape == "smoke" else SHAPES[shape],
                    dtype="bfloat16",
                    device="cuda",
                )
                torch.cuda.empty_cache()
                print(f"built the {shape} model in {time.monotonic() - started:.0f} s", flush=True)
            if shape == "smoke":
                smoke(run, service, built[shape], chat, name.split("-", 1)[1])
            else:
                measure(run, service, name, built[shape], long_text, args)
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
