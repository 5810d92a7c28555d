"""Preference and reward methods on the GPU: a DPO job of the Llama-3.1-8B shape through the service
against a bare Unsloth + TRL DPO script on the same card in the same call (tokens/s ratio, NVML
peaks against the planner), and a GRPO job of a small model that succeeds on Unsloth.

Run on a GPU machine from the repository root, the package bundle carried as .gpu/ (docs/gpu.md):
    scripts/gpu-methods [--out DIR] [--budget-s 540]
Phases run in order while the budget lasts (a skipped phase says so):

1. dpo_bare: `python3 scripts/gpu_methods.py bare-dpo ...` in a process of its own: Unsloth's
   FastLanguageModel and TRL's DPOTrainer (Unsloth's patched one), as a user's script would.
2. dpo_service: the same training as a job (`method: dpo`, backend unsloth) through the service.
   Both train on pairs whose every sequence is cut at max_seq_length, so a step is
   micro-batch x accumulation x 2 x max_seq_length tokens, and tokens/s is arithmetic over the
   step times after the first (compiling) one. The reference log-probabilities are precomputed
   (planned 53.7 GiB; `--reference model` holds the reference model beside the policy instead:
   68.7 GiB, tight on an 80 GB card); the GRPO job below holds one.
3. grpo_service: a GRPO job of a ~300M Llama (backend unsloth, beta 0.04 so the reference model and
   the KL term are there) with a multi grader; checks the reward, KL and completion lengths in the
   step logs and the trainer that ran. If it fails on Unsloth, the same job runs on the
   transformers backend too, to tell Unsloth's part from ours.

Works under --out (models, services, checkpoints: keep it under /tmp, as docs/gpu.md says) and
writes RESULTS/methods.json (card, date, versions, every figure) with the logs beside it (RESULTS
defaults to OUT; point it at $OUT on the lent machine), and prints a table; exits 1 on a failed
check. `--cpu-smoke` runs the whole script on a tiny model with the transformers backend on the CPU:
it checks this script, not Unsloth."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

GIB = 1024**3
BUDGET_S = 540
# What each phase needs at least, to be started (seconds): imports, load, compile, a few steps.
PHASE_S = {"dpo_bare": 150, "dpo_service": 150, "grpo_service": 110}
EXACT_AND_CLOSE = {
    "type": "multi",
    "name": "answer",
    "graders": {
        "exact": {
            "type": "string_check",
            "name": "exact",
            "input": "{{sample.output_text}}",
            "reference": "{{item.answer}}",
            "operation": "eq",
        },
        "close": {
            "type": "text_similarity",
            "name": "close",
            "input": "{{sample.output_text}}",
            "reference": "{{item.answer}}",
            "evaluation_metric": "fuzzy_match",
        },
    },
    "calculate_output": "0.5 * exact + 0.5 * close",
}


def iso(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def long_pairs(count: int, seq_len: int, *, seed: int = 0) -> list[dict[str, str]]:
    """Pairs whose answers outlast max_seq_length with their prompt (each word one token or more):
    every chosen and rejected sequence is cut at exactly seq_len tokens."""
    from tests.builders import WORDS

    rng = random.Random(seed)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    return [
        {"prompt": words(seq_len // 4), "chosen": " " + words(seq_len + 16), "rejected": " " + words(seq_len + 16)}
        for _ in range(count)
    ]


def dpo_settings(args: argparse.Namespace, reference: str) -> dict[str, Any]:
    return {
        "shape": args.shape,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum,
        "steps": args.steps,
        "optim": args.optim,
        "learning_rate": 5e-7,
        "beta": 0.1,
        "reference": reference,
        "tokens_per_step": args.micro_batch * args.grad_accum * 2 * args.seq_len,
    }


def step_rate(step_ends: list[tuple[int, float]], tokens_step: int) -> dict[str, float | None]:
    from common import step_rate as bench_step_rate

    return bench_step_rate(step_ends, tokens_step)


# ---- the bare script (a process of its own) -------------------------------------------------------


def bare_dpo(args: argparse.Namespace) -> None:
    """Unsloth + TRL's DPOTrainer as a user's script: no service, no callback but a step clock."""
    backend = args.backend
    if backend == "unsloth":
        import unsloth  # noqa: F401  (first, as the recipe says)
    import torch
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from trainer.gpu import MemoryProbe  # the same NVML sampler the service uses

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.train_begin = 0.0
            self.step_ends: list[tuple[int, float]] = []

        def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.train_begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.step_ends.append((state.global_step, time.perf_counter()))

    on_gpu = torch.cuda.is_available()
    probe = MemoryProbe()
    started = time.perf_counter()
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=args.model,
            max_seq_length=args.seq_len,
            dtype=torch.bfloat16,
            load_in_4bit=False,
            full_finetuning=True,
        )
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16 if on_gpu else torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    load_s = time.perf_counter() - started
    precompute = args.reference == "precomputed"
    clock = StepClock()
    trainer = DPOTrainer(
        model=model,
        train_dataset=load_dataset("json", data_files=args.pairs, split="train"),
        processing_class=tokenizer,
        callbacks=[clock],
        args=DPOConfig(
            output_dir=str(Path(args.result).parent / "bare-dpo-output"),
            optim=args.optim,
            per_device_train_batch_size=args.micro_batch,
            gradient_accumulation_steps=args.grad_accum,
            learning_rate=5e-7,
            max_steps=args.steps,
            warmup_steps=0.03,
            lr_scheduler_type="linear",
            bf16=on_gpu,
            use_cpu=not on_gpu,
            logging_steps=1,
            save_strategy="no",
            max_length=args.seq_len,
            beta=0.1,
            precompute_ref_log_probs=precompute,
            model_init_kwargs=None if precompute else {"dtype": "bfloat16" if on_gpu else "float32"},
            gradient_checkpointing=backend == "transformers",
            report_to="none",
            seed=42,
        ),
    )
    trainer.train()
    vram = probe.read()
    probe.close()
    margins = [e["rewards/margins"] for e in trainer.state.log_history if "rewards/margins" in e]
    Path(args.result).write_text(
        json.dumps(
            {
                "trainer_class": type(trainer).__name__,
                **step_rate(clock.step_ends, args.micro_batch * args.grad_accum * 2 * args.seq_len),
                "first_step_seconds": round(clock.step_ends[0][1] - clock.train_begin, 2) if clock.step_ends else None,
                "model_load_seconds": round(load_s, 2),
                "torch_peak_allocated_bytes": vram.get("peak_allocated"),
                "nvml_device_used_peak_bytes": vram.get("device_used_peak"),
                "rewards_margins": margins,
            }
        )
    )


# ---- the orchestration ----------------------------------------------------------------------------


class Methods:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.results_dir: Path = args.results or args.out
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + args.budget_s
        self.checks: list[tuple[str, bool, str]] = []
        self.results: dict[str, Any] = {"card": None, "date": time.strftime("%Y-%m-%d"), "cpu_smoke": args.cpu_smoke}
        self.backend = "transformers" if args.cpu_smoke else "unsloth"

    def check(self, name: str, ok: bool, detail: object = "") -> None:
        self.checks.append((name, bool(ok), str(detail)[:400]))
        print(f"[{'ok' if ok else 'FAIL'}] {name} {str(detail)[:400]}", flush=True)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def starts(self, phase: str) -> bool:
        if self.args.cpu_smoke or self.time_left() >= PHASE_S[phase]:
            return True
        self.results[phase] = {"skipped": f"{self.time_left():.0f} s left of the budget, {PHASE_S[phase]} s needed"}
        print(f"[skip] {phase}: {self.results[phase]['skipped']}", flush=True)
        return False

    def save(self) -> None:
        self.results["checks"] = self.checks
        (self.results_dir / "methods.json").write_text(json.dumps(self.results, indent=2))

    def keep_logs(self) -> None:
        """The logs (small) beside methods.json: the bare script's, and each service's processes' and
        trainers'."""
        if self.results_dir == self.out:
            return
        logs = self.results_dir / "logs"
        logs.mkdir(exist_ok=True)
        for path in [*self.out.glob("*.log"), *self.out.glob("*/*.log"), *self.out.glob("*/data/jobs/*/trainer*.log")]:
            name = "-".join(path.relative_to(self.out).parts)
            shutil.copyfile(path, logs / name)

    def card(self) -> tuple[str, int | None]:
        if self.args.cpu_smoke:
            return "cpu", None
        import torch

        return torch.cuda.get_device_name(0), int(torch.cuda.get_device_properties(0).total_memory)

    # ---- phase 1 and 2: DPO -----------------------------------------------------------------------

    def dpo_model(self) -> Path:
        args = self.args
        if args.cpu_smoke:
            from tests.builders import build_llama

            model = self.out / "models" / "tiny"
            if not (model / "config.json").exists():
                build_llama(model)
            return model
        from common import prepare  # bench's build of the 8B shape (random weights, on the GPU)

        model_dir, _chat = prepare(Path(args.workdir), args.shape, args.seq_len, 16)
        return model_dir

    def dpo_bare(self, model: Path, pairs: Path, reference: str) -> dict[str, Any]:
        args = self.args
        result = self.out / "dpo-bare.json"
        cache = self.out / "bare-cache"  # a compile cache of its own, cold as a new job's
        env = {
            **os.environ,
            "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
            "TRITON_CACHE_DIR": str(cache / "triton"),
            "UNSLOTH_COMPILE_LOCATION": str(cache / "unsloth"),
        }
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "bare-dpo",
            "--backend",
            self.backend,
            "--model",
            str(model),
            "--pairs",
            str(pairs),
            "--result",
            str(result),
            "--seq-len",
            str(args.seq_len),
            "--micro-batch",
            str(args.micro_batch),
            "--grad-accum",
            str(args.grad_accum),
            "--steps",
            str(args.steps),
            "--optim",
            args.optim,
            "--reference",
            reference,
        ]
        started = time.monotonic()
        with open(self.out / "dpo-bare.log", "wb") as log:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
        found: dict[str, Any] = json.loads(result.read_text()) if result.exists() else {}
        found["seconds"] = round(time.monotonic() - started, 1)
        self.check("bare DPO script ran", done.returncode == 0 and bool(found), tail(self.out / "dpo-bare.log"))
        return found

    def dpo_service(self, model: Path, pairs: Path, reference: str, card_bytes: int | None) -> dict[str, Any]:
        from scripts.service_harness import Service

        args = self.args
        spec = {
            "model": str(model),
            "method": "dpo",
            "dataset": {"source": str(pairs)},
            "backend": self.backend,
            "hyperparameters": {
                "per_device_train_batch_size": args.micro_batch,
                "gradient_accumulation_steps": args.grad_accum,
                "max_seq_length": args.seq_len,
                "learning_rate": 5e-7,
                "warmup_ratio": 0.03,
                "optim": args.optim,
                "max_steps": args.steps,
                "logging_steps": 1,
                "save_steps": 100_000,
                "seed": 42,
                "beta": 0.1,
                "precompute_ref_log_probs": reference == "precomputed",
            },
        }
        roots = [model.parent, pairs.parent]
        with Service(self.out / "dpo-service", allowed_roots=roots, settings={"TRAINER_STANDBY": "0"}) as service:
            http = service.http()
            estimate = http.post("/jobs/estimate", json={**spec, "gpu_memory_bytes": card_bytes or 80 * GIB}).json()
            plan = estimate.get("memory") or {}
            self.check("planner plans the DPO job", bool(plan), estimate)
            response = http.post("/jobs", json=spec)
            self.check("DPO job accepted", response.status_code == 201, response.text[:300])
            if response.status_code != 201:
                return {"estimate": estimate}
            record = service.wait_for(response.json()["id"], timeout_s=max(self.time_left() - 60, 120), echo=True)
            job_id = record["id"]
            logs = http.get(f"/jobs/{job_id}/logs", params={"limit": 5000}).json()["items"]
            events = http.get(f"/jobs/{job_id}/events").json()["items"]
        self.check(
            f"DPO job succeeded on {self.backend}",
            record["status"] == "succeeded" and record["backend"] == self.backend,
            f"{record['status']} {record['backend']} {record['error']}",
        )
        margins = [row["method_metrics"].get("rewards/margins") for row in logs if row.get("method_metrics")]
        self.check(
            "DPO step logs hold rewards/chosen, rejected, margins, accuracies",
            bool(logs)
            and all(
                {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
                <= set(row.get("method_metrics") or {})
                for row in logs
            ),
            logs[-1].get("method_metrics") if logs else None,
        )
        trainer = record.get("trainer") or {}
        self.check(
            "the record names the trainer that ran",
            trainer.get("method") == "dpo" and (self.args.cpu_smoke or trainer.get("path") == "unsloth"),
            trainer,
        )
        report = record.get("data_report") or {}
        self.check(
            "every sequence is cut at max_seq_length (tokens/s is arithmetic)",
            report.get("rows_truncated") == report.get("rows_used"),
            {k: report.get(k) for k in ("rows_used", "rows_truncated", "tokens_per_row")},
        )
        step_ends = [(row["step"], iso(row["created_at"])) for row in logs]
        tokens_step = args.micro_batch * args.grad_accum * 2 * args.seq_len
        reported = [row["tokens_per_second"] for row in logs[1:] if row["tokens_per_second"]]
        job_dir = self.out / "dpo-service" / "data" / "jobs" / str(job_id)
        result = json.loads((job_dir / "result.json").read_text()) if (job_dir / "result.json").exists() else {}
        shutil.rmtree(job_dir / "checkpoints", ignore_errors=True)  # 16 GB for the 8B shape: the disk is needed
        vram = record.get("vram") or {}
        return {
            "job_id": job_id,
            "status": record["status"],
            "trainer": trainer,
            "versions": record.get("versions"),
            **step_rate(step_ends, tokens_step),
            "reported_tokens_per_second_mean": round(sum(reported) / len(reported), 1) if reported else None,
            "first_step_seconds": result.get("first_step_seconds"),
            "torch_peak_allocated_bytes": vram.get("peak_allocated"),
            "nvml_device_used_peak_bytes": vram.get("device_used_peak"),
            "planned_bytes": plan.get("total_bytes"),
            "planned_parts": plan.get("parts"),
            "planned_verdict": plan.get("verdict"),
            "rewards_margins": margins,
            "startup_event": next((e["message"] for e in events if e["kind"] == "startup"), None),
        }

    # ---- phase 3: GRPO ----------------------------------------------------------------------------

    def grpo_service(self, backend: str) -> dict[str, Any]:
        from scripts.service_harness import Service
        from tests.builders import SMALL_LLAMA, WORDS, build_llama, write_jsonl

        small = self.out / "models" / ("tiny" if self.args.cpu_smoke else "small-llama")
        if not (small / "config.json").exists():
            if self.args.cpu_smoke:
                build_llama(small)
            else:
                build_llama(small, shape=dict(SMALL_LLAMA), dtype="bfloat16", device="cuda")
        rows = [{"messages": [{"role": "user", "content": f"say {word} once"}], "answer": word} for word in WORDS[:32]]
        prompts = write_jsonl(self.out / "datasets" / "prompts.jsonl", rows)
        spec = {
            "model": str(small),
            "method": "grpo",
            "dataset": {"source": str(prompts)},
            "backend": backend,
            "grader": EXACT_AND_CLOSE,
            "hyperparameters": {
                "per_device_train_batch_size": 8,
                "gradient_accumulation_steps": 2,
                "max_seq_length": 256,
                "learning_rate": 1e-5,
                "optim": self.args.optim,
                "max_steps": self.args.grpo_steps,
                "logging_steps": 1,
                "save_steps": 100_000,
                "num_generations": 4,
                "max_completion_length": 32,
                "beta": 0.04,
            },
        }
        name = f"grpo-{backend}"
        roots = [small.parent, prompts.parent]
        with Service(self.out / name, allowed_roots=roots, settings={"TRAINER_STANDBY": "0"}) as service:
            http = service.http()
            response = http.post("/jobs", json=spec)
            self.check(f"GRPO job accepted ({backend})", response.status_code == 201, response.text[:300])
            if response.status_code != 201:
                return {}
            record = service.wait_for(response.json()["id"], timeout_s=max(self.time_left() - 20, 90), echo=True)
            logs = http.get(f"/jobs/{record['id']}/logs", params={"limit": 5000}).json()["items"]
        ok = record["status"] == "succeeded" and record["backend"] == backend
        self.check(f"GRPO job succeeded on {backend}", ok, f"{record['status']} {record['backend']} {record['error']}")
        own = [row.get("method_metrics") or {} for row in logs]
        self.check(
            f"GRPO step logs hold reward, reward_std, kl, completion lengths ({backend})",
            bool(own) and all({"reward", "reward_std", "kl", "completions/mean_length"} <= set(o) for o in own),
            own[-1] if own else None,
        )
        self.check(
            f"GRPO tokens/s in the step logs ({backend})",
            all(row["tokens_per_second"] for row in logs[1:]) and len(logs) > 1,
            [row["tokens_per_second"] for row in logs],
        )
        return {
            "status": record["status"],
            "error": record["error"],
            "trainer": record.get("trainer"),
            "reward": [o.get("reward") for o in own],
            "kl": [o.get("kl") for o in own],
            "completion_mean_length": [o.get("completions/mean_length") for o in own],
            "tokens_per_second": [row["tokens_per_second"] for row in logs],
            "nvml_device_used_peak_bytes": (record.get("vram") or {}).get("device_used_peak"),
        }

    # ---- all of it --------------------------------------------------------------------------------

    def run(self) -> int:
        args = self.args
        card, card_bytes = self.card()
        self.results["card"] = card
        reference = args.reference
        self.results["dpo_settings"] = dpo_settings(args, reference)
        try:
            model = self.dpo_model()
            pairs_count = args.steps * args.micro_batch * args.grad_accum + 8
            from tests.builders import write_jsonl

            pairs = write_jsonl(self.out / "datasets" / "pairs.jsonl", long_pairs(pairs_count, args.seq_len))
            if self.starts("dpo_bare"):
                self.results["dpo_bare"] = self.dpo_bare(model, pairs, reference)
                self.save()
            if self.starts("dpo_service"):
                self.results["dpo_service"] = self.dpo_service(model, pairs, reference, card_bytes)
                self.save()
            bare, service = self.results.get("dpo_bare") or {}, self.results.get("dpo_service") or {}
            if bare.get("tokens_per_second") and service.get("tokens_per_second"):
                ratio = service["tokens_per_second"] / bare["tokens_per_second"]
                self.results["dpo_tokens_per_second_ratio"] = round(ratio, 4)
                self.check("service's DPO tokens/s at least 90% of the bare script's", ratio >= 0.9, f"{ratio:.3f}")
            planned, peak = service.get("planned_bytes"), service.get("nvml_device_used_peak_bytes")
            if planned and peak:
                self.results["dpo_planned_over_nvml_peak"] = round(planned / peak, 4)
                self.check(
                    "planner within 25% of the DPO job's NVML peak", abs(planned / peak - 1) <= 0.25, planned / peak
                )
            if self.starts("grpo_service"):
                self.results["grpo_service"] = grpo = self.grpo_service(self.backend)
                self.save()
                if grpo.get("status") != "succeeded" and self.backend == "unsloth" and self.time_left() > 100:
                    self.results["grpo_service_transformers"] = self.grpo_service("transformers")
        finally:
            self.save()
            self.keep_logs()
        print_table(self.results, self.checks)
        return 0 if all(ok for _name, ok, _detail in self.checks) else 1


def tail(path: Path, chars: int = 600) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def gib(value: Any) -> str:
    return f"{value / GIB:.1f} GiB" if isinstance(value, (int, float)) else "-"


def print_table(results: dict[str, Any], checks: list[tuple[str, bool, str]]) -> None:
    bare, service = results.get("dpo_bare") or {}, results.get("dpo_service") or {}
    grpo = results.get("grpo_service") or {}
    settings = results.get("dpo_settings") or {}
    shape, seq = settings.get("shape"), settings.get("seq_len")
    batch = f"{settings.get('micro_batch')} x {settings.get('grad_accum')}"
    print(
        f"\n{results['card']} {results['date']}: DPO of {shape}, seq {seq}, micro-batch {batch}, "
        f"reference {settings.get('reference')}"
    )
    print(f"{'':28}{'bare script':>16}{'service':>16}")
    for label, key, shown in (
        ("tokens/s (after step 1)", "tokens_per_second", lambda v: f"{v:,.0f}" if v else "-"),
        ("first step s", "first_step_seconds", lambda v: f"{v}" if v is not None else "-"),
        ("NVML peak", "nvml_device_used_peak_bytes", gib),
        ("torch peak allocated", "torch_peak_allocated_bytes", gib),
    ):
        print(f"{label:28}{shown(bare.get(key)):>16}{shown(service.get(key)):>16}")
    print(f"{'planned peak':28}{'':>16}{gib(service.get('planned_bytes')):>16}")
    print(
        f"tokens/s ratio (service / bare): {results.get('dpo_tokens_per_second_ratio', '-')}; "
        f"planned / NVML peak: {results.get('dpo_planned_over_nvml_peak', '-')}"
    )
    margins = service.get("rewards_margins") or []
    print(f"service DPO rewards/margins: {[round(m, 4) for m in margins if m is not None]}")
    if grpo:
        rewards = [round(r, 3) for r in grpo.get("reward") or [] if r is not None]
        kl = [round(k, 4) for k in grpo.get("kl") or [] if k is not None]
        trained_by = (grpo.get("trainer") or {}).get("trainer_class")
        peak = gib(grpo.get("nvml_device_used_peak_bytes"))
        print(f"GRPO ({trained_by}, {grpo.get('status')}): reward {rewards}, kl {kl}, NVML peak {peak}")
    failed = [name for name, ok, _detail in checks if not ok]
    print(f"{len(checks) - len(failed)} of {len(checks)} checks passed" + (f"; FAILED: {failed}" if failed else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="all", choices=["all", "bare-dpo"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu-methods"), help="work folder (under /tmp)")
    parser.add_argument("--results", type=Path, default=None, help="methods.json and the logs (default: --out)")
    parser.add_argument("--workdir", default="/tmp/bench", help="where bench/ builds the 8B shape (shared with it)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S)
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--grpo-steps", type=int, default=8)
    parser.add_argument("--optim", default="paged_adamw_8bit")
    parser.add_argument("--reference", default="precomputed", choices=["model", "precomputed"])
    parser.add_argument("--cpu-smoke", action="store_true", help="a tiny model on the CPU: checks this script")
    # bare-dpo's own
    parser.add_argument("--backend", default="unsloth")
    parser.add_argument("--model")
    parser.add_argument("--pairs")
    parser.add_argument("--result")
    args = parser.parse_args(argv)
    if args.mode == "bare-dpo":
        bare_dpo(args)
        return 0
    if args.cpu_smoke:
        args.seq_len, args.steps, args.grpo_steps = min(args.seq_len, 64), min(args.steps, 3), 2
        args.optim, args.shape = "adamw_torch", "tiny"
    return Methods(args).run()


if __name__ == "__main__":
    sys.exit(main())
