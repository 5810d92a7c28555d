"""Two questions for the GPU machine before the worker changes how it uses standbys and packing
(issue 25), in one call:

1. What does a standby trainer hold on the GPU once its imports are done? The worker could start
   the next job's standby while a job runs (so back-to-back jobs find one ready) only if an idle
   standby takes no device memory from the running job, or little and known. Measured with NVML
   (the process's own used memory and the device's) after `trainer.standby.import_packages()`, with and
   without PYTORCH_NVML_BASED_CUDA_CHECK, and where the import time goes (`-X importtime`).
2. Does a padding-free batch attend across its sequences' boundaries on this stack? The service's
   `packing: true` always runs padding-free (several sequences in one row, position ids restarting
   at each). Each sequence's logits in the packed row are compared with the same sequence run alone,
   through Unsloth's model as the trainer loads it (a small random-weight Llama built here) and
   through plain transformers (sdpa), in bf16.

Run on the GPU machine with the bundle (.gpu/):
    source .gpu/activate.sh && python3 scripts/gpu_standby_probe.py --out $OUT"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024**2

IMPORTER = """
import json, sys, time
sys.path.insert(0, {root!r})
started = time.monotonic()
from trainer.standby import import_packages
loaded = import_packages()
print("READY " + json.dumps({{"ready_s": round(time.monotonic() - started, 2), "loaded": loaded}}), flush=True)
sys.stdin.readline()
"""


def nvml_snapshot(pid: int) -> dict[str, Any]:
    import pynvml

    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    used = pynvml.nvmlDeviceGetMemoryInfo(handle).used
    mine = None
    for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if proc.pid == pid:
            mine = proc.usedGpuMemory
    return {"device_used_mib": round(used / MIB), "process_used_mib": None if mine is None else round(mine / MIB)}


def standby_footprint(env_extra: dict[str, str], label: str, out: Path) -> dict[str, Any]:
    """Start an importer as a standby does, wait for its imports, read NVML, let it go."""
    env = {**os.environ, **env_extra, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    before = nvml_snapshot(-1)
    started = time.monotonic()
    log = out / f"importtime-{label}.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-c", IMPORTER.format(root=str(ROOT))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            text=True,
        )
        assert proc.stdout is not None and proc.stdin is not None
        line = ""
        while not line.startswith("READY ") and (text := proc.stdout.readline()):  # Unsloth prints a banner
            line = text
        wall = time.monotonic() - started
        time.sleep(2)  # anything started in the background at import (threads) has its chance
        after = nvml_snapshot(proc.pid)
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(60)
    ready = json.loads(line.split(" ", 1)[1]) if line.startswith("READY ") else {"error": line}
    return {
        "label": label,
        "env": env_extra,
        "wall_s": round(wall, 2),
        **ready,
        "device_used_before_mib": before["device_used_mib"],
        "device_used_after_import_mib": after["device_used_mib"],
        "process_used_mib": after["process_used_mib"],
        "top_imports": top_imports(log),
    }


def top_imports(log: Path, count: int = 15) -> list[tuple[str, float]]:
    """The top-level packages by cumulative import time (-X importtime's stderr)."""
    totals: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = [p.strip() for p in line[len("import time:") :].split("|")]
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        name = parts[2]
        # Nesting is shown by leading spaces in the raw line: top level has exactly one space.
        raw_name = line.rsplit("|", 1)[1]
        if raw_name.startswith("  "):
            continue
        totals[name] = totals.get(name, 0.0) + int(parts[1]) / 1e6
    return sorted(((n, round(s, 2)) for n, s in totals.items()), key=lambda x: -x[1])[:count]


def packed_attention_check(out: Path) -> dict[str, Any]:
    """Each sequence alone against the same sequences packed into one row (position ids restarting),
    as TRL's padding-free collator feeds them and its SFTTrainer calls the model (use_cache=False;
    with a cache, transformers does not look for packed sequences at all: the contrast rows)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from tests.builders import build_llama

    shape = {
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    }
    model_dir = build_llama(Path("/tmp/packed-check-llama"), shape=shape, dtype="bfloat16")
    lengths = [300, 500, 200]
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, 400, (n,), generator=generator) for n in lengths]
    packed_ids = torch.cat(sequences).unsqueeze(0).cuda()
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).cuda()

    def differences(model: Any, use_cache: bool) -> list[float]:
        with torch.no_grad():
            packed = model(input_ids=packed_ids, position_ids=position_ids, use_cache=use_cache).logits.float()
            found, offset = [], 0
            for seq in sequences:
                alone = model(input_ids=seq.unsqueeze(0).cuda(), use_cache=use_cache).logits.float()[0]
                found.append(round((packed[0, offset : offset + len(seq)] - alone).abs().max().item(), 4))
                offset += len(seq)
        return found

    def compare(model: Any, name: str) -> dict[str, Any]:
        rows: dict[str, Any] = {"path": name}
        for mode in ("train", "eval"):
            model.train(mode == "train")
            rows[f"{mode}_use_cache_false"] = differences(model, False)
            rows[f"{mode}_use_cache_true"] = differences(model, True)
        # bf16 noise is far below what another sequence's tokens do to the logits (the contrast).
        noise = max(rows["train_use_cache_false"][0], 0.05)
        rows["attends_within_each_sequence_in_training"] = max(rows["train_use_cache_false"][1:]) <= 4 * noise
        return rows

    results = []
    try:
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(
            str(model_dir), max_seq_length=2048, dtype=torch.bfloat16, load_in_4bit=False, full_finetuning=True
        )
        results.append(compare(model, "unsloth"))
        del model
    except Exception as exc:  # keep the other path's answer
        results.append({"path": "unsloth", "error": repr(exc)[:800]})
    try:
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
        results.append(compare(plain.cuda(), "transformers sdpa"))
    except Exception as exc:
        results.append({"path": "transformers sdpa", "error": repr(exc)[:800]})
    return {"lengths": lengths, "results": results}


def card() -> str:
    import pynvml

    name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
    return name.decode() if isinstance(name, bytes) else str(name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--variants", default="default,default-again,nvml-check", help="which standby imports to measure, in order"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import pynvml

    pynvml.nvmlInit()
    results: dict[str, Any] = {"card": card(), "date": datetime.now(UTC).date().isoformat(), "standby": []}
    variants = {
        "default": {},
        "default-again": {},  # page cache warm: what a standby started after a job pays
        "nvml-check": {"PYTORCH_NVML_BASED_CUDA_CHECK": "1"},
    }
    for label in args.variants.split(","):
        env = variants[label]
        try:
            results["standby"].append(standby_footprint(env, label, args.out))
        except Exception as exc:
            results["standby"].append({"label": label, "error": repr(exc)[:800]})
        (args.out / "standby-probe.json").write_text(json.dumps(results, indent=2))
    try:
        results["packed_attention"] = packed_attention_check(args.out)
    except Exception as exc:
        results["packed_attention"] = {"error": repr(exc)[:800]}
    (args.out / "standby-probe.json").write_text(json.dumps(results, indent=2))
    for row in results["standby"]:
        print(
            f"{row['label']:>14}: ready {row.get('ready_s')} s, process {row.get('process_used_mib')} MiB, "
            f"device {row.get('device_used_before_mib')} -> {row.get('device_used_after_import_mib')} MiB; "
            f"top {row.get('top_imports', [])[:6]}"
        )
    print(json.dumps(results.get("packed_attention"), indent=1))
    for path in args.out.glob("importtime-*.txt"):  # large; the summary is in the JSON
        path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
