"""Merge one benchmark's variant files into bench/results/<date>-<card>-<shape>.json and print
the table that docs/benchmarks.md shows.

    python3 bench/report.py DIR [DIR ...]   (folders holding matmul.json, bare_unsloth.json, ...)"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

GIB = 1024**3
RESULTS = Path(__file__).resolve().parent / "results"


def load(dirs: list[Path]) -> dict[str, dict]:
    found: dict[str, dict] = {}
    for folder in dirs:
        for path in folder.glob("*.json"):
            found[path.stem] = json.loads(path.read_text())
    return found


def mfu(variant: dict, tflops: float) -> float | None:
    if not variant.get("tokens_per_second"):
        return None
    return round(variant["tokens_per_second"] * variant["flops_per_token"] / (tflops * 1e12), 4)


def main() -> None:
    parts = load([Path(p) for p in sys.argv[1:]])
    tflops = parts["matmul"]["bf16_tflops"]
    variants = {k: parts[k] for k in ("service", "bare_unsloth", "plain_trl") if k in parts}
    for v in variants.values():
        v["mfu"] = mfu(v, tflops)
    service, bare = variants.get("service"), variants.get("bare_unsloth")
    cards = {v["card"] for v in variants.values()} | {parts["matmul"]["card"]}
    if len(cards) != 1:
        raise SystemExit(f"variants ran on different cards: {cards}; rerun them on one machine")
    card = cards.pop()
    shape = next(iter(variants.values()))["settings"]["shape"]
    summary = {
        "card": card,
        "date": time.strftime("%Y-%m-%d"),
        "matmul_bf16_tflops": tflops,
        "settings": next(iter(variants.values()))["settings"],
        "variants": variants,
    }
    if service and bare:
        summary["service_vs_bare_tokens_ratio"] = round(service["tokens_per_second"] / bare["tokens_per_second"], 4)
        summary["service_minus_bare_torch_peak_gib"] = round(
            (service["torch_peak_allocated_bytes"] - bare["torch_peak_allocated_bytes"]) / GIB, 3
        )
        summary["service_minus_bare_nvml_peak_gib"] = round(
            (service["nvml_device_used_peak_bytes"] - bare["nvml_device_used_peak_bytes"]) / GIB, 3
        )
    RESULTS.mkdir(exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    target = RESULTS / f"{summary['date']}-{slug}-{shape}.json"
    target.write_text(json.dumps(summary, indent=2) + "\n")

    def gib(value: int | None) -> str:
        return f"{value / GIB:.1f}" if value else "-"

    print(f"{card}, {summary['date']}, {shape}, measured bf16 matmul {tflops} TFLOP/s -> {target.name}\n")
    print(
        "| variant | tokens/s | s/step | first step s | MFU | torch peak GiB | NVML peak GiB | POST to first step s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for v in variants.values():
        print(
            f"| {v['variant']} | {v['tokens_per_second']:,.0f} | {v['seconds_per_step']} | {v['first_step_seconds']} "
            f"| {v['mfu']:.1%} | {gib(v['torch_peak_allocated_bytes'])} | {gib(v['nvml_device_used_peak_bytes'])} "
            f"| {v.get('post_to_first_step_seconds', '-')} |"
        )
    if service:
        second = service.get("second_job") or {}
        print(
            f"\nsecond job of the same model: POST to first step {second.get('post_to_first_step_seconds')} s "
            f"(first job {service['post_to_first_step_seconds']} s), first step {second.get('first_step_seconds')} s"
        )
        print(
            f"callback overhead: {service['callback_overhead_share']:.3%} of training time; record's NVML peak "
            f"vs nvidia-smi: {service['record_vs_nvidia_smi_peak']:.2%}"
        )
    if "service_vs_bare_tokens_ratio" in summary:
        print(
            f"service_vs_bare_tokens_ratio {summary['service_vs_bare_tokens_ratio']}, "
            f"peak delta torch {summary['service_minus_bare_torch_peak_gib']} GiB, "
            f"NVML {summary['service_minus_bare_nvml_peak_gib']} GiB"
        )


if __name__ == "__main__":
    main()
