"""The jobs dashboard (/watch) in a real headless Chromium against the API under uvicorn: the list
with status, progress, loss sparklines, tokens/s, GPUs and owner; the filters; the compare view of
two jobs' loss and eval-loss curves; with every host but the API's unreachable (no CDN: it works
offline). Screenshots are kept in test-output/dashboard/ (and the DOM each test read)."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import Session

from tests.conftest import ROOT, Env, Service, job_spec

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
OUTPUT = ROOT / "test-output" / "dashboard"
BROWSER_TIMEOUT_S = 90
LOSSES = {1: [2.5, 2.1, 1.8, 1.6], 2: [2.6, 2.3, 2.2]}
EVAL_LOSSES = {1: {4: 2.2, 8: 1.7}}


@pytest.fixture
def api(env: Env, tmp_path: Path) -> Iterator[Service]:
    service = Service(tmp_path / "service", data_dir=env.data_dir, redis_url=env.redis_url, settings=env.vars)
    try:
        service.start_api()
        yield service
    finally:
        service.stop()


def seed(api: Service, tiny_model: Path, chat_dataset: Path) -> None:
    """Three jobs submitted through the API; then, as a worker would have written them, job 1
    succeeded and job 2 running on two GPUs, with their step logs; job 3 stays queued."""
    from core.db import get_engine
    from core.models import Job, JobStatus, StepLog, utcnow

    http = api.http()
    for _ in range(3):
        assert http.post("/jobs", json=job_spec(tiny_model, chat_dataset)).status_code == 201
    gpu = {"name": "NVIDIA H100 80GB HBM3", "memory_bytes": 85 * 2**30}
    with Session(get_engine()) as session:
        for job_id, status in ((1, JobStatus.succeeded), (2, JobStatus.running)):
            job = session.get(Job, job_id)
            assert job is not None
            losses = LOSSES[job_id]
            job.status, job.started_at, job.step, job.total_steps = status, utcnow(), 2 * len(losses), 8
            job.metrics = {"loss": losses[-1], "tokens_per_second": 1234.5 * job_id}
            if status == JobStatus.succeeded:
                job.finished_at = utcnow()
            else:
                job.placement = {
                    "host": "gpu-1",
                    "gpus": [{"index": i, "uuid": f"GPU-{i}", **gpu} for i in range(2)],
                    "world_size": 2,
                    "strategy": "ddp",
                    "effective_batch": 8,
                }
            for index, loss in enumerate(losses, start=1):
                step = 2 * index
                session.add(
                    StepLog(job_id=job_id, step=step, loss=loss, eval_loss=EVAL_LOSSES.get(job_id, {}).get(step))
                )
            session.add(job)
        session.commit()


def chromium(url: str, name: str, tmp_path: Path) -> str:
    """The page's DOM once its scripts have run, and a screenshot of it (OUTPUT/<name>.png), from
    headless Chromium that can reach nothing but 127.0.0.1."""
    assert CHROMIUM, "chromium is not installed (scripts/test installs Debian's chromium)"
    OUTPUT.mkdir(parents=True, exist_ok=True)
    common = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # as root in CI
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={tmp_path / ('chromium-' + name)}",
        # Offline: every host but the API's fails to resolve, as on a box without the Internet.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--virtual-time-budget=20000",
        "--window-size=1280,900",
    ]
    dom = subprocess.run(
        [*common, "--dump-dom", url], capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S, check=True
    ).stdout
    (OUTPUT / f"{name}.html").write_text(dom)
    subprocess.run(
        [*common, f"--screenshot={OUTPUT / f'{name}.png'}", url],
        capture_output=True,
        timeout=BROWSER_TIMEOUT_S,
        check=True,
    )
    assert (OUTPUT / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return dom


def rows(dom: str) -> dict[int, str]:
    """Each job's table row, by id."""
    return {int(m.group(1)): m.group(0) for m in re.finditer(r'<tr data-job="(\d+)">.*?</tr>', dom, re.S)}


def test_the_dashboard_lists_filters_and_compares_jobs_in_a_real_browser(
    api: Service, env: Env, tiny_model: Path, chat_dataset: Path, tmp_path: Path
) -> None:
    seed(api, tiny_model, chat_dataset)
    dom = chromium(f"{api.url}/watch", "home", tmp_path)
    assert 'data-loaded="true"' in dom and "data-error" not in dom, dom[-2000:]
    listed = rows(dom)
    assert sorted(listed) == [1, 2, 3]
    assert list(listed) == [3, 2, 1]  # newest first
    assert '<span class="succeeded">succeeded</span>' in listed[1]
    assert '<span class="running">running</span>' in listed[2] and '<span class="queued">queued</span>' in listed[3]
    # Loss sparklines for the jobs with step logs, none for the queued one; tokens/s, GPUs, owner.
    assert all('class="spark-line"' in listed[i] for i in (1, 2)) and 'class="spark-line"' not in listed[3]
    assert '<span class="loss">1.6</span>' in listed[1] and '<td class="num">2,469</td>' in listed[2]
    assert '<td class="num">2</td>' in listed[2]  # its two GPUs
    assert "<td>default</td>" in listed[1] and f"<td>{tiny_model}</td>" in listed[1]
    assert 'style="width:75%"' in listed[2] and "6 / 8" in listed[2]  # progress

    # A filter from the page's URL (the status select): only the running job.
    running = chromium(f"{api.url}/watch?status=running", "running", tmp_path)
    assert list(rows(running)) == [2]

    # Compare: jobs 1 and 2's loss curves on one chart, job 1's eval loss dashed.
    compared = chromium(f"{api.url}/watch?compare=1,2", "compare", tmp_path)
    assert 'data-compared="1,2"' in compared and "data-error" not in compared
    chart = compared.split('id="compare-chart"', 1)[1].split("</svg>", 1)[0]
    assert len(re.findall(r'class="loss-line" data-job="1"', chart)) == 1
    assert len(re.findall(r'class="loss-line" data-job="2"', chart)) == 1
    assert re.findall(r'class="eval-line" data-job="(\d+)"', chart) == ["1"]
    loss_path = re.search(r'd="([^"]+)"[^>]*class="loss-line" data-job="1"', chart)
    assert loss_path is not None and loss_path.group(1).count("L") == len(LOSSES[1]) - 1  # a point per step log

    # Nothing the page loads comes from elsewhere: its files name no other host.
    for page in (
        "templates/dashboard.html",
        "static/dashboard/dashboard.js",
        "static/dashboard/dashboard.css",
    ):
        text = (ROOT / "app" / page).read_text()
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), page
