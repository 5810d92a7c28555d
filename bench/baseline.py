"""Baselines: the bare Unsloth recipe of DESIGN.md, or plain transformers + TRL with gradient
checkpointing, with the benchmark's settings. One run per process.

    python3 bench/baseline.py --backend unsloth|transformers --out DIR [--shape ...]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    add_workload_args,
    dataset_rows,
    model_flops_per_token,
    prepare,
    save,
    settings,
    step_rate,
    tokens_per_step,
)

parser = argparse.ArgumentParser()
parser.add_argument("--backend", choices=["unsloth", "transformers"], required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--tag", default="", help="appended to the result's name (planner points)")
add_workload_args(parser)
args, _service_only = parser.parse_known_args()  # bench/run passes the same flags to every variant

if args.backend == "unsloth":
    import unsloth  # noqa: F401  (first, as the recipe says)

import json  # noqa: E402
import time  # noqa: E402
from importlib import metadata  # noqa: E402

import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trainer.gpu import MemoryProbe  # noqa: E402  (the same NVML sampler the service uses)


class StepClock(TrainerCallback):
    def __init__(self) -> None:
        self.train_begin = 0.0
        self.step_ends: list[tuple[int, float]] = []

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        torch.cuda.synchronize()
        self.train_begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.step_ends.append((state.global_step, time.perf_counter()))


def main() -> None:
    s = settings(args)
    workdir = Path(args.workdir)
    model_dir, dataset_path = prepare(workdir, args.shape, args.seq_len, dataset_rows(args))
    probe = MemoryProbe()
    started = time.perf_counter()
    if args.backend == "unsloth":
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(model_dir),
            max_seq_length=args.seq_len,
            dtype=torch.bfloat16,
            load_in_4bit=False,
            full_finetuning=True,
        )
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.bfloat16, attn_implementation="sdpa"
        ).cuda()
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    load_s = time.perf_counter() - started
    dataset = load_dataset("json", data_files=str(dataset_path), split="train")
    clock = StepClock()
    trainer = SFTTrainer(
        model=model,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[clock],
        args=SFTConfig(
            output_dir=str(workdir / f"out-{args.backend}"),
            optim="paged_adamw_8bit",
            per_device_train_batch_size=args.micro_batch,
            gradient_accumulation_steps=args.grad_accum,
            learning_rate=5e-6,
            max_steps=args.steps,
            warmup_steps=0.03,
            lr_scheduler_type="linear",
            bf16=True,
            logging_steps=1,
            save_strategy="no",
            max_length=args.seq_len,
            dataset_text_field="text",
            report_to="none",
            seed=42,
            gradient_checkpointing=args.backend == "transformers",
        ),
    )
    trainer.train()
    vram = probe.read()
    probe.close()
    config = json.loads((model_dir / "config.json").read_text())
    rate = step_rate(clock.step_ends, tokens_per_step(s))
    name = {"unsloth": "bare_unsloth", "transformers": "plain_trl"}[args.backend]
    save(
        Path(args.out),
        f"{name}-{args.tag}" if args.tag else name,
        {
            "variant": {"unsloth": "b: bare Unsloth recipe", "transformers": "c: plain transformers + TRL"}[
                args.backend
            ],
            "settings": s,
            **rate,
            "first_step_seconds": round(clock.step_ends[0][1] - clock.train_begin, 2),
            "losses": [[e["step"], e["loss"]] for e in trainer.state.log_history if "loss" in e],
            "model_load_seconds": round(load_s, 2),
            "flops_per_token": model_flops_per_token(config, args.seq_len),
            "torch_peak_allocated_bytes": vram["peak_allocated"],
            "nvml_device_used_peak_bytes": vram["device_used_peak"],
            "device_total_bytes": vram["device_total"],
            "card": torch.cuda.get_device_name(0),
            "versions": {
                p: metadata.version(p)
                for p in ("torch", "transformers", "trl", "unsloth", "bitsandbytes")
                if _installed(p)
            },
        },
    )


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


main()
