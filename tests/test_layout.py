"""One folder per process, and the boundaries between them: the trainer child imports neither the
API (FastAPI, Starlette, app) nor the queue (RQ, Redis); the worker imports RQ but not the API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def modules_loaded_by(*modules: str) -> set[str]:
    """The top-level packages in sys.modules after a fresh interpreter imports `modules`."""
    code = (
        f"import sys, json, importlib\nfor m in {list(modules)!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def package_modules(package: str) -> list[str]:
    """Every module of the package, its subpackages' too (trainer/methods/), but `__main__`."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def test_the_trainer_loads_neither_the_api_nor_the_queue() -> None:
    loaded = modules_loaded_by(*package_modules("trainer"))
    # The imports ran: the trainer's own libraries are there (TRL itself is imported by each method
    # when it builds its trainer, after Unsloth where there is one).
    assert "transformers" in loaded
    assert loaded.isdisjoint(
        {"app", "fastapi", "starlette", "rq", "redis", "sse_starlette", "python_multipart", "uvicorn", "worker"}
    )


def test_the_worker_loads_the_queue_but_not_the_api() -> None:
    loaded = modules_loaded_by("worker.tasks", "worker.__main__")
    assert "rq" in loaded
    assert loaded.isdisjoint(
        {"app", "fastapi", "starlette", "sse_starlette", "python_multipart", "uvicorn", "torch"}
    ), "the worker must stay CUDA-free and API-free"


def test_core_needs_neither_fastapi_nor_the_processes() -> None:
    loaded = modules_loaded_by(*[m for m in package_modules("core") if m not in ("core.queue", "core.reconcile")])
    assert loaded.isdisjoint({"app", "worker", "trainer", "fastapi", "starlette", "rq", "torch"})


def test_the_api_loads_no_training_library() -> None:
    """It reads the Hugging Face cache and asks the Hub with huggingface_hub alone (app/hub.py)."""
    loaded = modules_loaded_by("app.main")
    assert "huggingface_hub" in loaded
    assert loaded.isdisjoint({"torch", "transformers", "datasets", "trl", "worker", "trainer"})
