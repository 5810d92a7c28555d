"""GPU end-to-end check: the service runs an Unsloth full fine-tune and reports true figures.

Run on a GPU machine from the repository root (see docs/gpu.md):
    scripts/gpu-e2e [--out DIR]
It starts redis-server, the API and a worker as a user would, builds a ~300M-parameter
random-weight Llama and a chat dataset, submits a job with backend "unsloth", polls it to
`succeeded`, checks the record and step logs, downloads the `final` checkpoint over HTTP,
loads it with transformers on the GPU and generates. Prints a table; exits 1 on a failed check."""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.nvidia_smi import MemorySampler
from scripts.service_harness import Service
from tests.builders import SMALL_LLAMA, build_llama, chat_rows, write_jsonl

GIB = 1024**3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu-e2e"))
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    out: Path = args.out
    checks: list[tuple[str, bool, str]] = []

    def check(name: str, ok: bool, detail: object = "") -> None:
        checks.append((name, bool(ok), str(detail)))
        print(f"[{'ok' if ok else 'FAIL'}] {name} {detail}", flush=True)

    t0 = time.monotonic()
    model_dir = build_llama(out / "models" / "small-llama", shape=SMALL_LLAMA, dtype="bfloat16", device="cuda")
    dataset = write_jsonl(out / "datasets" / "chat.jsonl", chat_rows(4000, words=60, system=True))
    print(f"built model and data in {time.monotonic() - t0:.1f} s", flush=True)

    spec = {
        "model": str(model_dir),
        "dataset": {"source": str(dataset)},
        "backend": "unsloth",
        "hyperparameters": {
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 2,
            "max_seq_length": 1024,
            "learning_rate": 1e-4,
            "max_steps": args.steps,
            "logging_steps": 5,
            "save_steps": args.steps // 2,
            "save_total_limit": 1,
        },
    }
    # nvidia-smi's own view, ten times a second, to hold the job record's figures against.
    smi = MemorySampler(out / "nvidia-smi.csv")
    with Service(out / "service", allowed_roots=[out / "models", out / "datasets"]) as service, smi:
        http = service.http()
        response = http.post("/jobs", json=spec)
        check("POST /jobs -> 201", response.status_code == 201, response.status_code)
        job_id = response.json()["id"]
        record = service.wait_for(job_id, timeout_s=480, echo=True)
        smi.stop()
        smi_peak = smi.peak_bytes()
        check("job succeeded", record["status"] == "succeeded", record["error"])
        check("backend is unsloth", record["backend"] == "unsloth", record["backend"])
        check("versions name unsloth", "unsloth" in (record["versions"] or {}), record["versions"])
        logs = http.get(f"/jobs/{job_id}/logs").json()["items"]
        check(
            "step logs every 5 steps",
            [r["step"] for r in logs] == list(range(5, args.steps + 1, 5)),
            [r["step"] for r in logs],
        )
        complete = all(
            r["loss"]
            and r["learning_rate"]
            and r["tokens_per_second"]
            and r["vram"]["allocated"]
            and r["vram"]["device_used"]
            for r in logs
        )
        check("logs carry loss, lr, tokens/s, VRAM", complete)
        above = all(r["vram"]["device_used"] > r["vram"]["allocated"] for r in logs)
        check(
            "NVML device-used above torch allocated",
            above,
            [(r["vram"]["device_used_gib"], r["vram"]["allocated_gib"]) for r in logs],
        )
        record_peak = record["vram"]["device_used_peak"] or 0
        deviation = abs(record_peak - smi_peak) / smi_peak
        check(
            "record's device-used peak within 2% of nvidia-smi's",
            deviation <= 0.02,
            f"record {record_peak / GIB:.3f} GiB, nvidia-smi {smi_peak / GIB:.3f} GiB ({deviation:.2%})",
        )
        events = http.get(f"/jobs/{job_id}/events").json()["items"]
        overhead = next((e["message"] for e in events if e["kind"] == "reporting_overhead"), "none reported")
        check("reporting overhead reported", overhead != "none reported", overhead)

        checkpoints = {c["name"]: c for c in http.get(f"/jobs/{job_id}/checkpoints").json()["items"]}
        check(
            "checkpoints final + latest", set(checkpoints) == {"final", f"checkpoint-{args.steps}"}, sorted(checkpoints)
        )
        shards = [f for f in checkpoints["final"]["files"] if f["path"].endswith(".safetensors")]
        check(
            "final has safetensors, all hashed",
            shards and all(f["sha256"] for f in checkpoints["final"]["files"]),
            [(f["path"], f["size"]) for f in shards],
        )
        t_dl = time.monotonic()
        archive = http.get(checkpoints["final"]["archive_url"])
        dl_s = time.monotonic() - t_dl
        check("archive download", archive.status_code == 200, f"{len(archive.content) / GIB:.2f} GiB in {dl_s:.1f} s")
        target = out / "download"
        with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
            tar.extractall(target, filter="data")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(target / "final", dtype=torch.bfloat16).cuda()
    tokenizer = AutoTokenizer.from_pretrained(target / "final")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "the quick fox"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    ).to("cuda")
    generated = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    new_tokens = generated.shape[1] - prompt["input_ids"].shape[1]
    check(
        "downloaded final loads and generates on the GPU",
        new_tokens > 0,
        repr(tokenizer.decode(generated[0][prompt["input_ids"].shape[1] :])),
    )

    last = logs[-1] if logs else {}
    summary = {
        "card": torch.cuda.get_device_name(0),
        "date": time.strftime("%Y-%m-%d"),
        "job_id": job_id,
        "steps": args.steps,
        "tokens_per_second_last": last.get("tokens_per_second"),
        "device_used_peak_gib": record["vram"].get("device_used_peak_gib"),
        "nvidia_smi_peak_gib": round(smi_peak / GIB, 3),
        "reporting_overhead": overhead,
        "peak_allocated_gib": record["vram"].get("peak_allocated_gib"),
        "versions": record["versions"],
        "checks_failed": [c[0] for c in checks if not c[1]],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n| check | result | detail |\n|---|---|---|")
    for name, ok, detail in checks:
        print(f"| {name} | {'ok' if ok else 'FAIL'} | {detail[:90]} |")
    print(json.dumps(summary))
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
