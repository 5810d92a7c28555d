"""What every benchmark variant shares: the model and data it trains on, the settings, how
steps are timed, and the arithmetic of tokens and FLOPs."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.builders import LLAMA_3_1_8B, PHI_4_14B, SMALL_LLAMA, build_llama, write_jsonl  # noqa: E402

SHAPES = {"llama-3.1-8b": LLAMA_3_1_8B, "phi-4-14b": PHI_4_14B, "small": SMALL_LLAMA}
# Every row is longer than the sequence length, so every sample is truncated to exactly
# seq_len tokens and a step trains micro_batch * grad_accum * seq_len tokens: tokens/s is then
# arithmetic, and the bare scripts need no token counting of their own.
MIN_WORDS_PER_ROW = 6000


def words_per_row(seq_len: int) -> int:
    """Enough words that a row outlasts seq_len tokens (each word is at least one token)."""
    return max(MIN_WORDS_PER_ROW, seq_len + seq_len // 4)


def add_workload_args(parser: Any) -> None:
    """The flags every variant takes, so one `bench/run ... --steps 8` reaches all of them."""
    parser.add_argument("--workdir", default="/tmp/bench")
    parser.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)


def dataset_rows(args: Any) -> int:
    return args.steps * args.micro_batch * args.grad_accum + 16


def settings(args: Any) -> dict[str, Any]:
    return {
        "shape": args.shape,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum,
        "steps": args.steps,
        "optim": "paged_adamw_8bit",
        "learning_rate": 5e-6,
    }


def tokens_per_step(s: dict[str, Any]) -> int:
    return int(s["micro_batch"] * s["grad_accum"] * s["seq_len"])


def prepare(workdir: Path, shape: str, seq_len: int, rows: int) -> tuple[Path, Path]:
    """Build (once per machine) the random-weight model and the chat dataset."""
    model_dir = workdir / "models" / shape
    if not (model_dir / "config.json").exists():
        started = time.monotonic()
        # The real Llama-3.1 context, so one model serves every sequence length measured.
        build_llama(
            model_dir,
            shape=dict(SHAPES[shape]),
            dtype="bfloat16",
            device="cuda",
            max_position_embeddings=max(seq_len, 131072),
        )
        print(f"built {shape} in {time.monotonic() - started:.1f} s", flush=True)
    words = words_per_row(seq_len)
    dataset = workdir / "datasets" / f"long-chat-{rows}-{words}.jsonl"
    if not dataset.exists():
        import random

        from tests.builders import WORDS

        rng = random.Random(0)
        write_jsonl(
            dataset,
            [
                {
                    "messages": [
                        {"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(50))},
                        {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(words))},
                    ]
                }
                for _ in range(rows)
            ],
        )
    return model_dir, dataset


def model_flops_per_token(config: dict[str, Any], seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight that multiplies (all but the input embedding,
    a lookup) plus attention's score and value products, 12 * layers * hidden * seq_len
    (PaLM's appendix B). Gradient checkpointing's recompute is not counted: MFU counts the
    model's work, not the schedule's."""
    d, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    heads, kv_heads, ffn = config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]
    head_dim = d // heads
    per_layer = d * d + 2 * d * kv_heads * head_dim + d * d + 3 * d * ffn
    matmul_weights = layers * per_layer + d * vocab  # + the LM head
    return 6.0 * matmul_weights + 12.0 * layers * d * seq_len


def step_rate(step_ends: list[tuple[int, float]], tokens_step: int) -> dict[str, float | None]:
    """Tokens/s over the steps after the first, from (step, time at its end) pairs."""
    if len(step_ends) < 2:
        return {"tokens_per_second": None, "seconds_per_step": None}
    (first_step, first_t), (last_step, last_t) = step_ends[0], step_ends[-1]
    per_step = (last_t - first_t) / (last_step - first_step)
    return {"tokens_per_second": round(tokens_step / per_step, 1), "seconds_per_step": round(per_step, 3)}


def save(out: Path, name: str, payload: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    print(f"RESULT {name}: {json.dumps(payload)}", flush=True)
