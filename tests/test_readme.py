"""The README's examples run as written: its OpenAI SDK example, against the running service
(uvicorn, a worker, a trainer), from a folder laid out as the walk-through leaves the checkout."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.builders import chat_rows, write_jsonl
from tests.conftest import Env, Service

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def block_after(marker: str, fence: str) -> str:
    """The first fenced block (```python, or ``` for output) after `marker` in the README."""
    rest = README.split(marker, 1)[1]
    return rest.split(f"```{fence}\n", 1)[1].split("```\n", 1)[0]


@pytest.mark.slow  # it starts the service and trains
def test_the_openai_sdk_example_runs_as_written(service: Service, env: Env, tiny_model: Path, tmp_path: Path) -> None:
    code = block_after("## OpenAI-compatible API", "python")
    printed = block_after("(its third job), it prints:", "")  # the output shown under it
    assert code.count("http://127.0.0.1:8000/v1") == 1
    checkout = tmp_path / "checkout"  # the walk-through's data/models/tiny and data/datasets/chat.jsonl
    (checkout / "data" / "models").mkdir(parents=True)
    (checkout / "data" / "models" / "tiny").symlink_to(tiny_model)  # under the service's allowed roots
    write_jsonl(checkout / "data" / "datasets" / "chat.jsonl", chat_rows(64))
    ran = subprocess.run(
        [sys.executable, "-c", code.replace("http://127.0.0.1:8000", service.url)],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ran.returncode == 0, ran.stderr

    def shape(text: str) -> list[str]:  # the lines with their figures (and the job's number) left out
        return [re.sub(r"\d+(,\d{3})*(\.\d+)?", "N", line) for line in text.strip().splitlines()]

    assert shape(ran.stdout) == shape(printed), ran.stdout
    assert ran.stdout.strip().endswith("succeeded jobs/1/checkpoints/final /jobs/1/checkpoints/final/archive")
