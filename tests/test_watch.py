"""The live views of a job: the Server-Sent Events stream and the watch page, over real SQLite."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urljoin

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, SQLModel
from starlette.types import Message

from app.main import app
from app.routes import watch
from core.config import get_settings
from core.db import get_engine
from core.models import (
    DEFAULT_PROJECT_ID,
    DEFAULT_PROJECT_NAME,
    Job,
    JobEvent,
    JobStatus,
    Project,
    StepLog,
    utcnow,
)
from tests.conftest import raw_get_scope

GIB = 1024**3
SPEC = {"model": "org/tiny-llama", "dataset": {"source": "org/tiny-data", "split": "train"}}


@pytest.fixture
def client(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DATABASE_URL", "")
    monkeypatch.setenv("API_TOKENS", "")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:9/0")  # never reached: nothing here enqueues
    get_settings.cache_clear()
    get_engine.cache_clear()
    SQLModel.metadata.create_all(get_engine())
    with Session(get_engine()) as session:  # what migration 0012 makes: the project jobs belong to
        session.add(Project(id=DEFAULT_PROJECT_ID, name=DEFAULT_PROJECT_NAME))
        session.commit()
    # Not `with TestClient(app)`: that would run the lifespan, whose reconcile loop wants Redis.
    yield TestClient(app)
    get_engine().dispose()
    get_settings.cache_clear()
    get_engine.cache_clear()


def add_job(status: JobStatus, *, logs: int = 0, events: int = 0) -> int:
    with Session(get_engine()) as session:
        job = Job(
            spec=SPEC,
            status=status,
            step=logs * 10,
            total_steps=100,
            eta_seconds=90.0,
            metrics={"loss": 2.5},
            vram={"allocated": 2 * GIB, "device_total": 80 * GIB},
        )
        session.add(job)
        session.commit()
        assert job.id is not None
        for i in range(1, logs + 1):
            session.add(
                StepLog(
                    job_id=job.id,
                    step=10 * i,
                    loss=3.0 - i / 10,
                    vram_allocated=2 * GIB,
                    device_used=5 * GIB,
                    device_total=80 * GIB,
                )
            )
        for i in range(events):
            session.add(JobEvent(job_id=job.id, kind="started", message=f"message {i}"))
        session.commit()
        return job.id


def parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, JSON data) for each event of an SSE body; comments (pings) are skipped."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if line and not line.startswith(":"))
        if fields:
            events.append((fields["event"], json.loads(fields["data"])))
    return events


def test_stream_of_finished_job_sends_job_logs_events_then_ends(client: TestClient) -> None:
    job_id = add_job(JobStatus.succeeded, logs=2, events=1)

    response = client.get(f"/jobs/{job_id}/stream")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    assert [name for name, _ in events] == ["job", "log", "log", "event"]
    assert [data["step"] for name, data in events if name == "log"] == [10, 20]
    assert events[1][1]["vram"]["device_used_gib"] == 5.0
    assert events[3][1]["message"] == "message 0"
    final_job = [data for name, data in events if name == "job"][-1]
    assert final_job["id"] == job_id
    assert final_job["status"] == "succeeded"
    assert final_job["progress"]["percent"] == 20.0


def test_stream_resumes_after_step_and_event_id(client: TestClient) -> None:
    job_id = add_job(JobStatus.failed, logs=2, events=2)
    everything = parse_sse(client.get(f"/jobs/{job_id}/stream").text)
    first_event_id = next(data["id"] for name, data in everything if name == "event")

    after_step = parse_sse(client.get(f"/jobs/{job_id}/stream", params={"after_step": 10}).text)
    after_event = parse_sse(
        client.get(f"/jobs/{job_id}/stream", params={"after_step": 20, "after_event_id": first_event_id}).text
    )

    assert [name for name, _ in after_step] == ["job", "log", "event", "event"]
    assert after_step[1][1]["step"] == 20
    assert [name for name, _ in after_event] == ["job", "event"]
    assert after_event[1][1]["message"] == "message 1"


def test_stream_follows_a_running_job_until_it_finishes(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = add_job(JobStatus.running, logs=1)
    monkeypatch.setattr(watch, "POLL_INTERVAL_S", 0.02)
    polled = threading.Event()
    read_snapshot = watch._read_snapshot

    def spy(*args: Any) -> Any:
        snapshot = read_snapshot(*args)
        polled.set()
        return snapshot

    monkeypatch.setattr(watch, "_read_snapshot", spy)

    def finish_job() -> None:  # what the trainer and worker do, once the stream has looked
        polled.wait(timeout=10)
        with Session(get_engine()) as session:
            session.add(StepLog(job_id=job_id, step=20, loss=1.5))
            job = session.get(Job, job_id)
            assert job is not None
            job.status, job.step, job.finished_at = JobStatus.succeeded, 20, utcnow()
            session.add(JobEvent(job_id=job_id, kind="succeeded", message="training finished"))
            session.commit()

    writer = threading.Thread(target=finish_job)
    writer.start()
    response = client.get(f"/jobs/{job_id}/stream")
    writer.join()

    events = parse_sse(response.text)
    # Each row once, the record first and last; a row may come just before the record that counts
    # it (the snapshot reads the record first, then what is new).
    assert events[0][0] == "job" and events[1] == ("log", events[1][1])
    assert [data["status"] for name, data in events if name == "job"] == ["running", "succeeded"]
    assert [data["step"] for name, data in events if name == "log"] == [10, 20]
    assert [data["kind"] for name, data in events if name == "event"] == ["succeeded"]


@pytest.mark.parametrize("path", ["stream", "watch"])
def test_unknown_job_is_404_before_anything_streams(client: TestClient, path: str) -> None:
    response = client.get(f"/jobs/999/{path}")

    assert response.status_code == 404
    assert response.json() == {"error": "NotFound", "detail": "job 999 not found"}


def page_assets(page_url: str, html: str) -> list[str]:
    """The URLs a page loads (stylesheets, scripts), resolved against the page's own URL as a browser does."""
    return [
        urljoin(page_url, ref) for ref in re.findall(r'(?:href|src)="([^"]+)"', html) if not ref.startswith("data:")
    ]


def test_watch_page_is_html_that_opens_the_stream(client: TestClient) -> None:
    job_id = add_job(JobStatus.queued)

    response = client.get(f"/jobs/{job_id}/watch")

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "cache-control" not in response.headers and "etag" not in response.headers  # asked again each time
    assert f"<title>Job {job_id}</title>" in response.text
    assert f'data-job-id="{job_id}"' in response.text
    assert "{{" not in response.text
    assets = page_assets(str(response.url), response.text)
    # Relative to the page: served by this app, under a path prefix too, and from no CDN.
    assert assets == ["http://testserver/static/watch/watch.css", "http://testserver/static/watch/watch.js"]
    assert 'href="../../static/watch/watch.css"' in response.text
    script = client.get(assets[1])
    assert script.status_code == 200
    assert "const JOB_ID = Number(document.documentElement.dataset.jobId)," in script.text
    assert 'new EventSource("stream"' in script.text
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg\b)", script.text)  # no CDN: only the SVG namespace
    assert "{{" not in script.text


@pytest.mark.parametrize(
    ("path", "content_type", "holds"),
    [
        ("/static/watch/watch.css", "text/css; charset=utf-8", "#events{"),
        ("/static/watch/watch.js", "text/javascript; charset=utf-8", "function connect()"),
    ],
)
def test_static_assets_are_served_and_cached_until_they_change(
    client: TestClient, path: str, content_type: str, holds: str
) -> None:
    response = client.get(path)

    assert response.status_code == 200
    assert response.headers["content-type"] == content_type
    assert holds in response.text
    assert response.headers["cache-control"] == "no-cache"  # kept, but checked before each use
    etag, last_modified = response.headers["etag"], response.headers["last-modified"]
    for asked in ({"If-None-Match": etag}, {"If-Modified-Since": last_modified}):
        again = client.get(path, headers=asked)
        assert again.status_code == 304, asked
        assert again.content == b""
        assert again.headers["etag"] == etag and again.headers["cache-control"] == "no-cache"
    assert client.get(path, headers={"If-None-Match": '"stale"'}).status_code == 200
    head = client.head(path)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(response.content))


def test_static_assets_need_no_token_when_the_page_does(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = add_job(JobStatus.queued)
    monkeypatch.setenv("API_TOKENS", "s3cret")
    get_settings.cache_clear()

    assert client.get(f"/jobs/{job_id}/watch").status_code == 401
    page = client.get(f"/jobs/{job_id}/watch", headers={"Authorization": "Bearer s3cret"})
    assert page.status_code == 200
    for url in page_assets(str(page.url), page.text):
        assert client.get(url).status_code == 200, url


@pytest.mark.parametrize(
    "path",
    [
        "/static/watch/nosuch.js",
        "/static/watch/",
        "/static/watch",
        "/static/",
        "/static/nosuch/watch.js",
        "/static/watch/watch.js/x",
    ],
)
def test_an_unknown_asset_is_404(client: TestClient, path: str) -> None:
    response = client.get(path)

    assert response.status_code == 404
    assert response.json()["error"] == "NotFound"


def test_static_assets_take_get_and_head_only(client: TestClient) -> None:
    response = client.post("/static/watch/watch.js")

    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD"
    assert response.json() == {
        "error": "MethodNotAllowed",
        "detail": "/static/watch/watch.js does not take POST; it takes GET, HEAD",
    }


def raw_get(path: str) -> tuple[int, bytes]:
    """GET a path exactly as written: an HTTP client would resolve its ../ before sending it."""
    sent: list[Message] = []
    asked: list[bool] = []

    async def receive() -> Message:
        if asked:  # a response listening for the client's disconnect: the client stays
            await asyncio.Event().wait()
        asked.append(True)
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = raw_get_scope(path)
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], b"".join(message.get("body", b"") for message in sent[1:])


# What files next to and above the static folder hold (app/main.py, core/config.py, the page's
# template, pyproject.toml): none may come out of /static.
SECRETS = (b"def create_app", b"class Settings", b"{{JOB_ID}}", b"[project]")


@pytest.mark.parametrize(
    "path",
    [
        "/static/watch/..%2f..%2fmain.py",
        "/static/watch/..%2F..%2Fconfig.py",
        "/static/..%2fmain.py",
        "/static/..%2ftemplates%2fwatch.html",
        "/static/watch/%2e%2e%2f%2e%2e%2fmain.py",
        "/static/watch/..%5c..%5cmain.py",
        "/static/%2fetc%2fpasswd",
        "/static//etc/passwd",
        "/static/watch/..%2f..%2f..%2fpyproject.toml",
        "/static/watch/%00.js",
    ],
)
def test_a_traversal_through_the_client_leaks_nothing(client: TestClient, path: str) -> None:
    response = client.get(path)

    assert response.status_code == 404, (path, response.status_code)
    assert not any(marker in response.content for marker in SECRETS)


@pytest.mark.parametrize(
    "path",
    [
        "/static/watch/../../main.py",
        "/static/../main.py",
        "/static/../templates/watch.html",
        "/static/watch/../../../pyproject.toml",
        "/static/./watch/../../config.py",
        "/static/watch/..\\..\\main.py",
    ],
)
def test_a_raw_traversal_leaks_nothing(client: TestClient, path: str) -> None:
    status, body = raw_get(path)

    assert status == 404, (path, status)
    assert not any(marker in body for marker in SECRETS)
    assert raw_get("/static/watch/./watch.js")[0] == 200  # the same path handling does serve what is there


def test_the_page_and_assets_stay_out_of_the_openapi_document(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]

    assert "/jobs/{job_id}/stream" in paths
    assert "/jobs/{job_id}/watch" not in paths
    assert not [path for path in paths if "static" in path]


def test_stream_and_page_need_the_token_when_tokens_are_configured(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = add_job(JobStatus.succeeded)
    monkeypatch.setenv("API_TOKENS", "s3cret")
    get_settings.cache_clear()

    assert client.get(f"/jobs/{job_id}/stream").status_code == 401
    assert client.get(f"/jobs/{job_id}/watch").status_code == 401
    authorized = client.get(f"/jobs/{job_id}/stream", headers={"Authorization": "Bearer s3cret"})
    assert [name for name, _ in parse_sse(authorized.text)] == ["job"]


def test_many_watchers_of_a_running_job_share_one_read_per_interval(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """50 watchers: they catch up together (one read, as their cursors are the same), then all
    follow one reader that reads the database once per interval, and every watcher gets every
    new row and the finish."""
    job_id = add_job(JobStatus.running, logs=3)
    monkeypatch.setattr(watch, "POLL_INTERVAL_S", 0.05)
    reads: list[float] = []
    read_snapshot = watch._read_snapshot

    def counted(*args: Any) -> Any:
        reads.append(time.monotonic())
        return read_snapshot(*args)

    monkeypatch.setattr(watch, "_read_snapshot", counted)

    def write(step: int, finish: bool = False) -> None:
        with Session(get_engine()) as session:
            session.add(StepLog(job_id=job_id, step=step, loss=1.0))
            if finish:
                job = session.get(Job, job_id)
                assert job is not None
                job.status, job.finished_at = JobStatus.succeeded, utcnow()
            session.commit()

    async def watcher() -> list[tuple[str, Any]]:
        body = b"".join([chunk async for chunk in watch._job_events(job_id, None, None)])
        return [
            (name, data.get("step") if name == "log" else data.get("status")) for name, data in parse_sse(body.decode())
        ]

    async def scenario() -> tuple[list[list[tuple[str, Any]]], int]:
        tasks = [asyncio.create_task(watcher()) for _ in range(50)]
        await asyncio.sleep(0.3)  # all caught up, following the feed
        assert len(reads) < 50  # the catch-ups were shared (and the feed has begun)
        following_from = len(reads)
        started = time.monotonic()
        for step in (40, 50):
            await asyncio.to_thread(write, step)
            await asyncio.sleep(0.2)
        await asyncio.to_thread(write, 60, True)
        results = await asyncio.gather(*tasks)
        intervals = (time.monotonic() - started) / watch.POLL_INTERVAL_S
        feed_reads = len(reads) - following_from
        assert feed_reads <= intervals + 3, (feed_reads, intervals)  # about one a poll, not fifty
        return results, feed_reads

    results, feed_reads = asyncio.run(scenario())
    assert feed_reads >= 3
    for seen in results:
        assert [step for event, step in seen if event == "log"] == [10, 20, 30, 40, 50, 60]
        assert [status for event, status in seen if event == "job"][-1] == "succeeded"
    assert not watch.FEEDS  # the feed stopped with the job


# The page's own script run by node (the charts are drawn in the browser), with a DOM that records
# what it is asked to make.
CHART_HARNESS = """
const vm = require("vm");
function element(tag) {
  return {tag, attrs: {}, children: [], style: {}, dataset: {},
    setAttribute(k, v) { this.attrs[k] = String(v); }, append(...c) { this.children.push(...c); },
    prepend() {}, replaceChildren(...c) { this.children = c; }};
}
const elements = {};
const context = vm.createContext({
  document: {documentElement: {dataset: {jobId: "1"}}, getElementById: (id) => (elements[id] ||= element("div")),
             createElement: element, createElementNS: (ns, tag) => element(tag)},
  requestAnimationFrame: () => {}, setTimeout: () => {}, fetch: async () => ({ok: false}),
  EventSource: class { addEventListener() {} close() {} },
  URLSearchParams, console,
});
vm.runInContext(process.argv[1], context);
const svg = element("svg");
const steps = Array.from({length: 101}, (_, i) => i * 10);
vm.runInContext("chart", context)(svg, [
  {label: "loss", color: "#3b82f6", points: steps.map((s) => [s, 10 * 0.01 ** (s / 1000)])},
  {label: "eval loss", color: "#f59e0b", dots: true, points: [[500, 1], [1000, 0.1]]},
], "log", "no data");
const yAxis = vm.runInContext("yAxis", context);
console.log(JSON.stringify({
  texts: svg.children.filter((c) => c.tag === "text").map((c) => c.textContent),
  lines: svg.children.filter((c) => c.tag === "polyline").slice(1)
    .map((c) => c.attrs.points.split(" ").map((p) => +p.split(",")[1])),
  dots: svg.children.filter((c) => c.tag === "circle").map((c) => +c.attrs.cy),
  linear: yAxis([1, 2, 3], "data").at(2), zeroBased: yAxis([2, 4], "zero").at(2),
  logWithZero: yAxis([0, 1], "log").log, narrow: yAxis([1.2, 1.8], "log").ticks,
}));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node runs the page's script; it is not installed")
def test_the_loss_chart_draws_train_and_eval_loss_on_one_log_axis(client: TestClient) -> None:
    script = client.get("/static/watch/watch.js").text
    ran = subprocess.run(["node", "-e", CHART_HARNESS, script], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    drawn = json.loads(ran.stdout)
    # A loss falling from 10 to 0.1: each tenth takes the same height, labelled at the powers of ten.
    assert [t for t in drawn["texts"] if t in ("10", "1", "0.1", "log scale")] == ["0.1", "1", "10", "log scale"]
    loss, eval_loss = drawn["lines"]
    assert loss[0] - loss[50] == pytest.approx(loss[50] - loss[100], abs=0.2)  # 10 -> 1 -> 0.1
    assert drawn["dots"] == pytest.approx([loss[50], loss[100]], abs=0.2)  # eval loss on the same axis
    assert eval_loss == drawn["dots"]
    # Other charts stay linear, and a loss of 0 or less cannot sit on a log axis: linear then.
    assert (drawn["linear"], drawn["zeroBased"], drawn["logWithZero"]) == (0.5, 0.5, False)
    assert drawn["narrow"] == [1.2, 1.8]  # no 1-2-5 tick inside: the ends are labelled


def test_watch_page_charts_the_figures_of_the_job_s_method(client: TestClient) -> None:
    job_id = add_job(JobStatus.queued)
    page = client.get(f"/jobs/{job_id}/watch").text
    assert 'id="method-chart"' in page and 'id="method-figures"' in page
    script = client.get("/static/watch/watch.js").text
    assert '"rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"' in script  # dpo
    assert '"reward", "reward_std", "kl", "completions/mean_length"' in script  # grpo
    assert "r.method_metrics" in script
