"""Where a step of the 8B shape spends its time, and which fp8 and micro-batch variant is fastest
(issue 25), in one process on one GPU: the model is loaded once with Unsloth as the bare recipe
loads it, and each variant trains a few optimizer steps with the recipe's paged 8-bit AdamW on
full-length sequences of random tokens (speed does not depend on the token values).

This is an exploration, not the benchmark: it finds what to measure through the service
(scripts/gpu_speed.py does that, against the bare recipe in the same call). Variants, in the
order of what they teach, while the budget lasts (each skipped or failed one says so):

    bf16, micro-batch 2 x 4 (the recipe), with a torch.profiler trace of one step
    fp8 tensorwise, each Linear compiled on its own (what `precision: fp8` does today), with a trace
    fp8 tensorwise, each decoder layer compiled as a whole (casts fused with the norms around them)
    the same at micro-batch 8 x 1 and 4 x 2, and bf16 at 8 x 1 and 4 x 2
    fp8 rowwise, each decoder layer compiled
    under bf16 autocast, as the Trainer steps with bf16=True
    padding-free ("packed": the micro-batch as one row, as the service's Trainer feeds Unsloth), with
    each layer's MLP compiled as a region ("mlp") beside the decoder layer and the Linear layer

Tokens/s is over the optimizer steps after the first of each variant (that one may compile).
Run on the GPU machine with the bundle (.gpu/):
    source .gpu/activate.sh && python3 scripts/gpu_fp8_probe.py --out $OUT [--budget-s 540]"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
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
# (name, precision, compile unit, micro-batch, accumulation): 32,768 tokens an optimizer step each.
VARIANTS = [
    ("bf16 2x4", "bf16", None, 2, 4),
    ("fp8 linear 2x4", "tensorwise", "linear", 2, 4),
    ("fp8 layer 2x4", "tensorwise", "layer", 2, 4),
    ("fp8 layer 8x1", "tensorwise", "layer", 8, 1),
    ("fp8 linear 8x1", "tensorwise", "linear", 8, 1),
    ("bf16 8x1", "bf16", None, 8, 1),
    ("fp8 layer 4x2", "tensorwise", "layer", 4, 2),
    ("bf16 4x2", "bf16", None, 4, 2),
    ("fp8 rowwise layer 2x4", "rowwise", "layer", 2, 4),
    # Under bf16 autocast, as the Trainer runs a step with bf16=True (the variants above run without)
    ("fp8 layer 8x1 autocast", "tensorwise", "layer", 8, 1),
    ("bf16 8x1 autocast", "bf16", None, 8, 1),
    ("fp8 linear 2x4 autocast", "tensorwise", "linear", 2, 4),
    # Padding-free, as the Trainer fed Unsloth by default: the micro-batch's rows as one row with
    # position ids restarting at each (Unsloth should attend within each sequence; here its attention
    # ran over the whole row: docs/benchmarks.md).
    ("fp8 layer 8x1 packed", "tensorwise", "layer", 8, 1),
    ("bf16 8x1 packed", "bf16", None, 8, 1),
    ("fp8 mlp 8x1 packed", "tensorwise", "mlp", 8, 1),
    ("fp8 mlp 2x4 packed", "tensorwise", "mlp", 2, 4),
    ("bf16 2x4 packed", "bf16", None, 2, 4),
    ("fp8 layer 2x4 packed", "tensorwise", "layer", 2, 4),
    # What the service's auto micro-batch did before training: one pass at 2 and 4 (plain rows),
    # shapes left dynamic (torch's default), then training padding-free under autocast.
    ("fp8 layer 8x1 packed autocast dynamic", "tensorwise", "layer", 8, 1),
]
PROFILED = {"bf16 2x4", "fp8 linear 2x4", "fp8 layer 8x1 packed"}
# Seconds a variant needs besides its steps, a first compile included (H100, 8B): a guess that
# only decides what is skipped when the budget runs out.
VARIANT_OVERHEAD_S = 45


def kernel_category(name: str) -> str:
    n = name.lower()
    # Attention first: cuDNN's flash kernels are named cudnn_..._sdpa_sm90_flash_... (a first version
    # counted them as matmuls by their "sm90_").
    if "flash" in n or "fmha" in n or "attention" in n or "sdpa" in n:
        return "attention"
    if "scaled_mm" in n or "f8" in n or "fp8" in n or "e4m3" in n:
        return "fp8 matmul"
    if any(k in n for k in ("gemm", "cutlass", "nvjet", "xmma", "sm90_", "cublas", "matmul")):
        return "bf16 matmul"
    if "memcpy" in n or "memset" in n:
        return "copies"
    if "triton" in n:
        return "triton (fused)"
    if "adam" in n or "optimizer" in n or "kOptimizer" in name:
        return "optimizer"
    if "elementwise" in n or "vectorized" in n or "reduce" in n or "unrolled" in n:
        return "aten elementwise/reduce"
    return "other"


class Probe:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.began = time.monotonic()
        self.results: dict[str, Any] = {
            "script": "scripts/gpu_fp8_probe.py",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "variants": {},
        }

    def time_left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.began)

    def save(self) -> None:
        (self.out / "probe.json").write_text(json.dumps(self.results, indent=2))

    def load(self) -> None:
        import torch
        import unsloth
        from common import prepare

        a = self.args
        started = time.monotonic()
        model_dir, _ = prepare(Path(a.workdir), "llama-3.1-8b", a.seq_len, 16)
        from unsloth import FastLanguageModel

        self.model, _tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(model_dir),
            max_seq_length=a.seq_len,
            dtype=torch.bfloat16,
            load_in_4bit=False,
            full_finetuning=True,
        )
        self.model.train()
        import bitsandbytes as bnb
        import torch._dynamo

        # A new micro-batch gets a graph of its own, as a job (one size throughout) would have,
        # not a dynamic-shape graph shared with the sizes before it.
        torch._dynamo.config.automatic_dynamic_shapes = False
        for limit, value in (
            ("cache_size_limit", 256),
            ("recompile_limit", 256),
            ("accumulated_cache_size_limit", 4096),
        ):
            if hasattr(torch._dynamo.config, limit):
                setattr(torch._dynamo.config, limit, value)
        self.optimizer = bnb.optim.PagedAdamW8bit(self.model.parameters(), lr=5e-6)
        self.results["load_seconds"] = round(time.monotonic() - started, 1)
        self.results["card"] = torch.cuda.get_device_name(0)
        self.results["gradient_checkpointing"] = bool(getattr(self.model, "is_gradient_checkpointing", None))
        self.results["versions"] = {
            "torch": torch.__version__,
            "unsloth": getattr(unsloth, "__version__", "?"),
            "bitsandbytes": bnb.__version__,
        }
        self.results["matrix_rate_tflops"] = self.matrix_rate()
        from trainer.precision import decoder_layers

        self.layers = decoder_layers(self.model)
        self.precision = "bf16"

    def matrix_rate(self) -> dict[str, float]:
        """The card's bf16 and fp8 matmul rates (8192^3, bench/matmul.py): what a perfect step could use."""
        import torch
        from matmul import SIZE, tflops

        a = torch.randn(SIZE, SIZE, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(SIZE, SIZE, device="cuda", dtype=torch.bfloat16)
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()
        one = torch.tensor(1.0, device="cuda")
        return {
            "bf16": tflops(lambda: a @ b),
            "fp8": tflops(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16)),
        }

    def set_precision(self, precision: str, unit: str | None) -> None:
        """Convert to fp8 once (the recipe named; a later recipe converts the bf16 copy kept of
        nothing: the weights are the same bf16 tensors, so converting back swaps the module type)."""
        if precision != "bf16" and self.precision != precision:
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training

            from trainer.precision import fp8_layer

            if self.precision != "bf16":
                self.to_bf16_linears()
            convert_to_float8_training(
                self.model, config=Float8LinearConfig.from_recipe_name(precision), module_filter_fn=fp8_layer
            )
            self.precision = precision
        if precision == "bf16" and self.precision != "bf16":
            self.to_bf16_linears()
            self.precision = "bf16"
        self.set_compile_unit(unit)

    def to_bf16_linears(self) -> None:
        """Float8Linear back to nn.Linear, sharing the same weight tensors (the optimizer's)."""
        import torch.nn as nn
        from torchao.float8.float8_linear import Float8Linear

        for parent in list(self.model.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, Float8Linear):
                    plain = nn.Linear(0, 0, bias=child.bias is not None)
                    plain.in_features, plain.out_features = child.in_features, child.out_features
                    plain.weight = child.weight
                    if child.bias is not None:
                        plain.bias = child.bias
                    setattr(parent, child_name, plain)

    def set_compile_unit(self, unit: str | None) -> None:
        import torch.nn as nn

        layers = {id(layer) for layer in self.layers}
        mlps = {id(layer.mlp) for layer in self.layers}
        for module in self.model.modules():
            if isinstance(module, nn.Linear) or id(module) in layers or id(module) in mlps:
                module._compiled_call_impl = None
        if unit in ("linear", "mlp"):
            from torchao.float8.float8_linear import Float8Linear

            in_mlps = {id(m) for layer in self.layers for m in layer.mlp.modules()} if unit == "mlp" else set()
            for module in self.model.modules():
                if isinstance(module, Float8Linear) and id(module) not in in_mlps:
                    module.compile()
            if unit == "mlp":
                for layer in self.layers:
                    layer.mlp.compile()
        elif unit == "layer":
            for layer in self.layers:
                layer.compile()

    def steps(
        self,
        micro: int,
        accum: int,
        count: int,
        *,
        packed: bool = False,
        autocast: bool = False,
        profile_step: int | None = None,
    ) -> list[float]:
        """`count` optimizer steps; the seconds of each (synchronised). `packed`: each micro-batch
        as one row with restarting position ids (padding-free); `autocast`: under bf16 autocast, as
        the Trainer steps. With profile_step, that step runs under torch.profiler and its trace and
        tables are kept."""
        import torch

        vocab = int(self.model.config.vocab_size)
        seconds = []
        for step in range(count):
            profiler = None
            if step == profile_step:
                from torch.profiler import ProfilerActivity, profile

                profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                profiler.__enter__()
            torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(accum):
                ids = torch.randint(0, vocab, (micro, self.args.seq_len), device="cuda")
                rows: dict[str, Any] = {"input_ids": ids, "labels": ids}
                if packed:
                    positions = torch.arange(self.args.seq_len, device="cuda").repeat(micro)
                    rows = {"input_ids": ids.view(1, -1), "labels": ids.view(1, -1), "position_ids": positions[None]}
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    loss = self.model(**rows).loss / accum
                loss.backward()
                del loss
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - started)
            if profiler is not None:
                profiler.__exit__(None, None, None)
                self.profiled = (profiler, seconds[-1])
        return seconds

    def keep_profile(self, name: str) -> dict[str, Any]:
        profiler, wall = self.profiled
        slug = name.replace(" ", "-")
        table = profiler.key_averages().table(sort_by="cuda_time_total", row_limit=40)
        (self.out / f"profile-{slug}.txt").write_text(table)
        trace = self.out / f"trace-{slug}.json"
        profiler.export_chrome_trace(str(trace))
        with open(trace, "rb") as raw, gzip.open(f"{trace}.gz", "wb") as packed:
            shutil.copyfileobj(raw, packed)
        trace.unlink()
        from torch.autograd import DeviceType  # type: ignore[attr-defined]

        categories: dict[str, float] = {}
        for event in profiler.events():  # type: ignore[no-untyped-call]
            if event.device_type != DeviceType.CUDA:
                continue
            seconds = event.time_range.elapsed_us() / 1e6
            key = kernel_category(event.name)
            categories[key] = categories.get(key, 0.0) + seconds
        busy = sum(categories.values())
        return {
            "step_seconds": round(wall, 3),
            "kernel_seconds": {k: round(v, 3) for k, v in sorted(categories.items(), key=lambda kv: -kv[1])},
            "kernel_seconds_total": round(busy, 3),
            "gpu_idle_share_estimate": round(max(wall - busy, 0.0) / wall, 3),
            "top_kernels": table[:6000],
        }

    def variant(self, name: str, precision: str, unit: str | None, micro: int, accum: int) -> dict[str, Any]:
        import torch
        import torch._dynamo

        from trainer.gpu import MemoryProbe

        self.set_precision(precision, unit)
        words = name.split()
        autocast, packed, dynamic = "autocast" in words, "packed" in words, "dynamic" in words
        torch._dynamo.config.automatic_dynamic_shapes = dynamic
        if dynamic:  # the auto micro-batch's trial passes (plain rows), each size compiled before training
            for size in (2, 4):
                self.steps(size, 1, 1)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        probe = MemoryProbe()
        first = self.steps(micro, accum, 1, packed=packed, autocast=autocast)
        steps = self.args.steps
        profile_step = steps - 1 if name in PROFILED else None
        timed = self.steps(micro, accum, steps, packed=packed, autocast=autocast, profile_step=profile_step)
        vram = probe.read()
        probe.close()
        plain = [s for i, s in enumerate(timed) if i != profile_step]
        per_step = sorted(plain)[len(plain) // 2]
        tokens = micro * accum * self.args.seq_len
        found: dict[str, Any] = {
            "precision": precision,
            "compile_unit": unit,
            "autocast": autocast,
            "packed": packed,
            "dynamic_shapes_after_other_sizes": dynamic,
            "micro_batch_x_accumulation": [micro, accum],
            "first_step_seconds": round(first[0], 2),
            "step_seconds": [round(s, 3) for s in timed],
            "median_step_seconds": round(per_step, 3),
            "tokens_per_second": round(tokens / per_step, 1),
            "torch_peak_allocated_gib": round((vram.get("peak_allocated") or 0) / GIB, 2),
            "nvml_device_used_peak_gib": round((vram.get("device_used_peak") or 0) / GIB, 2),
        }
        if profile_step is not None:
            found["profile"] = self.keep_profile(name)
        return found

    def run(self) -> int:
        known = {v[0]: v for v in VARIANTS}
        named = [n.strip() for n in self.args.variants.split(",") if n.strip()]
        unknown = [n for n in named if n not in known]
        if unknown:  # before the model takes a minute of device time to load
            print(f"unknown variants {unknown}; known: {list(known)}", flush=True)
            return 2
        try:
            self.load()
        except Exception as exc:
            self.results["load_error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            self.save()
            print(self.results["load_error"], flush=True)
            return 1
        self.save()
        for name, precision, unit, micro, accum in [known[n] for n in named] if named else VARIANTS:
            need = VARIANT_OVERHEAD_S + (self.args.steps + 1) * 4.5 * (1 if precision == "bf16" else 0.9)
            if self.time_left() < need:
                self.results["variants"][name] = {"skipped": f"{self.time_left():.0f} s left, about {need:.0f} needed"}
                continue
            began = time.monotonic()
            print(f"[variant] {name}", flush=True)
            try:
                self.results["variants"][name] = self.variant(name, precision, unit, micro, accum)
            except Exception as exc:
                self.results["variants"][name] = {
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc()[-4000:],
                }
                self.optimizer.zero_grad(set_to_none=True)
                import torch

                torch.cuda.empty_cache()
            self.results["variants"][name]["variant_seconds"] = round(time.monotonic() - began, 1)
            brief = {k: v for k, v in self.results["variants"][name].items() if k != "profile"}
            print(f"[variant] {name}: {json.dumps(brief)[:600]}", flush=True)
            self.save()
        self.print_table()
        return 0

    def print_table(self) -> None:
        variants = self.results["variants"]
        base = (variants.get("bf16 2x4") or {}).get("tokens_per_second")
        print(f"\n{self.results.get('card')}  matmul TFLOP/s {self.results.get('matrix_rate_tflops')}")
        print(f"{'variant':<38} {'tokens/s':>9} {'x bf16 2x4':>10} {'first s':>8} {'torch GiB':>9} {'NVML GiB':>9}")
        for name, v in variants.items():
            rate = v.get("tokens_per_second")
            if rate is None:
                print(f"{name:<38} {(v.get('error') or v.get('skipped') or '')[:90]}")
                continue
            ratio = f"{rate / base:.3f}" if base else "-"
            print(
                f"{name:<38} {rate:>9,.0f} {ratio:>10} {v['first_step_seconds']:>8} "
                f"{v['torch_peak_allocated_gib']:>9} {v['nvml_device_used_peak_gib']:>9}"
            )
        for name, v in variants.items():
            if "profile" in v:
                p = v["profile"]
                print(
                    f"\nprofile {name}: step {p['step_seconds']} s, kernels {p['kernel_seconds_total']} s, "
                    f"idle ~{p['gpu_idle_share_estimate']:.0%}: {p['kernel_seconds']}"
                )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--workdir", default="/tmp/bench")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps a variant, after its first")
    parser.add_argument("--budget-s", type=float, default=540)
    parser.add_argument("--variants", default="", help="comma-separated names, run in the order given (default: all)")
    args = parser.parse_args()
    import unsloth  # noqa: F401  (before torch and transformers, as the recipe says)

    return Probe(args).run()


if __name__ == "__main__":
    sys.exit(main())
