"""Speed on the GPU (issue 25), in one call: the bare Unsloth recipe (bench/baseline.py) against the
service in bf16 and with `precision: fp8` on the Llama-3.1-8B shape (random weights, every sequence
cut at max_seq_length so tokens/s is arithmetic), both services' loss curves, the micro-batch
`per_device_train_batch_size: "auto"` chooses, POST-to-first-step of the first 8B job after the
service started and of a repeat of it (with the `startup` event's phases), and what the planner
learned from the finished job.

Run on a GPU machine from the repository root, the package bundle carried as .gpu/ (docs/gpu.md):
    scripts/gpu-speed --results $OUT [--budget-s 540] [--steps N] [--parts a,b,...]
Parts, in this order, while the budget lasts (a part skipped or failed says so; results/speed.json
is written after each part, so a later failure loses nothing):

1. bare: bench/baseline.py --backend unsloth in a process of its own, with cold compile caches.
1b. service_default: the first 8B job of a service just started (cold compile caches under its
   DATA_DIR) with the spec's precision left to its default, "auto" (fp8 on a card with FP8
   matmuls): what the service chooses for a user who names no precision, cancelled one step after
   the last measured one (no final save).
1c. repeat_default: that spec again, REPEAT_STEPS steps (--repeats times), each posted once the
   worker is idle: its standby's imports done and, where the worker preloads
   (TRAINER_STANDBY_PRELOAD, on by default on a GPU host), the model loaded
   (`standby_before_post` says how long that was waited for): a model seen before, with what
   auto chose.
1d. restart_default: the service stopped and started again on the same DATA_DIR, then part 1c's
   job posted as soon as it answers, while the new standby imports (as 3b, the default precision).
1e. repeat_other_model: part 1c's spec for another model folder (the same files, linked), on an
   idle worker whose standby preloaded the first: the standby frees it (`preload_freed`: the
   trainer's line, with the GiB still allocated after) and the job loads its own.
1f. repeat_no_preload: part 1c on a worker started again with TRAINER_STANDBY_PRELOAD=false: the
   preload's baseline in the same call.
2. service_bf16: an 8B job with `precision: bf16` (the first job of the service when part 1b is
   not asked for: cold compile caches); it runs to the end (its final model is saved), so the
   planner records a measurement.
3. repeat_bf16: the same spec again, REPEAT_STEPS steps, then cancelled (no final save), posted
   once the worker is idle (as 1c): the POST-to-first-step of a model seen before, with the
   startup phases.
3b. restart_bf16: the service stopped and started again on the same DATA_DIR (its compile caches
   kept, the page cache warm), then part 3's job, posted as soon as the service answers: the first
   job after a restart of a host that has trained this model before.
4. service_fp8: the same as 2 with `precision: fp8` (--fp8-recipe), cancelled one step after the
   last measured one (no final save). If it fails with its float8 layers compiled (FP8_COMPILE), it
   runs again on a worker with FP8_COMPILE=false while the budget allows (`compiled_attempt` keeps
   the first try).
5. auto: `per_device_train_batch_size: "auto"` with the same effective batch, REPEAT_STEPS steps:
   the `micro_batch_chosen` event (the candidates timed, the choice) and its tokens/s.
6. learned: POST /jobs/estimate of the bf16 spec: the plan and what the finished job taught it.

The steps of parts 1, 2 and 4 (--steps; 0: as many as the budget allows, at most 200) are the same
for the three; the JSON says how many ran. `--dry-run` runs parts 2-6 on a tiny model with the
transformers backend on the CPU (the fp8 job is then refused by the trainer, as it must be): it
checks this script, not the GPU."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

GIB = 1024**3
BUDGET_S = 540
MAX_STEPS = 200
REPEAT_STEPS = 3
# What each part needs besides its steps (seconds, H100, 8B shape): imports, load, first-step compile;
# bf16 also saves its 16 GB final model. From docs/benchmarks.md's figures, rounded up.
OVERHEAD_S = {
    "bare": 85,
    "service_default": 100,
    "repeat_default": 55,
    "restart_default": 70,
    "repeat_other_model": 60,
    "repeat_no_preload": 70,
    "service_bf16": 100,
    "repeat_bf16": 55,
    "restart_bf16": 70,
    "service_fp8": 90,
    "auto": 90,
}
BUILD_S = 30  # building the 8B model on the GPU and its dataset (once per machine)
# tokens/s assumed when sizing the steps (the bare recipe measured 8,087 on an H100 at micro-batch 2 x 4;
# 6,538 at 2 x 1), and a margin on the step time.
ASSUMED_TOKENS_PER_S = 8_000
STEP_MARGIN = 1.25
# The loss tolerance held against fp8's curve: mean |fp8 - bf16| / bf16 over the second half of the steps.
LOSS_TOLERANCE = 0.03
PARTS = (
    "bare",
    "service_default",
    "repeat_default",
    "restart_default",
    "repeat_other_model",
    "repeat_no_preload",
    "service_bf16",
    "repeat_bf16",
    "restart_bf16",
    "service_fp8",
    "auto",
    "learned",
)
# The parts that train the measured steps (the others run REPEAT_STEPS or none).
MEASURED_RUNS = ("bare", "service_default", "service_bf16", "service_fp8")


def name_and_value(pair: str) -> tuple[str, str]:
    """--service-env's NAME=VALUE, refused at once rather than after the 8B model is built."""
    name, equals, value = pair.partition("=")
    if not name or not equals:
        raise argparse.ArgumentTypeError(f"{pair!r} is not NAME=VALUE")
    return name, value


def iso(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def step_rate(step_ends: list[tuple[int, float]], tokens_step: int) -> dict[str, float | None]:
    from common import step_rate as bench_step_rate

    return bench_step_rate(step_ends, tokens_step)


def loss_comparison(reference: list[list[float]], other: list[list[float]]) -> dict[str, Any]:
    """fp8's loss curve against bf16's, over the steps both logged: the mean and largest relative
    difference over the second half (the first steps fall fast from the random start)."""
    ours = {int(step): loss for step, loss in other}
    pairs = [(loss, ours[int(step)]) for step, loss in reference if int(step) in ours and loss]
    if not pairs:
        return {"steps_compared": 0}
    half = pairs[len(pairs) // 2 :]
    relative = [abs(b - a) / abs(a) for a, b in half]
    mean = sum(relative) / len(relative)
    return {
        "steps_compared": len(pairs),
        "second_half_mean_relative_difference": round(mean, 5),
        "second_half_max_relative_difference": round(max(relative), 5),
        "tolerance": LOSS_TOLERANCE,
        "within_tolerance": mean <= LOSS_TOLERANCE,
    }


class Speed:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.results_dir: Path = args.results or args.out
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.deadline = self.started + args.budget_s
        self.parts = [p for p in PARTS if p in set(args.parts.split(","))]
        self.results: dict[str, Any] = {
            "card": None,
            "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "dry_run": args.dry_run,
            "parts": {},
        }
        self.backend = "transformers" if args.dry_run else "unsloth"
        self.service: Any = None
        self.worker_env: dict[str, str] = {}  # the settings a part started the worker with
        self.specs: dict[str, dict[str, Any]] = {}
        self.inputs: tuple[Path, Path] = (Path(), Path())  # the model and dataset folders, once built

    # ---- bookkeeping --------------------------------------------------------------------------------

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.started, 1)
        (self.results_dir / "speed.json").write_text(json.dumps(self.results, indent=2))

    def part(self, name: str, run: Any) -> None:
        """One part: skipped when the budget cannot hold it, its exception recorded, the JSON
        written after it whatever happened."""
        if name not in self.parts:
            return
        need = OVERHEAD_S.get(name, 10) if not self.args.dry_run else 5
        if self.time_left() < need:
            self.results["parts"][name] = {"skipped": f"{self.time_left():.0f} s of the budget left, {need} s needed"}
            print(f"[skip] {name}: {self.results['parts'][name]['skipped']}", flush=True)
            self.save()
            return
        print(f"[part] {name} ({self.time_left():.0f} s of the budget left)", flush=True)
        began = time.monotonic()
        try:
            self.results["parts"][name] = run()
        except Exception as exc:
            self.results["parts"][name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            print(f"[error] {name}: {type(exc).__name__}: {exc}", flush=True)
        self.results["parts"][name]["part_seconds"] = round(time.monotonic() - began, 1)
        self.save()

    def card(self) -> str:
        if self.args.dry_run:
            return "cpu"
        import torch

        return str(torch.cuda.get_device_name(0))

    # ---- the workload --------------------------------------------------------------------------------

    def tokens_per_step(self) -> int:
        a = self.args
        return int(a.micro_batch * a.grad_accum * a.seq_len)

    def steps(self) -> int:
        """The steps of each measured run: --steps, or what the budget holds for the parts asked."""
        a = self.args
        if a.dry_run:
            return min(a.steps or 4, 6)
        step_s = STEP_MARGIN * self.tokens_per_step() / ASSUMED_TOKENS_PER_S
        runs = [p for p in MEASURED_RUNS if p in self.parts]
        fixed = sum(OVERHEAD_S[p] for p in self.parts if p in OVERHEAD_S) + BUILD_S
        affordable = int((a.budget_s - fixed) / (step_s * max(len(runs), 1)))
        steps = min(a.steps or MAX_STEPS, affordable, MAX_STEPS)
        return max(steps, 3)

    def prepare(self) -> tuple[Path, Path]:
        from common import prepare

        a = self.args
        rows = (self.results["steps"] + 2) * a.micro_batch * a.grad_accum + 16
        if a.dry_run:
            from tests.builders import build_llama

            model = Path(a.workdir) / "models" / "tiny"
            if not (model / "config.json").exists():
                build_llama(model)
            return prepare(Path(a.workdir), "tiny", a.seq_len, rows)
        return prepare(Path(a.workdir), a.shape, a.seq_len, rows)

    def spec(self, model: Path, dataset: Path, steps: int, **extra: Any) -> dict[str, Any]:
        a = self.args
        hyperparameters = {
            "per_device_train_batch_size": a.micro_batch,
            "gradient_accumulation_steps": a.grad_accum,
            "max_seq_length": a.seq_len,
            "learning_rate": 5e-6,
            "warmup_ratio": 0.03,
            "optim": a.optim,
            "max_steps": steps,
            "logging_steps": 1,
            "save_steps": 100_000,
            "seed": 42,
            **extra.pop("hyperparameters", {}),
        }
        return {
            "model": str(model),
            "dataset": {"source": str(dataset)},
            "backend": self.backend,
            "hyperparameters": hyperparameters,
            **extra,
        }

    # ---- part 1: the bare recipe ------------------------------------------------------------------------

    def bare(self) -> dict[str, Any]:
        a = self.args
        if a.dry_run:
            return {"skipped": "dry run: bench/baseline.py needs a GPU"}
        cache = self.out / "bare-cache"  # cold compile caches, as a new job's
        shutil.rmtree(cache, ignore_errors=True)
        env = {
            **os.environ,
            "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
            "TRITON_CACHE_DIR": str(cache / "triton"),
            "UNSLOTH_COMPILE_LOCATION": str(cache / "unsloth"),
            "UNSLOTH_MEGA_CACHE_DIR": str(cache / "mega"),
        }
        command = [
            sys.executable,
            str(ROOT / "bench" / "baseline.py"),
            "--backend",
            "unsloth",
            "--out",
            str(self.out / "bare"),
            "--workdir",
            a.workdir,
            "--shape",
            a.shape,
            "--seq-len",
            str(a.seq_len),
            "--micro-batch",
            str(a.micro_batch),
            "--grad-accum",
            str(a.grad_accum),
            "--steps",
            str(self.results["steps"]),
        ]
        with open(self.out / "bare.log", "wb") as log:
            done = subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False, timeout=max(self.time_left(), 60)
            )
        result_file = self.out / "bare" / "bare_unsloth.json"
        if done.returncode != 0 or not result_file.exists():
            return {"error": f"bench/baseline.py exited {done.returncode}", "log_tail": tail(self.out / "bare.log")}
        return dict(json.loads(result_file.read_text()))

    # ---- the service's parts ----------------------------------------------------------------------------

    def start_service(self, model: Path, dataset: Path, *, fresh: bool = True) -> Any:
        from scripts.service_harness import Service

        root = self.out / "service"
        if fresh:
            shutil.rmtree(root, ignore_errors=True)  # cold compile caches under its DATA_DIR: a first job
        settings = {
            "FP8_COMPILE": "true" if self.args.fp8_compile else "false",
            "FP8_COMPILE_REGION": self.args.fp8_compile_region,
            **dict(self.args.service_env),
        }
        self.service = Service(root, allowed_roots=[model.parent, dataset.parent], settings=settings).start()
        return self.service

    def run_job(
        self, spec: dict[str, Any], *, stop_after_step: int | None = None, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """Submit, wait for its end (or for `stop_after_step`, then cancel it: no final save), and
        gather its figures: tokens/s, loss curve, POST-to-first-step, startup and other events."""
        service = self.service
        http = service.http()
        posted = time.time()
        response = http.post("/jobs", json=spec)
        if response.status_code != 201:
            return {"error": f"submit answered {response.status_code}: {response.text[:500]}"}
        job_id = int(response.json()["id"])
        timeout = timeout_s if timeout_s is not None else max(self.time_left() - 15, 30)
        try:
            if stop_after_step is not None and self.wait_for_step_or_end(job_id, stop_after_step, timeout) == "step":
                http.post(f"/jobs/{job_id}/cancel")  # it stops at its next step, with no final save
            record = service.wait_for(job_id, timeout_s=max(self.time_left() - 5, 30), echo=True)
        except AssertionError as exc:  # the harness's timeout: stop the job, keep what it logged
            http.post(f"/jobs/{job_id}/cancel")
            record = service.job(job_id)
            record["timeout"] = str(exc)
        logs = http.get(f"/jobs/{job_id}/logs", params={"limit": 5000}).json()["items"]
        events = http.get(f"/jobs/{job_id}/events").json()["items"]
        shutil.rmtree(service.job_dir(job_id) / "checkpoints", ignore_errors=True)  # 16 GB: the disk is needed
        step_ends = [(row["step"], iso(row["created_at"])) for row in logs if row["loss"] is not None]
        if stop_after_step is not None:
            step_ends = [(step, t) for step, t in step_ends if step <= stop_after_step]
        first = next((iso(row["created_at"]) for row in logs), None)
        vram = record.get("vram") or {}
        hp = (record.get("spec") or {}).get("hyperparameters") or {}
        tokens_step = int(hp.get("per_device_train_batch_size", 0) or 0) * int(
            hp.get("gradient_accumulation_steps", 0) or 0
        )
        return {
            "job_id": job_id,
            "status": record["status"],
            "error": record.get("error"),
            "timeout": record.get("timeout"),
            "trainer": record.get("trainer"),
            "versions": record.get("versions"),
            "micro_batch_x_accumulation": [
                hp.get("per_device_train_batch_size"),
                hp.get("gradient_accumulation_steps"),
            ],
            **step_rate(step_ends, tokens_step * self.args.seq_len),
            "reported_tokens_per_second_mean": (record.get("metrics") or {}).get("tokens_per_second_mean"),
            "steps_logged": len(step_ends),
            "losses": [[row["step"], row["loss"]] for row in logs if row["loss"] is not None],
            "post_to_first_step_seconds": round(first - posted, 2) if first is not None else None,
            "nvml_device_used_peak_bytes": vram.get("device_used_peak"),
            "torch_peak_allocated_bytes": vram.get("peak_allocated"),
            "events": {e["kind"]: e["message"] for e in events if e["kind"] in INTERESTING_EVENTS},
            **startup_profile(service.job_dir(job_id)),
        }

    def wait_for_step_or_end(self, job_id: int, step: int, timeout_s: float) -> str:
        from scripts.service_harness import FINISHED, wait_until

        def reached() -> str | None:
            record = self.service.job(job_id)
            if record["status"] in FINISHED:
                return "end"
            return "step" if record["progress"]["step"] >= step else None

        return str(wait_until(reached, timeout_s, f"job {job_id} at step {step}", interval_s=0.3))

    def measured_run(self, spec: dict[str, Any]) -> dict[str, Any]:
        """`spec` for the measured steps, cancelled one step later (no final save)."""
        steps = self.results["steps"]
        longer = {**spec, "hyperparameters": {**spec["hyperparameters"], "max_steps": steps + 1}}
        return self.run_job(longer, stop_after_step=steps)

    def repeat(self, spec: dict[str, Any], *, when_idle: bool = True) -> dict[str, Any]:
        """`spec` again for REPEAT_STEPS steps: its start, with what the first job left in the caches.
        `when_idle`: posted once the worker's standby has done its imports (and preloaded the model,
        where the worker preloads), as on a host that waits for work; else at once."""
        waited = self.wait_for_idle_standby() if when_idle else None
        short = {**spec, "hyperparameters": {**spec["hyperparameters"], "max_steps": REPEAT_STEPS + 1}}
        found = self.run_job(short, stop_after_step=REPEAT_STEPS)
        return {**found, "standby_before_post": waited} if waited is not None else found

    def wait_for_idle_standby(self, timeout_s: float = 120) -> dict[str, Any] | None:
        """Wait until the standby's log says it is ready (or has preloaded the model, where the
        worker preloads); None where the service runs no standby (the dry run's CPU host)."""
        if not (self.service.data_dir / "standby").exists():
            return None
        wanted = "preloaded" if self.preloads() else "ready"
        began = time.monotonic()
        while (state := standby_state(self.service.data_dir)) != wanted and time.monotonic() - began < timeout_s:
            time.sleep(0.2)
        waited = {"state": state, "wanted": wanted, "waited_s": round(time.monotonic() - began, 1)}
        return {**waited, "device_used_bytes": device_used_bytes()}  # what the idle standby holds

    def preloads(self) -> bool:
        """Whether the service's worker preloads (TRAINER_STANDBY_PRELOAD; unset: on a GPU host)."""
        value = {**dict(self.args.service_env), **self.worker_env}.get("TRAINER_STANDBY_PRELOAD")
        if value is None:
            return not self.args.dry_run
        return value.lower() in ("1", "true", "yes", "on")

    def restart(self, spec: dict[str, Any]) -> dict[str, Any]:
        """The service stopped and started on the same DATA_DIR, then `spec` posted as soon as it answers."""
        self.service.stop()
        self.start_service(*self.inputs, fresh=False)
        return self.repeat(spec, when_idle=False)

    def repeat_other_model(self) -> dict[str, Any]:
        """On an idle worker whose standby preloaded the model, a job for another model folder (the
        same files, linked): the standby must free what it preloaded, and says how much of the card
        it got back, before the job loads its own."""
        model = Path(self.specs["default"]["model"])
        other = model.with_name(model.name + "-linked")
        other.mkdir(exist_ok=True)
        for path in model.iterdir():
            if not (other / path.name).exists():
                (other / path.name).symlink_to(path)
        found = self.repeat({**self.specs["default"], "model": str(other)})
        log = self.service.job_dir(found["job_id"]) / "trainer.log" if "job_id" in found else None
        said = log.read_text(errors="replace").splitlines() if log is not None and log.exists() else []
        return {**found, "preload_freed": next((line for line in said if "does not train the preloaded" in line), None)}

    def repeat_no_preload(self) -> dict[str, Any]:
        """The default spec again on a worker that does not preload, once its standby is ready: the
        repeat_default's baseline in the same call."""
        self.service.stop_workers()
        self.worker_env = {"TRAINER_STANDBY_PRELOAD": "false"}
        self.service.start_worker(**self.worker_env)
        return self.repeat(self.specs["default"])

    def service_default(self) -> dict[str, Any]:
        return self.measured_run(self.specs["default"])

    def repeat_default(self) -> dict[str, Any]:
        """Part 1c, then --repeats - 1 times more (each once the worker is idle again): the spread."""
        first = self.repeat(self.specs["default"])
        more = []
        for _ in range(self.args.repeats - 1):
            if self.time_left() < OVERHEAD_S["repeat_default"]:
                break
            again = self.repeat(self.specs["default"])
            keep = ("job_id", "status", "post_to_first_step_seconds", "standby_before_post", "events")
            more.append({key: again.get(key) for key in keep})
        return {**first, "repeated": more} if more else first

    def restart_default(self) -> dict[str, Any]:
        return self.restart(self.specs["default"])

    def service_bf16(self) -> dict[str, Any]:
        return self.run_job(self.specs["bf16"])

    def repeat_bf16(self) -> dict[str, Any]:
        return self.repeat(self.specs["bf16"])

    def restart_bf16(self) -> dict[str, Any]:
        return self.restart(self.specs["bf16"])

    def service_fp8(self) -> dict[str, Any]:
        spec = self.specs["bf16"]
        steps = self.results["steps"]
        hyperparameters = {**spec["hyperparameters"], "max_steps": steps + 1}
        if self.args.fp8_auto:  # what the service chooses: the fastest micro-batch, the same effective batch
            hyperparameters.update(self.auto_micro_batch())
        fp8 = {**spec, "precision": "fp8", "fp8_recipe": self.args.fp8_recipe, "hyperparameters": hyperparameters}
        found = self.run_job(fp8, stop_after_step=steps)
        # The compiled float8 layers failed: the same job with them eager, on a worker told so
        # (FP8_COMPILE is the worker's setting), if the budget holds it.
        retry = found.get("status") == "failed" and self.args.fp8_compile and not self.args.dry_run
        if retry and self.time_left() >= OVERHEAD_S["service_fp8"] + 20:
            print("[retry] service_fp8 with FP8_COMPILE=false", flush=True)
            self.service.stop_workers()
            self.service.start_worker(FP8_COMPILE="false")
            found = {"compiled_attempt": found, **self.run_job(fp8, stop_after_step=steps)}
        return found

    def auto_micro_batch(self) -> dict[str, Any]:
        """The hyperparameters of micro-batch "auto" with the same sequences a step: "auto" keeps
        the recipe's micro-batch 2 x gradient_accumulation_steps."""
        a = self.args
        return {
            "per_device_train_batch_size": "auto",
            "gradient_accumulation_steps": max(a.micro_batch * a.grad_accum // 2, 1),
        }

    def auto(self) -> dict[str, Any]:
        spec = self.specs["bf16"]
        hyperparameters = {**spec["hyperparameters"], **self.auto_micro_batch(), "max_steps": REPEAT_STEPS + 1}
        auto = {**spec, "hyperparameters": hyperparameters}
        estimate = self.service.http().post("/jobs/estimate", json=auto).json()
        found = self.run_job(auto, stop_after_step=REPEAT_STEPS)
        found["estimate_auto_micro_batch"] = estimate.get("auto_micro_batch")
        return found

    def learned(self) -> dict[str, Any]:
        http = self.service.http()
        body = http.post("/jobs/estimate", json=self.specs["bf16"]).json()
        return {"estimate": body}

    # ---- all of it ----------------------------------------------------------------------------------------

    def run(self) -> int:
        a = self.args
        self.results["card"] = self.card()
        self.results["steps"] = self.steps()
        self.results["settings"] = {
            "shape": "tiny" if a.dry_run else a.shape,
            "seq_len": a.seq_len,
            "micro_batch": a.micro_batch,
            "grad_accum": a.grad_accum,
            "optim": a.optim,
            "steps": self.results["steps"],
            "steps_asked": a.steps or None,
            "fp8_recipe": a.fp8_recipe,
            "fp8_compile": a.fp8_compile,
            "fp8_auto": a.fp8_auto,
            "fp8_compile_region": a.fp8_compile_region,
            "service_env": [f"{name}={value}" for name, value in a.service_env],
            "budget_s": a.budget_s,
            "tokens_per_step": self.tokens_per_step(),
        }
        self.save()
        try:
            model, dataset = self.inputs = self.prepare()
            self.specs["default"] = self.spec(model, dataset, self.results["steps"])  # precision: its default
            self.specs["bf16"] = {**self.specs["default"], "precision": "bf16"}
            self.part("bare", self.bare)
            if any(p in self.parts for p in PARTS[1:]):
                self.start_service(model, dataset)
                for name in PARTS[1:]:
                    self.part(name, getattr(self, name))
        finally:
            if self.service is not None:
                self.service.stop()
            self.summarise()
            self.save()
            self.keep_logs()
        print_table(self.results)
        return 0

    def summarise(self) -> None:
        parts = self.results["parts"]
        bare = (parts.get("bare") or {}).get("tokens_per_second")
        for name in ("service_default", "service_bf16", "service_fp8", "auto"):
            rate = (parts.get(name) or {}).get("tokens_per_second")
            if bare and rate:
                self.results[f"{name}_over_bare"] = round(rate / bare, 4)
        # bf16's curve: the service's, else the bare recipe's (the same data, seed and schedule)
        bf16_name = next((n for n in ("service_bf16", "bare") if (parts.get(n) or {}).get("losses")), None)
        for name, key in (("service_fp8", "fp8_loss_against_bf16"), ("service_default", "default_loss_against_bf16")):
            losses = (parts.get(name) or {}).get("losses")
            if bf16_name and losses:
                compared = loss_comparison(parts[bf16_name]["losses"], losses)
                self.results[key] = {**compared, "bf16_curve_of": bf16_name}

    def keep_logs(self) -> None:
        if self.results_dir == self.out:
            return
        logs = self.results_dir / "logs"
        logs.mkdir(exist_ok=True)
        for path in [
            *self.out.glob("*.log"),
            *self.out.glob("service/*.log"),
            *self.out.glob("service/data/standby/*.log"),
            *self.out.glob("service/data/jobs/*/trainer*.log"),
            # --service-env STARTUP_PROFILE=true: each job's sampled stacks up to its first step
            *self.out.glob("service/data/jobs/*/startup-*"),
        ]:
            shutil.copyfile(path, logs / "-".join(path.relative_to(self.out).parts))


INTERESTING_EVENTS = (
    "startup",
    "first_step",
    "micro_batch_chosen",
    "measured",
    "optimizer_replaced",
    "failed",
    "started",
)


def device_used_bytes() -> int | None:
    """GPU 0's used memory (NVML), None without one."""
    from worker.gpus import memory_info

    info = memory_info(0)
    return int(info.used) if info is not None else None


def standby_state(data_dir: Path) -> str | None:
    """The worker's unused standby trainer: importing, ready (its imports done) or preloaded (the
    model loaded), from its lines in the standby log; None when there is not exactly one."""
    from scripts.service_harness import standby_pids

    folder = data_dir / "standby"
    unused = [pid for pid in standby_pids(data_dir) if not (folder / f"{pid}.taken").exists()]
    if len(unused) != 1:
        return None
    log = folder / "standby.log"
    said = log.read_text(errors="replace") if log.exists() else ""
    for words, state in ((") preloaded ", "preloaded"), (") ready in ", "ready")):
        if f"standby trainer (pid {unused[0]}{words}" in said:
            return state
    return "importing"


def startup_profile(job_dir: Path) -> dict[str, Any]:
    """With --service-env STARTUP_PROFILE=true: the functions that held the job's start to its first
    step (trainer/stack_sampler.py), the largest first; the whole profile is kept with the logs."""
    path = job_dir / "startup-profile.json"
    if not path.exists():
        return {}
    profile = json.loads(path.read_text())
    return {
        "startup_profile": {
            "wall_s": profile["wall_s"],
            "sampled_s": profile["sampled_s"],
            "inclusive_s": profile["inclusive_s"][:40],
            "own_s": profile["own_s"][:20],
        }
    }


def tail(path: Path, chars: int = 1500) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def shown(value: Any, fmt: str = "{:,.0f}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else "-"


def print_table(results: dict[str, Any]) -> None:
    parts = results.get("parts") or {}
    s = results.get("settings") or {}
    print(
        f"\n{results.get('card')} {results.get('date')}: {s.get('shape')}, seq {s.get('seq_len')}, micro-batch "
        f"{s.get('micro_batch')} x {s.get('grad_accum')}, {results.get('steps')} steps, {s.get('optim')}"
    )
    print(f"{'':17}{'status':>11}{'tokens/s':>10}{'x bare':>8}{'POST->step1 s':>15}{'NVML peak':>11}  last loss")
    bare = (parts.get("bare") or {}).get("tokens_per_second")
    for name in PARTS[:-1]:
        p = parts.get(name) or {}
        status = p.get("status") or ("skipped" if "skipped" in p else "error" if "error" in p else "ok" if p else "-")
        rate = p.get("tokens_per_second")
        ratio = rate / bare if rate and bare else None
        losses = p.get("losses") or []
        peak = p.get("nvml_device_used_peak_bytes")
        print(
            f"{name:17}{status:>11}{shown(rate):>10}{shown(ratio, '{:.3f}'):>8}"
            f"{shown(p.get('post_to_first_step_seconds'), '{:.1f}'):>15}"
            f"{shown(peak / GIB if peak else None, '{:.1f} GiB'):>11}"
            f"  {shown(losses[-1][1] if losses else None, '{:.4f}')}"
        )
    for name in PARTS:
        waited = (parts.get(name) or {}).get("standby_before_post")
        if waited:
            used = waited.get("device_used_bytes")
            print(
                f"{name}: posted after {waited['waited_s']} s waiting for the standby ({waited['state']}; "
                f"GPU memory in use {shown(used / GIB if used else None, '{:.1f} GiB')})"
            )
    for again in (parts.get("repeat_default") or {}).get("repeated") or []:
        events = again.get("events") or {}
        seconds = again.get("post_to_first_step_seconds")
        print(f"repeat_default again: POST to first step {seconds} s; {events.get('first_step')}")
    freed = (parts.get("repeat_other_model") or {}).get("preload_freed")
    if freed:
        print(f"repeat_other_model: {freed}")
    for key in ("fp8_loss_against_bf16", "default_loss_against_bf16"):
        if results.get(key):
            print(f"{key.replace('_', ' ')}: {results[key]}")
    auto = (parts.get("auto") or {}).get("events", {}).get("micro_batch_chosen")
    if auto:
        print(f"auto: {auto}")
    for name in (*PARTS[1:6], "service_bf16", "repeat_bf16", "restart_bf16"):
        events = (parts.get(name) or {}).get("events", {})
        for kind in ("startup", "first_step"):
            if events.get(kind):
                print(f"{name} {kind}: {events[kind]}")
    learned = ((parts.get("learned") or {}).get("estimate") or {}).get("learned")
    if learned:
        print(
            f"learned: {learned.get('total_gib')} GiB, {learned.get('tokens_per_second')} tokens/s from "
            f"{[m.get('job_id') for m in learned.get('measurements') or []]}"
        )
    print(f"elapsed {results.get('elapsed_s')} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu-speed"), help="work folder (under /tmp)")
    parser.add_argument("--results", type=Path, default=None, help="speed.json and the logs (default: --out)")
    parser.add_argument("--workdir", default="/tmp/bench", help="where bench/ builds the 8B shape (shared with it)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="the whole call's seconds")
    parser.add_argument("--steps", type=int, default=0, help="steps of each measured run (0: what the budget holds)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--repeats", type=int, default=1, help="how many times repeat_default runs")
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--optim", default="paged_adamw_8bit")
    parser.add_argument("--fp8-recipe", default="tensorwise", choices=["tensorwise", "rowwise"])
    parser.add_argument("--fp8-compile", default=True, action=argparse.BooleanOptionalAction)
    parser.add_argument("--fp8-compile-region", default="decoder_layer", choices=["linear", "decoder_layer"])
    parser.add_argument(
        "--fp8-auto", action="store_true", help='the fp8 job with micro-batch "auto" (the same tokens a step)'
    )
    parser.add_argument(
        "--service-env",
        action="append",
        type=name_and_value,
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable of the service's API and workers (and so of its trainers); repeatable",
    )
    parser.add_argument("--dry-run", action="store_true", help="a tiny model on the CPU: checks this script")
    args = parser.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; the parts are {', '.join(PARTS)}")
    if args.dry_run:
        args.seq_len, args.micro_batch, args.grad_accum, args.optim = min(args.seq_len, 64), 2, 2, "adamw_torch"
    return Speed(args).run()


if __name__ == "__main__":
    sys.exit(main())
