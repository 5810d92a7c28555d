"""GPU check of the dataset options on the Unsloth path: assistant-only loss, a held-out
validation set with eval loss, a column mapping with completion-only loss, packing, and a
validation file uploaded with POST /files, each through the service as a user would run it.

Run on a GPU machine from the repository root (see docs/gpu.md):
    scripts/gpu-datasets [--out DIR]
Prints a table of checks and the figures of both jobs; exits 1 on a failed check."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.service_harness import Service
from tests.builders import MARKED_TEMPLATE, SMALL_LLAMA, build_llama, chat_rows, qa_rows, write_jsonl

GIB = 1024**3


def run_job(
    service: Service, spec: dict, name: str, backend: str, check: Callable[[str, bool, object], None]
) -> tuple[dict, list[dict], dict, dict[int, float]]:
    """Submit, wait, and check it succeeded on the backend: (record, step logs, data report,
    eval loss by step)."""
    http = service.http()
    response = http.post("/jobs", json=spec)
    check(f"{name} job accepted", response.status_code == 201, response.text[:300])
    record = service.wait_for(response.json()["id"], timeout_s=400, echo=True)
    logs = http.get(f"/jobs/{record['id']}/logs").json()["items"]
    check(
        f"{name} job succeeded on {backend}",
        record["status"] == "succeeded" and record["backend"] == backend,
        f"{record['status']} {record['backend']} {record['error']}",
    )
    evaluated = {row["step"]: row["eval_loss"] for row in logs if row["eval_loss"] is not None}
    return record, logs, record["data_report"] or {}, evaluated


def figures_of(record: dict, logs: list[dict], report: dict, evaluated: dict[int, float]) -> dict:
    return {
        "tokens_per_second": [row["tokens_per_second"] for row in logs if row["tokens_per_second"]],
        "train_loss": [row["loss"] for row in logs if row["loss"] is not None],
        "eval_loss": evaluated,
        "nvml_peak_gib": round((record["vram"].get("device_used_peak") or 0) / GIB, 2),
        "data_report": report,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu-datasets"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="a tiny model on the CPU with the transformers backend: checks this script, not Unsloth",
    )
    args = parser.parse_args()
    backend, shape, device = ("transformers", None, "cpu") if args.cpu_smoke else ("unsloth", SMALL_LLAMA, "cuda")
    out: Path = args.out
    checks: list[tuple[str, bool, str]] = []
    figures: dict[str, dict] = {}

    def check(name: str, ok: bool, detail: object = "") -> None:
        checks.append((name, bool(ok), str(detail)))
        print(f"[{'ok' if ok else 'FAIL'}] {name} {detail}", flush=True)

    from transformers import AutoTokenizer

    model_dir = build_llama(out / "models" / "small-llama", shape=shape, dtype="bfloat16", device=device)
    marked = out / "models" / "marked-tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = MARKED_TEMPLATE
    tokenizer.save_pretrained(marked)
    chat = write_jsonl(out / "datasets" / "chat.jsonl", chat_rows(2000, words=60, system=True))
    qa = write_jsonl(out / "datasets" / "qa.jsonl", qa_rows(3000))
    qa_validation = "".join(json.dumps(row) + "\n" for row in qa_rows(3100)[3000:]).encode()

    with Service(out / "service", allowed_roots=[out / "models", out / "datasets"]) as service:
        http = service.http()

        # 1. Chat rows, loss on the assistant turns, 5% held out and evaluated every 5 steps.
        spec = {
            "model": str(model_dir),
            "dataset": {"source": str(chat)},
            "backend": backend,
            "chat_template_from": str(marked),
            "validation": {"fraction": 0.05},
            "hyperparameters": {
                "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 2,
                "max_seq_length": 1024,
                "learning_rate": 1e-4,
                "max_steps": args.steps,
                "logging_steps": 5,
                "eval_steps": 5,
                "save_steps": 1000,
                "assistant_only_loss": True,
            },
        }
        record, logs, report, evaluated = run_job(service, spec, "chat", backend, check)
        check(
            "eval loss at every eval_steps",
            sorted(evaluated) == list(range(5, args.steps + 1, 5))
            and all(math.isfinite(v) and v > 0 for v in evaluated.values()),
            evaluated,
        )
        check(
            "record's eval_loss is the last one",
            record["metrics"].get("eval_loss") == evaluated.get(args.steps),
            record["metrics"],
        )
        check(
            "assistant-only: loss tokens well under all tokens",
            0 < report.get("loss_tokens_per_epoch", 0) < 0.6 * report.get("tokens_per_epoch", 0),
            f"{report.get('loss_tokens_per_epoch')} of {report.get('tokens_per_epoch')}",
        )
        check(
            "the trainer's prepared labels hold the reported loss tokens",
            report.get("loss_tokens_prepared") in (None, report.get("loss_tokens_per_epoch")),
            f"prepared {report.get('loss_tokens_prepared')} vs report {report.get('loss_tokens_per_epoch')}",
        )
        figures["chat_assistant_only_eval"] = figures_of(record, logs, report, evaluated)

        # 2. Mapped question/answer rows: completion-only loss by default, packing, an uploaded validation file.
        file_id = http.post("/files", files={"file": ("qa-validation.jsonl", qa_validation)}).json()["id"]
        spec = {
            "model": str(model_dir),
            "backend": backend,
            "dataset": {"source": str(qa), "columns": {"prompt": "question", "completion": "answer"}},
            "validation": {"file_id": file_id},
            "hyperparameters": {
                "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 1,
                "max_seq_length": 512,
                "learning_rate": 1e-4,
                "max_steps": args.steps,
                "logging_steps": 5,
                "eval_steps": 10,
                "save_steps": 1000,
                "packing": True,
            },
        }
        record, logs, report, evaluated = run_job(service, spec, "packed", backend, check)
        check(
            "packing: TRL's sequence count replaced the estimate",
            report.get("sequences_estimated") is False and report.get("sequences_per_epoch", 3000) < 3000 / 4,
            f"{report.get('sequences_per_epoch')} sequences from {report.get('rows_used')} rows",
        )
        check(
            "completion-only: loss tokens under all tokens",
            0 < report.get("loss_tokens_per_epoch", 0) < report.get("tokens_per_epoch", 0),
            f"{report.get('loss_tokens_per_epoch')} of {report.get('tokens_per_epoch')}",
        )
        check(
            "uploaded validation file evaluated",
            sorted(evaluated) == list(range(10, args.steps + 1, 10))
            and report.get("validation", {}).get("rows_used") == 100,
            evaluated,
        )
        figures["qa_packed_completion_only"] = figures_of(record, logs, report, evaluated)

    import torch

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    summary = {
        "card": card,
        "date": time.strftime("%Y-%m-%d"),
        "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in checks],
        "jobs": figures,
    }
    (out / "gpu-datasets.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{summary['card']}, {summary['date']}")
    for name, ok, detail in checks:
        print(f"| {'ok' if ok else 'FAIL'} | {name} | {detail[:100]} |")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
