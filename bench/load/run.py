"""The API load benchmark (issue 9): the service's read routes and downloads under wrk (and curl),
its Server-Sent Events under a thousand watchers, each measured back to back against a reference
that does no work of its own.

    bench/load/run [--duration 15] [--api-workers 2] [--uvicorn-args "..."] [--only logs-c20,download]
                   [--database-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres] [--label L]
                   [--pin [--server-cpus 0] [--client-cpus 1]]

It builds (or reuses) the data with generate.py, then starts, each on a free port of 127.0.0.1:
redis-server; the API as scripts/run starts it (`uvicorn app.main:app --host --port --loop
asyncio` plus --uvicorn-args); writer.py, which logs 5 steps a second to the running job through the trainer's
code; the reference app (reference_app.py, the same uvicorn options) serving the API's own
responses, fetched and stored before the load; and nginx (sendfile on) serving the checkpoint
file. Each scenario runs wrk (or curl, or sse_watchers.py) on the API, then the same on its
reference. The report (JSON) holds the machine's facts and, per scenario, both results and
ours/reference ratios; markdown tables are printed last. Everything started is stopped, also on
failure or Ctrl-C.

With --database-url, the API and the writer use a fresh PostgreSQL database created for the run
on that server (the URL names the database to connect to for CREATE and DROP DATABASE), migrated
with `alembic upgrade head` and dropped at the end; the checkpoint file stays under --data-dir.

With --pin, every server the runner starts (redis-server, the writer, the API's uvicorn, the
reference app's uvicorn, nginx) runs under `taskset -c <--server-cpus>` (default 0) and every
client (wrk, curl, sse_watchers.py, the background download loops) under `taskset -c
<--client-cpus>` (default 1); the runner itself, whose own requests (the settle check, the lone
poller while watchers catch up) are a client's, moves to the client CPUs once the data is ready.
On a 2-core machine client and server otherwise fight for the same cores, and the scheduler's
fairness, not the server, decides the latency tail. With --api-workers 2 both API workers (and
both of the reference's) share the server CPUs: the workers compete with nginx, redis and the
writer there, not with the clients. A PostgreSQL server named by --database-url is not started
by the runner and is not pinned. The report's machine.pinning and checks.cpu_affinity (read back
from each started process and its children) say what ran where; the printed tables' heading
says it too. --server-cpus or --client-cpus alone imply --pin."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import generate  # noqa: E402

from scripts.service_harness import free_port, redis_server_command  # noqa: E402

MIB = 1024**2
WRK_TIMEOUT = "10s"
RANGE_BYTES = 100 * MIB
BACKGROUND_DOWNLOADS = 8
POLLER_DOWNLOADS = 16  # curl downloads looping in the background of pollers-under-downloads
SSE_MIN_SECONDS = 20  # the watchers stay at least this long, whatever --duration says
CURL_MAX_TIME_S = 300
# The API's line when a job's shared stream reader stops (app.routes.watch.JobFeed).
FEED_LINE = re.compile(r"stream of job (\d+): (\d+) database reads in (\d+) s for up to (\d+) watchers")
FILE_URL_PATH = (
    f"/jobs/{generate.CHECKPOINT_JOB}/checkpoints/{generate.CHECKPOINT_NAME}/files/{generate.CHECKPOINT_FILE}"
)
# The responses the reference app serves: path as wrk asks for it -> stored body's file name.
REFERENCE_BODIES = {
    f"/jobs/{generate.RUNNING_JOB}": "job-running.json",
    "/jobs/5": "job-finished.json",
    "/jobs?limit=50": "jobs-limit-50.json",
    "/jobs/9000/logs?limit=1000": "logs-9000.json",
    "/jobs/9000/events": "events-9000.json",
}


def parse_cpu_list(text: str) -> set[int]:
    """A taskset CPU list ("0", "0-3", "0,2-3") as a set of CPU numbers; ValueError when malformed."""
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        first, last = int(low), int(high or low)
        if first > last:
            raise ValueError(f"{part!r}: the range goes down")
        cpus.update(range(first, last + 1))
    return cpus


def cpu_list_text(cpus: set[int]) -> str:
    """The inverse of parse_cpu_list, runs collapsed: {0, 1, 2, 5} -> "0-2,5"."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and runs[-1][1] == cpu - 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(first) if first == last else f"{first}-{last}" for first, last in runs)


class Pinning:
    """--pin: the taskset prefix of the servers' and of the clients' command lines (none when not
    pinned). One instance, PIN, configured by main() before anything starts."""

    SERVERS = ("redis-server", "writer.py", "the API's uvicorn", "the reference app's uvicorn", "nginx")
    CLIENTS = (
        "wrk",
        "curl",
        "sse_watchers.py",
        "the background download loops (bash + curl)",
        "this runner (its settle check and lone poller)",
    )

    def __init__(self) -> None:
        self.server_cpus = self.client_cpus = ""

    @property
    def pinned(self) -> bool:
        return bool(self.server_cpus)

    def configure(self, server_cpus: str, client_cpus: str) -> None:
        self.server_cpus, self.client_cpus = server_cpus, client_cpus

    def server(self, argv: list[str]) -> list[str]:
        return ["taskset", "-c", self.server_cpus, *argv] if self.pinned else argv

    def client(self, argv: list[str]) -> list[str]:
        return ["taskset", "-c", self.client_cpus, *argv] if self.pinned else argv

    def pin_this_runner(self) -> None:
        if self.pinned:
            os.sched_setaffinity(0, parse_cpu_list(self.client_cpus))

    def heading(self, api_workers: int, postgres: bool) -> str:
        """The printed tables' line on where the processes ran."""
        if not self.pinned:
            return (
                f"not pinned: servers and clients share the machine's {os.cpu_count()} CPUs "
                "(the scheduler decides who runs)"
            )
        parts = [
            f"pinned (taskset): servers ({', '.join(self.SERVERS)}) on CPU {self.server_cpus}",
            f"clients ({', '.join(self.CLIENTS)}) on CPU {self.client_cpus}",
        ]
        if api_workers > 1:
            parts.append(f"the API's {api_workers} workers (and the reference's) share CPU {self.server_cpus}")
        if postgres:
            parts.append("the PostgreSQL server is not pinned (the runner does not start it)")
        return "; ".join(parts)

    def facts(self, api_workers: int, database_url: str) -> dict[str, Any]:
        if not self.pinned:
            return {"pinned": False, "note": "servers and clients share all the machine's CPUs"}
        facts: dict[str, Any] = {
            "pinned": True,
            "tool": "taskset -c",
            "server_cpus": self.server_cpus,
            "client_cpus": self.client_cpus,
            "servers": list(self.SERVERS),
            "clients": list(self.CLIENTS),
            "api_workers_share_server_cpus": api_workers > 1,
        }
        if database_url:
            facts["postgresql_server"] = "not pinned: not started by the runner, it runs wherever the scheduler puts it"
        return facts


PIN = Pinning()


def affinity_of_tree(pid: int) -> dict[str, Any]:
    """The CPUs each process of pid's tree (pid and its descendants) may run on, as taskset lists."""
    pids, seen = [pid], []
    while pids:
        current = pids.pop()
        seen.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                pids += [int(child) for child in (task / "children").read_text().split()]
    lists: dict[str, int] = {}
    for current in seen:
        with contextlib.suppress(OSError):
            text = cpu_list_text(os.sched_getaffinity(current))
            lists[text] = lists.get(text, 0) + 1
    return {"processes": sum(lists.values()), "cpus": lists}


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    connections: int
    # json: the reference app answers the same path; download: nginx serves the same file (wrk);
    # curl: the same as download, `runs` curl downloads each, medians compared;
    # healthz: ours while BACKGROUND_DOWNLOADS downloads run, the reference is ours without them;
    # pollers: wrk while POLLER_DOWNLOADS curl downloads loop, the reference is the same wrk without;
    # sse: `connections` watchers of the path (sse_watchers.py), the reference is one watcher.
    kind: str
    description: str
    range_last: int = 0  # with Range: bytes=<the last range_last bytes>
    runs: int = 0  # curl: downloads from each server

    @property
    def threads(self) -> int:
        return min(2, self.connections)

    @property
    def unit(self) -> str:
        return {"download": "MiB/s wrk", "curl": "MiB/s curl", "sse": "logs/watcher"}.get(self.kind, "req/s")


SCENARIOS = [
    Scenario(
        "job-running-c100",
        f"/jobs/{generate.RUNNING_JOB}",
        100,
        "json",
        "GET the running job's record (the writer updates it 5 times a second), 100 connections",
    ),
    Scenario(
        "job-running-c1000",
        f"/jobs/{generate.RUNNING_JOB}",
        1000,
        "json",
        "GET the running job's record, 1,000 connections",
    ),
    Scenario("job-finished-c100", "/jobs/5", 100, "json", "GET a finished job's record, 100 connections"),
    Scenario("jobs-list-c20", "/jobs?limit=50", 20, "json", "GET /jobs?limit=50 (newest first), 20 connections"),
    Scenario(
        "logs-c20", "/jobs/9000/logs?limit=1000", 20, "json", "GET 1,000 step logs of a job with 10,000, 20 connections"
    ),
    Scenario("events-c20", "/jobs/9000/events", 20, "json", "GET a job's events, 20 connections"),
    Scenario(
        "sse-watchers-c1000",
        f"/jobs/{generate.RUNNING_JOB}/stream",
        1000,
        "sse",
        f"1,000 watchers of the running job's Server-Sent Events for --duration s (at least {SSE_MIN_SECONDS}), "
        "with wrk polling its record at 100 connections meanwhile; reference: 1 watcher, and the same wrk "
        "without watchers",
    ),
    Scenario(
        "download",
        FILE_URL_PATH,
        1,
        "download",
        "download the 2 GiB checkpoint file over and over with wrk, 1 connection; reference: nginx",
    ),
    Scenario(
        "download-range",
        FILE_URL_PATH,
        1,
        "download",
        "download its last 100 MiB with Range with wrk, 1 connection; reference: nginx",
        range_last=RANGE_BYTES,
    ),
    Scenario(
        "download-curl",
        FILE_URL_PATH,
        1,
        "curl",
        "download the 2 GiB file with curl, median of 5; reference: nginx",
        runs=5,
    ),
    Scenario(
        "download-range-curl",
        FILE_URL_PATH,
        1,
        "curl",
        "download its last 100 MiB with Range with curl, median of 21; reference: nginx",
        range_last=RANGE_BYTES,
        runs=21,
    ),
    Scenario(
        "healthz-under-downloads",
        "/healthz",
        1,
        "healthz",
        f"GET /healthz, 1 connection, while {BACKGROUND_DOWNLOADS} downloads of the file run; "
        "reference: the same API with no downloads",
    ),
    Scenario(
        "pollers-under-downloads",
        f"/jobs/{generate.RUNNING_JOB}",
        100,
        "pollers",
        f"GET the running job's record, 100 connections, while {POLLER_DOWNLOADS} curl downloads of the file "
        "loop; reference: the same API with no downloads",
    ),
]


# ---- processes ------------------------------------------------------------------------------


class Processes:
    """The processes this run started (the servers: under PIN.server), each in its own process
    group, stopped in reverse order."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], *, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.log_dir / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                PIN.server(argv),
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.started.append((name, process))
        return process

    def check_alive(self) -> None:
        for name, process in self.started:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with code {process.returncode}; see {self.log_dir}/{name}.log")

    def stop_all(self) -> None:
        for name, process in reversed(self.started):
            if process.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                print(f"{name} ignored SIGTERM for 15 s: killing it", flush=True)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.started.clear()


def http_get(url: str, *, headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until(what: str, ready: Callable[[], bool], processes: Processes, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        processes.check_alive()
        with contextlib.suppress(OSError):
            if ready():
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s; logs in {processes.log_dir}")


def answers(url: str, status: int, headers: dict[str, str] | None = None) -> bool:
    return http_get(url, headers=headers, timeout=5)[0] == status


def nginx_conf(run_dir: Path, port: int, file_path: Path) -> str:
    return f"""daemon off;
worker_processes auto;
pid {run_dir}/nginx.pid;
error_log {run_dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path {run_dir}/nginx-client-body;
    proxy_temp_path {run_dir}/nginx-proxy;
    fastcgi_temp_path {run_dir}/nginx-fastcgi;
    uwsgi_temp_path {run_dir}/nginx-uwsgi;
    scgi_temp_path {run_dir}/nginx-scgi;
    server {{
        listen 127.0.0.1:{port};
        location = {FILE_URL_PATH} {{ alias {file_path}; }}
    }}
}}
"""


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found is None:
        raise SystemExit("nginx is not installed: run bench/load/run, which installs it")
    return found


# ---- PostgreSQL -----------------------------------------------------------------------------


def create_database(server_url: str) -> str:
    """A fresh database on the server of server_url; returns its SQLAlchemy URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(server_url)
    name = f"finetune_load_{os.getpid()}_{int(time.time())}"
    with psycopg.connect(generate.postgres_conninfo(server_url), autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return url.set(database=name).render_as_string(hide_password=False)


def drop_database(server_url: str, database_url: str) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    name = make_url(database_url).database
    with psycopg.connect(generate.postgres_conninfo(server_url), autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ---- wrk ------------------------------------------------------------------------------------

TIME_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
BINARY = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
NUMBER_TIME = r"([\d.]+)(us|ms|s|m|h)"
NUMBER_BYTES = r"([\d.]+)(B|KB|MB|GB|TB)"


def parse_wrk(text: str) -> dict[str, Any]:
    """wrk 4's report (with --latency) as numbers: requests/s, bytes/s, latency in ms (avg, max,
    and the p50/p75/p90/p99 of the distribution), socket errors and non-2xx/3xx responses.
    wrk leaves requests slower than --timeout out of the latency figures: they are timeouts."""
    result: dict[str, Any] = {"errors": {"connect": 0, "read": 0, "write": 0, "timeout": 0}, "non_2xx_3xx": 0}
    latency: dict[str, float | None] = {}
    if match := re.search(rf"^\s+Latency\s+{NUMBER_TIME}\s+{NUMBER_TIME}\s+{NUMBER_TIME}", text, re.M):
        latency["avg"] = float(match[1]) * TIME_MS[match[2]]
        latency["max"] = float(match[5]) * TIME_MS[match[6]]
    for match in re.finditer(rf"^\s+(\d+)%\s+{NUMBER_TIME}\s*$", text, re.M):
        latency[f"p{match[1]}"] = float(match[2]) * TIME_MS[match[3]]
    if match := re.search(rf"(\d+) requests in {NUMBER_TIME}, {NUMBER_BYTES} read", text):
        result["requests"] = int(match[1])
        result["duration_s"] = float(match[2]) * TIME_MS[match[3]] / 1000
        result["bytes_read"] = int(float(match[4]) * BINARY[match[5]])
    if match := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text):
        result["errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, match.groups()), strict=True))
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", text):
        result["non_2xx_3xx"] = int(match[1])
    if match := re.search(r"Requests/sec:\s+([\d.]+)", text):
        result["requests_per_s"] = float(match[1])
    if match := re.search(rf"Transfer/sec:\s+{NUMBER_BYTES}", text):
        result["bytes_per_s"] = float(match[1]) * BINARY[match[2]]
        result["mib_per_s"] = round(result["bytes_per_s"] / MIB, 2)
    if not result.get("requests"):  # no request finished: the distribution is all zeros
        latency = {key: None for key in latency}
    result["latency_ms"] = {key: None if value is None else round(value, 3) for key, value in latency.items()}
    return result


def wrk_argv(url: str, *, connections: int, threads: int, duration: float, headers: list[str]) -> list[str]:
    argv = [
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{duration:g}s",
        "--latency",
        "--timeout",
        WRK_TIMEOUT,
    ]
    for header in headers:
        argv += ["-H", header]
    return PIN.client([*argv, url])


def run_wrk(url: str, *, connections: int, threads: int, duration: float, headers: list[str]) -> dict[str, Any]:
    argv = wrk_argv(url, connections=connections, threads=threads, duration=duration, headers=headers)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    result = parse_wrk(done.stdout)
    result.update(command=shlex.join(argv), output=done.stdout + done.stderr)
    if done.returncode != 0 or "requests" not in result:
        result["failed"] = f"wrk exited with code {done.returncode}: {done.stderr.strip()[-500:]}"
    return result


# ---- the run --------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, run_dir: Path, processes: Processes) -> None:
        self.args = args
        self.run_dir = run_dir
        self.processes = processes
        self.uvicorn_args = uvicorn_options(args)
        self.data: dict[str, Any] = {}
        self.api = self.reference = self.nginx = ""
        self.writer_stats = run_dir / "writer-stats.json"
        self.checks: dict[str, Any] = {}
        self.entries: dict[str, Any] = {}  # the scenarios measured so far in this run

    def environment(self, database_url: str, redis_port: int) -> dict[str, str]:
        data_dir = self.data["data_dir"]
        return {
            **os.environ,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "DATA_DIR": data_dir,
            "DATABASE_URL": database_url,
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "ALLOWED_LOCAL_ROOTS": f"{data_dir}/models,{data_dir}/datasets",
        }

    def start(self, database_url: str) -> None:
        redis_port, api_port, reference_port, nginx_port = (free_port() for _ in range(4))
        env = self.environment(database_url, redis_port)
        self.processes.start(
            "redis",
            redis_server_command(redis_port, self.run_dir),
        )
        wait_until("redis", lambda: _redis_ping(redis_port), self.processes, 20)

        # The writer heartbeats the running job before the API's first reconcile pass looks at it.
        ready = self.run_dir / "writer-ready"
        self.processes.start(
            "writer",
            [
                str(VENV_BIN / "python"),
                str(HERE / "writer.py"),
                "--job-id",
                str(generate.RUNNING_JOB),
                "--rate",
                str(self.args.writer_rate),
                "--ready-file",
                str(ready),
                "--stats",
                str(self.writer_stats),
            ],
            env=env,
        )
        wait_until("writer", ready.exists, self.processes, 120)

        self.api = f"http://127.0.0.1:{api_port}"
        self.processes.start(
            "api",
            [
                str(VENV_BIN / "uvicorn"),
                "app.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(api_port),
                *self.uvicorn_args,
            ],
            env=env,
        )
        wait_until("the API", lambda: answers(f"{self.api}/healthz", 200), self.processes, 90)

        bodies = self.store_reference_bodies()
        self.reference = f"http://127.0.0.1:{reference_port}"
        self.processes.start(
            "reference",
            [
                str(VENV_BIN / "uvicorn"),
                "bench.load.reference_app:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(reference_port),
                *self.uvicorn_args,
            ],
            env={**env, "LOAD_REFERENCE_BODIES": str(bodies)},
        )
        wait_until("the reference app", lambda: answers(f"{self.reference}/jobs/5", 200), self.processes, 90)

        self.nginx = f"http://127.0.0.1:{nginx_port}"
        conf = self.run_dir / "nginx.conf"
        conf.write_text(nginx_conf(self.run_dir, nginx_port, Path(self.data["file"])))
        self.processes.start(
            "nginx",
            [nginx_binary(), "-p", str(self.run_dir), "-c", str(conf), "-e", str(self.run_dir / "nginx-error.log")],
        )
        wait_until(
            "nginx", lambda: answers(f"{self.nginx}{FILE_URL_PATH}", 206, {"Range": "bytes=0-0"}), self.processes, 20
        )
        self.checks["cpu_affinity"] = {name: affinity_of_tree(process.pid) for name, process in self.processes.started}
        self.checks["cpu_affinity"]["runner"] = {"processes": 1, "cpus": {cpu_list_text(os.sched_getaffinity(0)): 1}}
        self.check_downloads()

    def store_reference_bodies(self) -> Path:
        """The API's own answers, stored for the reference app to serve byte for byte."""
        folder = self.run_dir / "bodies"
        folder.mkdir()
        manifest, sizes = {}, {}
        for path, name in REFERENCE_BODIES.items():
            status, body = http_get(f"{self.api}{path}")
            if status != 200:
                raise RuntimeError(f"GET {path} answered {status}: {body[:300]!r}")
            (folder / name).write_bytes(body)
            manifest[path.split("?", 1)[0]] = name
            sizes[path] = len(body)
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
        self.checks["reference_body_bytes"] = sizes
        return folder

    def check_downloads(self) -> None:
        """The API serves the file whole with the recorded sha256, and the same last 100 MiB as nginx."""
        started, digest, size = time.monotonic(), hashlib.sha256(), 0
        with urllib.request.urlopen(f"{self.api}{FILE_URL_PATH}", timeout=120) as response:
            while chunk := response.read(16 * MIB):
                digest.update(chunk)
                size += len(chunk)
        seconds = time.monotonic() - started
        if size != generate.FILE_SIZE or digest.hexdigest() != self.data["file_sha256"]:
            raise RuntimeError(
                f"the API's download has {size} bytes, sha256 {digest.hexdigest()}; "
                f"expected {generate.FILE_SIZE}, {self.data['file_sha256']}"
            )
        ranges = {}
        for name, base in (("api", self.api), ("nginx", self.nginx)):
            status, body = http_get(f"{base}{FILE_URL_PATH}", headers={"Range": range_header(RANGE_BYTES)})
            ranges[name] = (status, len(body), hashlib.sha256(body).hexdigest())
        if ranges["api"] != ranges["nginx"] or ranges["api"][:2] != (206, RANGE_BYTES):
            raise RuntimeError(f"the Range download differs: {ranges}")
        self.checks["download_sha256_ok"] = True
        self.checks["first_download_s"] = round(seconds, 2)
        self.checks["range_same_as_nginx"] = True

    def settle(self) -> float:
        """Wait (up to a minute) until the API answers /healthz within 0.25 s, so a backlog left by
        one measurement (requests still queued when wrk stopped) does not slow the next. Returns
        the seconds waited."""
        started = time.monotonic()
        while time.monotonic() - started < 60:
            self.processes.check_alive()
            asked = time.monotonic()
            with contextlib.suppress(OSError):
                http_get(f"{self.api}/healthz", timeout=5)
                if time.monotonic() - asked < 0.25:
                    break
            time.sleep(0.5)
        return round(time.monotonic() - started, 2)

    def measure(self, base: str, scenario: Scenario) -> dict[str, Any]:
        settled = self.settle()
        headers = [f"Range: {range_header(scenario.range_last)}"] if scenario.range_last else []
        result = run_wrk(
            f"{base}{scenario.path}",
            connections=scenario.connections,
            threads=scenario.threads,
            duration=self.args.duration,
            headers=headers,
        )
        result["settle_s"] = settled
        time.sleep(1)
        return result

    def scenario(self, scenario: Scenario) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "description": scenario.description,
            "path": scenario.path,
            "connections": scenario.connections,
            "threads": scenario.threads,
            "unit": scenario.unit,
        }
        if scenario.range_last:
            entry["range"] = range_header(scenario.range_last)
        if scenario.kind == "healthz":
            entry["ours"], entry["downloads_during"] = self.under_downloads(scenario)
            entry["reference"] = {"target": "the API with no downloads running", **self.measure(self.api, scenario)}
        elif scenario.kind == "pollers":
            entry["ours"], entry["downloads_during"] = self.pollers_under_downloads(scenario)
            entry["reference"] = {"target": "the API with no downloads running", **self.measure(self.api, scenario)}
        elif scenario.kind == "curl":
            entry["ours"], entry["reference"] = self.curl_downloads(scenario)
        elif scenario.kind == "sse":
            entry.update(self.sse_watchers(scenario))
        else:
            entry["ours"] = {"target": "the API", **self.measure(self.api, scenario)}
            reference = self.nginx if scenario.kind == "download" else self.reference
            target = (
                "nginx (sendfile on), same file"
                if scenario.kind == "download"
                else "reference_app.py, same bytes, same uvicorn options"
            )
            entry["reference"] = {"target": target, **self.measure(reference, scenario)}
        entry["ratio"] = ratios(entry["ours"], entry["reference"], scenario.unit)
        self.entries[scenario.name] = entry
        return entry

    def under_downloads(self, scenario: Scenario) -> tuple[dict[str, Any], dict[str, Any]]:
        settled = self.settle()
        argv = wrk_argv(
            f"{self.api}{FILE_URL_PATH}",
            connections=BACKGROUND_DOWNLOADS,
            threads=1,
            duration=self.args.duration + 3,
            headers=[],
        )
        downloads = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            time.sleep(2)
            ours = run_wrk(
                f"{self.api}{scenario.path}",
                connections=scenario.connections,
                threads=scenario.threads,
                duration=self.args.duration,
                headers=[],
            )
            output, _ = downloads.communicate(timeout=self.args.duration + 60)
        finally:
            if downloads.poll() is None:
                downloads.kill()
                downloads.wait()
        ours.update(target=f"the API, {BACKGROUND_DOWNLOADS} downloads running", settle_s=settled)
        background = parse_wrk(output)
        background.update(command=shlex.join(argv), output=output)
        time.sleep(1)
        return ours, background

    # -- curl downloads --

    def curl_downloads(self, scenario: Scenario) -> tuple[dict[str, Any], dict[str, Any]]:
        """scenario.runs curl downloads from the API and from nginx, taken in turns (so a drift in
        the machine's speed touches both); each side's median MiB/s and time."""
        settled = self.settle()
        runs: dict[str, list[dict[str, Any]]] = {"api": [], "nginx": []}
        for _ in range(scenario.runs):
            for name, base in (("api", self.api), ("nginx", self.nginx)):
                runs[name].append(curl_download(f"{base}{scenario.path}", scenario.range_last))
        targets = {"api": "the API", "nginx": "nginx (sendfile on), same file"}
        ours, reference = (
            curl_summary(runs[name], scenario.range_last, f"{base}{scenario.path}")
            for name, base in (("api", self.api), ("nginx", self.nginx))
        )
        ours.update(target=targets["api"], settle_s=settled)
        reference.update(target=targets["nginx"])
        return ours, reference

    # -- pollers while curl downloads loop --

    def pollers_under_downloads(self, scenario: Scenario) -> tuple[dict[str, Any], dict[str, Any]]:
        settled = self.settle()
        seconds = self.args.duration + 4
        loops = start_download_loops(f"{self.api}{FILE_URL_PATH}", POLLER_DOWNLOADS, seconds)
        try:
            time.sleep(2)
            ours = run_wrk(
                f"{self.api}{scenario.path}",
                connections=scenario.connections,
                threads=scenario.threads,
                duration=self.args.duration,
                headers=[],
            )
            output, _ = loops.communicate(timeout=seconds + CURL_MAX_TIME_S)
        finally:
            if loops.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(loops.pid, signal.SIGKILL)
                loops.wait()
        ours.update(target=f"the API, {POLLER_DOWNLOADS} curl downloads looping", settle_s=settled)
        time.sleep(1)
        return ours, download_loops_summary(output, POLLER_DOWNLOADS, seconds)

    # -- Server-Sent Events watchers --

    def sse_watchers(self, scenario: Scenario) -> dict[str, Any]:
        """scenario.connections watchers for max(--duration, SSE_MIN_SECONDS) s with wrk polling the
        job's record at 100 connections meanwhile; then 1 watcher as long; then that wrk without
        watchers (job-running-c100's figures when this run measured them the same way)."""
        hold = max(self.args.duration, SSE_MIN_SECONDS)
        poll_seconds = min(self.args.duration, hold - 3)
        poller = next(s for s in SCENARIOS if s.name == "job-running-c100")
        settled = self.settle()
        ours, during = self.watch(scenario.connections, hold, poller, poll_seconds)
        ours.update(settle_s=settled)
        reference, _ = self.watch(1, hold, None, 0)
        reference.update(settle_s=self.settle())
        argv = wrk_argv(
            f"{self.api}{poller.path}",
            connections=poller.connections,
            threads=poller.threads,
            duration=poll_seconds,
            headers=[],
        )
        measured = self.entries.get(poller.name, {}).get("ours", {})
        if measured.get("command") == shlex.join(argv):
            without = {**measured, "target": f"the API, no watchers: {poller.name}'s figures from this run"}
        else:
            settled = self.settle()
            without = {
                **run_wrk(
                    f"{self.api}{poller.path}",
                    connections=poller.connections,
                    threads=poller.threads,
                    duration=poll_seconds,
                    headers=[],
                ),
                "target": "the API, no watchers",
                "settle_s": settled,
            }
        pollers = {
            "path": poller.path,
            "connections": poller.connections,
            "during": during,
            "without": without,
            "ratio": ratios(during, without, "req/s")
            if during is not None
            else {"throughput": None, "p50": None, "p99": None},
        }
        return {"watch_seconds": hold, "ours": ours, "reference": reference, "pollers": pollers}

    def watch(
        self, watchers: int, hold: float, poller: Scenario | None, poll_seconds: float
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Run sse_watchers.py (a lone poller while the API catches the watchers up, then, once every
        watcher has had its first event, wrk with poller); then read the API's log for the line
        each shared reader writes when its last watcher has gone."""
        api_log = self.run_dir / "api.log"
        offset = api_log.stat().st_size
        ready, out = self.run_dir / f"sse-{watchers}-ready.json", self.run_dir / f"sse-{watchers}.json"
        for leftover in (ready, out):
            leftover.unlink(missing_ok=True)
        argv = PIN.client(
            [
                ".venv/bin/python",
                "bench/load/sse_watchers.py",
                "--url",
                self.api,  # from ROOT
                "--job-id",
                str(generate.RUNNING_JOB),
                "--watchers",
                str(watchers),
                "--duration",
                f"{hold:g}",
                "--ready-file",
                str(ready),
                "--out",
                str(out),
            ]
        )
        with open(self.run_dir / f"sse-{watchers}.log", "ab") as log:
            client = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        started = time.monotonic()
        during = None
        try:
            # One poller meanwhile, a request at a time: how long the record takes while the API
            # catches the watchers up.
            probes: list[dict[str, Any]] = []
            deadline = time.monotonic() + 180
            while not ready.exists() and client.poll() is None and time.monotonic() < deadline:
                asked = time.monotonic()
                try:
                    status = http_get(f"{self.api}/jobs/{generate.RUNNING_JOB}", timeout=30)[0]
                except OSError as exc:
                    status = type(exc).__name__
                probes.append(
                    {
                        "at_s": round(asked - started, 2),
                        "status": status,
                        "ms": round(1000 * (time.monotonic() - asked), 1),
                    }
                )
                time.sleep(0.25)
            if poller is not None and ready.exists():
                during = run_wrk(
                    f"{self.api}{poller.path}",
                    connections=poller.connections,
                    threads=poller.threads,
                    duration=poll_seconds,
                    headers=[],
                )
                during["target"] = f"the API, {watchers} watchers connected"
            client.wait(timeout=hold + 120)
        finally:
            if client.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(client.pid, signal.SIGKILL)
                client.wait()
        if client.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"sse_watchers.py exited with code {client.returncode}; see {self.run_dir}/sse-{watchers}.log"
            )
        result: dict[str, Any] = {
            "target": f"the API, {watchers} watcher{'s' if watchers > 1 else ''}",
            "command": shlex.join(argv),
            **json.loads(out.read_text()),
        }
        times = sorted(probe["ms"] for probe in probes)
        result["poller_while_catching_up"] = {
            "path": f"/jobs/{generate.RUNNING_JOB}",
            "requests": len(probes),
            "p50_ms": times[len(times) // 2] if times else None,
            "max_ms": times[-1] if times else None,
            "not_200": sum(1 for probe in probes if probe["status"] != 200),
            "requests_made": probes,
        }
        gone = time.monotonic()
        feeds: list[dict[str, Any]] = []
        time.sleep(2)  # the readers stop once their last watcher is gone: give them the time to say so
        while time.monotonic() - gone < 15:
            feeds = feed_lines(api_log.read_bytes()[offset:].decode(errors="replace"))
            if sum(feed["watchers"] for feed in feeds) >= result["connected"]:
                break
            time.sleep(0.5)
        result["feeds"] = feeds
        result["feed_reads_per_s"] = round(sum(feed["reads_per_s"] for feed in feeds), 2) if feeds else None
        # As the table reads them: the steady state's median logs per watcher and delivery delay.
        result["log_events_median"] = result["log_events_per_watcher_steady"]["median"]
        result["latency_ms"] = {"p50": result["delay_ms_steady"]["p50"], "p99": result["delay_ms_steady"]["p99"]}
        result["errors"] = {"connect": result["connection_errors"], "ended early": result["ended_early"]}
        result["non_2xx_3xx"] = 0  # an HTTP error is a connection error (errors_by_kind names its status)
        time.sleep(1)
        return result, during


def _redis_ping(port: int) -> bool:
    import redis

    return bool(redis.Redis(port=port, socket_timeout=1).ping())


def range_header(last: int) -> str:
    return f"bytes={generate.FILE_SIZE - last}-{generate.FILE_SIZE - 1}"


# What scripts/run gives uvicorn besides --host and --port (the last of an option given twice wins,
# so --uvicorn-args "--loop uvloop" measures the other loop).
SERVICE_UVICORN_OPTIONS = ["--loop", "asyncio"]


def uvicorn_options(args: argparse.Namespace) -> list[str]:
    """The uvicorn options of the API and the reference app: scripts/run's, --uvicorn-args, then
    --api-workers."""
    return [
        *SERVICE_UVICORN_OPTIONS,
        *shlex.split(args.uvicorn_args),
        *(["--workers", str(args.api_workers)] if args.api_workers else []),
    ]


# ---- curl -----------------------------------------------------------------------------------

CURL_FORMAT = "%{http_code} %{size_download} %{speed_download} %{time_total} %{exitcode}"


def curl_argv(url: str, range_last: int) -> list[str]:
    argv = ["curl", "-s", "-o", "/dev/null", "--max-time", str(CURL_MAX_TIME_S), "-w", CURL_FORMAT]
    if range_last:
        argv += ["-r", range_header(range_last).removeprefix("bytes=")]
    return PIN.client([*argv, url])


def curl_download(url: str, range_last: int) -> dict[str, Any]:
    """One curl download to /dev/null: status, bytes, curl's own average speed and total time."""
    done = subprocess.run(curl_argv(url, range_last), capture_output=True, text=True, timeout=CURL_MAX_TIME_S + 30)
    try:
        status, size, speed, seconds, exit_code = done.stdout.split()
        run = {
            "status": int(status),
            "bytes": int(size),
            "mib_per_s": round(float(speed) / MIB, 1),
            "seconds": round(float(seconds), 3),
            "exit_code": int(exit_code),
        }
    except ValueError:
        return {"ok": False, "exit_code": done.returncode, "output": (done.stdout + done.stderr)[-300:]}
    expected = (206, range_last) if range_last else (200, generate.FILE_SIZE)
    run["ok"] = done.returncode == 0 and (run["status"], run["bytes"]) == expected
    return run


def curl_summary(runs: list[dict[str, Any]], range_last: int, url: str) -> dict[str, Any]:
    """Runs as one result: the median MiB/s (curl's speed_download) and download time of those that
    worked; "p50" is that median time, there is no p99 of a handful of runs."""
    ok = [run for run in runs if run["ok"]]
    speeds = [run["mib_per_s"] for run in ok]
    times = [1000 * run["seconds"] for run in ok]
    return {
        "command": shlex.join(curl_argv(url, range_last)),
        "runs": runs,
        "downloads": len(runs),
        "mib_per_s": round(statistics.median(speeds), 1) if speeds else None,
        "mib_per_s_min_max": [min(speeds), max(speeds)] if speeds else None,
        "latency_ms": {
            "p50": round(statistics.median(times), 1) if times else None,
            "min": round(min(times), 1) if times else None,
            "max": round(max(times), 1) if times else None,
        },
        "errors": {"bad downloads": len(runs) - len(ok)},
        "non_2xx_3xx": sum(1 for run in runs if run.get("status", 0) >= 400 or run.get("status") == 0),
    }


def start_download_loops(url: str, count: int, seconds: float) -> subprocess.Popen[str]:
    """count curl downloads of url, each started again as soon as it ends, for `seconds` (the
    last cut by --max-time); one line per download: status, bytes, curl's exit code."""
    script = (
        'end=$((SECONDS + $1)); for _ in $(seq "$2"); do (while [ "$SECONDS" -lt "$end" ]; do '
        'curl -s -o /dev/null --max-time "$((end - SECONDS))" -w "%{http_code} %{size_download} %{exitcode}\\n" '
        '"$0"; done) & done; wait'
    )
    return subprocess.Popen(
        PIN.client(["bash", "-c", script, url, f"{seconds:.0f}", str(count)]),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def download_loops_summary(output: str, count: int, seconds: float) -> dict[str, Any]:
    complete = cut = 0
    total = 0
    bad: list[str] = []
    for line in output.splitlines():
        fields = line.split()
        if len(fields) != 3 or not all(field.isdigit() for field in fields):
            bad.append(line[:200])
            continue
        status, size, exit_code = map(int, fields)
        total += size
        if status == 200 and exit_code == 0 and size == generate.FILE_SIZE:
            complete += 1
        elif status == 200 and exit_code == 28:  # --max-time: the loop's end
            cut += 1
        else:
            bad.append(line)
    return {
        "downloads": count,
        "seconds": seconds,
        "completed": complete,
        "cut_at_the_end": cut,
        "bad": len(bad),
        "bad_examples": bad[:5],
        "mib": round(total / MIB, 1),
        "mib_per_s_all": round(total / MIB / seconds, 1),
    }


def feed_lines(text: str) -> list[dict[str, Any]]:
    """The API's `stream of job N: R database reads in T s for up to W watchers` lines of the running job."""
    lines = []
    for match in FEED_LINE.finditer(text):
        job_id, reads, seconds, watchers = map(int, match.groups())
        if job_id == generate.RUNNING_JOB:
            lines.append(
                {
                    "reads": reads,
                    "seconds": seconds,
                    "watchers": watchers,
                    "reads_per_s": round(reads / max(seconds, 1), 2),
                    "line": match[0],
                }
            )
    return lines


def value_key(unit: str) -> str:
    return (
        "mib_per_s" if unit.startswith("MiB/s") else "log_events_median" if unit == "logs/watcher" else "requests_per_s"
    )


def ratios(ours: dict[str, Any], reference: dict[str, Any], unit: str) -> dict[str, float | None]:
    key = value_key(unit)

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    return {
        "throughput": ratio(ours.get(key), reference.get(key)),
        "p50": ratio(ours["latency_ms"].get("p50"), reference["latency_ms"].get("p50")),
        "p99": ratio(ours["latency_ms"].get("p99"), reference["latency_ms"].get("p99")),
    }


# ---- the report -----------------------------------------------------------------------------


def command_line(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr).strip() else ""


def machine_facts(args: argparse.Namespace) -> dict[str, Any]:
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    total = re.search(r"MemTotal:\s+(\d+) kB", meminfo)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "app", "worker", "migrations"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "cpu_count": os.cpu_count(),
        "memory_gib": round(int(total[1]) / 1024**2, 1) if total else None,
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "uvicorn_args": shlex.join(uvicorn_options(args)),
        "api_workers": args.api_workers or 1,
        "pinning": PIN.facts(args.api_workers or 1, args.database_url),
        "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "curl": command_line(["curl", "--version"]),
        "wrk": command_line(["wrk", "--version"]),
        "nginx": command_line([nginx_binary(), "-v"]),
        "uvicorn": command_line([str(VENV_BIN / "uvicorn"), "--version"]),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "uncommitted_changes_in_app_worker_migrations": len(dirty.splitlines()),
    }


def throughput(result: dict[str, Any], unit: str) -> str:
    value = result.get(value_key(unit))
    return "-" if value is None else f"{value:,.1f}"


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def errors_text(result: dict[str, Any]) -> str:
    if result.get("failed"):
        return "wrk failed"
    parts = [f"{name} {count}" for name, count in result["errors"].items() if count]
    if result["non_2xx_3xx"]:
        parts.append(f"non-2xx/3xx {result['non_2xx_3xx']}")
    return ", ".join(parts) or "none"


def table_row(
    name: str, connections: int, unit: str, ours: dict[str, Any], ref: dict[str, Any], ratio: dict[str, float | None]
) -> str:
    ours_ms, ref_ms = ours["latency_ms"], ref["latency_ms"]
    return (
        f"| {name} | {connections} | {unit} | {throughput(ours, unit)} | {throughput(ref, unit)} "
        f"| {ratio_text(ratio['throughput'])} | {ms(ours_ms.get('p50'))} / {ms(ref_ms.get('p50'))} "
        f"| {ms(ours_ms.get('p99'))} / {ms(ref_ms.get('p99'))} | {ratio_text(ratio['p99'])} "
        f"| {errors_text(ours)} | {errors_text(ref)} |"
    )


def markdown_table(scenarios: dict[str, Any]) -> str:
    """One row per scenario (two for sse-watchers: the watchers, then the pollers beside them).
    The latency columns are: wrk's percentiles; for curl rows the median download time (no p99);
    for watchers the delay from a step log's created_at to its arrival at the watcher, and their
    "throughput" the median log events a watcher received, both in the steady state (once every
    watcher had its first event; watchers_table has the whole run)."""
    lines = [
        "| scenario | conns | unit | ours | reference | ours/ref | p50 ms ours / ref | p99 ms ours / ref "
        "| p99 ours/ref | errors ours | errors ref |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, entry in scenarios.items():
        lines.append(
            table_row(name, entry["connections"], entry["unit"], entry["ours"], entry["reference"], entry["ratio"])
        )
        if pollers := entry.get("pollers"):
            lines.append(
                table_row(
                    f"{name}: GET {pollers['path']} beside them",
                    pollers["connections"],
                    "req/s",
                    pollers["during"] or {"latency_ms": {}, "errors": {}, "non_2xx_3xx": 0, "failed": "not run"},
                    pollers["without"],
                    pollers["ratio"],
                )
            )
    return "\n".join(lines)


def watchers_table(scenarios: dict[str, Any]) -> str:
    """The Server-Sent Events scenarios: each side's watchers, how long until all had their first
    event (and the slowest answer a lone poller got meanwhile), what they received, the delivery
    delay over all live logs and in the steady state after, and the shared readers' database
    reads (one line per API process that had watchers)."""
    lines = [
        "| scenario | watchers | connected | conn. errors | ended early | all first events after s "
        "| poller meanwhile max ms | log events per watcher min / median / max "
        "| delay ms p50 / p99 / max, all | delay ms p50 / p99 / max, steady "
        "| database reads (per API process) | reads/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, entry in scenarios.items():
        if entry.get("unit") != "logs/watcher":
            continue
        for result in (entry["ours"], entry["reference"]):
            logs, delay, steady = result["log_events_per_watcher"], result["delay_ms"], result["delay_ms_steady"]
            feeds = (
                "; ".join(f"{feed['reads']} in {feed['seconds']} s for {feed['watchers']}" for feed in result["feeds"])
                or "no line logged"
            )
            poller = result["poller_while_catching_up"]
            lines.append(
                f"| {name} | {result['watchers']} | {result['connected']} | {result['connection_errors']} "
                f"| {result['ended_early']} | {result['first_events_all_s']:.1f} "
                f"| {ms(poller['max_ms'])} ({poller['requests']} asked) "
                f"| {logs['min']} / {logs['median']} / {logs['max']} "
                f"| {ms(delay['p50'])} / {ms(delay['p99'])} / {ms(delay['max'])} "
                f"| {ms(steady['p50'])} / {ms(steady['p99'])} / {ms(steady['max'])} | {feeds} "
                f"| {ms(result['feed_reads_per_s'])} |"
            )
    return "\n".join(lines) if len(lines) > 2 else ""


def background_text(scenarios: dict[str, Any]) -> str:
    lines = []
    for name, entry in scenarios.items():
        loops = entry.get("downloads_during")
        if loops and "completed" in loops:
            lines.append(
                f"{name}: {loops['downloads']} curl downloads looping for {loops['seconds']:g} s: "
                f"{loops['completed']} completed, {loops['cut_at_the_end']} cut at the end, "
                f"{loops['bad']} bad; {loops['mib_per_s_all']:,.1f} MiB/s in all"
            )
        elif loops:
            lines.append(
                f"{name}: {BACKGROUND_DOWNLOADS} wrk downloads beside it: "
                f"{throughput(loops, 'MiB/s')} MiB/s in all ({errors_text(loops)})"
            )
    return "\n".join(lines)


def default_out(args: argparse.Namespace) -> Path:
    """results/<date>-<label>.json; the label defaults to <engine>-<N>worker[s], then the other
    uvicorn options, "pinned" with --pin and the duration when it is not 15 s (sqlite-1worker,
    postgres-2workers-5s, sqlite-1worker-pinned)."""
    engine = "postgres" if args.database_url else "sqlite"
    workers = args.api_workers or 1
    options = re.sub(r"[^A-Za-z0-9]+", "-", args.uvicorn_args).strip("-")
    label = args.label or "-".join(
        part
        for part in (
            f"{engine}-{workers}worker{'s' if workers > 1 else ''}",
            options,
            "pinned" if args.pin else "",
            "" if args.duration == 15 else f"{args.duration:g}s",
        )
        if part
    )
    return HERE / "results" / f"{datetime.now(UTC):%Y-%m-%d}-{label}.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=15, help="seconds each wrk run lasts (default 15)")
    parser.add_argument(
        "--uvicorn-args", default="", help='extra uvicorn options for the API and the reference, e.g. "--loop uvloop"'
    )
    parser.add_argument(
        "--api-workers",
        type=int,
        default=0,
        help="uvicorn --workers N for the API and the reference (default: uvicorn's, one process)",
    )
    parser.add_argument(
        "--only", default="", help="comma-separated scenarios to run: " + ", ".join(s.name for s in SCENARIOS)
    )
    parser.add_argument("--data-dir", type=Path, default=generate.DEFAULT_DATA_DIR)
    parser.add_argument(
        "--database-url",
        default="",
        help="a PostgreSQL server to run against "
        "(postgresql+psycopg://postgres@127.0.0.1:5432/postgres): a fresh database is made there",
    )
    parser.add_argument("--writer-rate", type=float, default=5.0, help="step logs a second for the running job")
    parser.add_argument("--label", default="", help="names the report: results/<date>-<label>.json")
    parser.add_argument("--out", type=Path, help="the JSON report (default bench/load/results/<date>-<label>.json)")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="run the servers under taskset -c SERVER_CPUS and the "
        "clients under taskset -c CLIENT_CPUS, so that they do not compete for the same cores",
    )
    parser.add_argument(
        "--server-cpus",
        help="with --pin: the CPU list (taskset -c) of redis-server, the writer, "
        "the API, the reference app and nginx (default 0; implies --pin)",
    )
    parser.add_argument(
        "--client-cpus",
        help="with --pin: the CPU list of wrk, curl, sse_watchers.py, the download "
        "loops and the runner itself (default 1; implies --pin)",
    )
    args = parser.parse_args()
    args.pin = args.pin or args.server_cpus is not None or args.client_cpus is not None
    args.server_cpus = args.server_cpus or "0"
    args.client_cpus = args.client_cpus or "1"
    if args.pin:
        if shutil.which("taskset") is None:
            parser.error("--pin needs taskset (util-linux)")
        available = os.sched_getaffinity(0)
        for option, text in (("--server-cpus", args.server_cpus), ("--client-cpus", args.client_cpus)):
            try:
                cpus = parse_cpu_list(text)
            except ValueError as exc:
                parser.error(f"{option} {text!r} is not a CPU list like 0, 0-3 or 0,2: {exc}")
            if not cpus or not cpus <= available:
                parser.error(f"{option} {text}: this process may run on CPUs {cpu_list_text(available)} only")
        if overlap := parse_cpu_list(args.server_cpus) & parse_cpu_list(args.client_cpus):
            print(f"warning: --server-cpus and --client-cpus share CPU(s) {cpu_list_text(overlap)}", flush=True)
        PIN.configure(args.server_cpus, args.client_cpus)
    if args.api_workers and "--workers" in shlex.split(args.uvicorn_args):
        parser.error("give the workers once: --api-workers or --workers in --uvicorn-args")
    known = {s.name for s in SCENARIOS}
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    if unknown := sorted(set(chosen) - known):
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    args.scenarios = [s for s in SCENARIOS if not chosen or s.name in chosen]
    args.out = args.out or default_out(args)
    return args


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))  # so the finally blocks stop everything
    started = time.monotonic()
    facts = machine_facts(args)
    if facts["open_files_limit"] < 2 * 1000 + 100:
        print(
            f"warning: open files limit {facts['open_files_limit']} is low for 1,000 connections "
            "(bench/load/run raises it)",
            flush=True,
        )
    run_dir = Path(tempfile.mkdtemp(prefix="load-run-"))
    run_dir.chmod(0o755)  # nginx's workers may run as another user
    print(f"logs in {run_dir}", flush=True)
    processes = Processes(run_dir)
    bench = Bench(args, run_dir, processes)
    database_url = ""
    report: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": facts,
        "duration_s": args.duration,
        "wrk_timeout": WRK_TIMEOUT,
        "scenarios": {},
    }
    try:
        if args.database_url:
            database_url = create_database(args.database_url)
            print(f"fresh database {database_url.rsplit('/', 1)[-1]}", flush=True)
        print("generating the data (or reusing it) ...", flush=True)
        bench.data = generate.generate(args.data_dir, database_url)
        report["data"] = bench.data
        PIN.pin_this_runner()  # from here on the runner is a client like the others
        bench.start(database_url)
        report["checks"] = bench.checks
        for scenario in args.scenarios:
            print(f"{scenario.name}: {scenario.description}", flush=True)
            entry = bench.scenario(scenario)
            report["scenarios"][scenario.name] = entry
            print(
                f"  ours {throughput(entry['ours'], scenario.unit)} {scenario.unit}, p99 "
                f"{ms(entry['ours']['latency_ms'].get('p99'))} ms ({errors_text(entry['ours'])}); reference "
                f"{throughput(entry['reference'], scenario.unit)} {scenario.unit}, p99 "
                f"{ms(entry['reference']['latency_ms'].get('p99'))} ms",
                flush=True,
            )
    finally:
        processes.stop_all()
        if database_url:
            drop_database(args.database_url, database_url)
        report["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        report["wall_s"] = round(time.monotonic() - started, 1)
        if bench.writer_stats.exists():
            report["writer"] = json.loads(bench.writer_stats.read_text())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    writer = report.get("writer", {})
    print(
        f"\nreport: {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out} "
        f"({report['wall_s']} s); writer: {writer.get('rows_written')} step logs, write p50/p99/max "
        f"{writer.get('write_ms', {}).get('p50')}/{writer.get('write_ms', {}).get('p99')}/"
        f"{writer.get('write_ms', {}).get('max')} ms"
    )
    machine = report["machine"]
    print(
        f"machine: {machine['cpu_count']} CPUs, {machine['memory_gib']} GiB; load average at start "
        f"{'/'.join(map(str, machine['load_average_start']))}, at the end "
        f"{'/'.join(map(str, machine['load_average_end']))}; API workers {machine['api_workers']}; "
        f"{'PostgreSQL' if args.database_url else 'SQLite'}"
    )
    print(f"{PIN.heading(machine['api_workers'], bool(args.database_url))}\n")
    print(markdown_table(report["scenarios"]))
    for extra in (watchers_table(report["scenarios"]), background_text(report["scenarios"])):
        if extra:
            print(f"\n{extra}")


if __name__ == "__main__":
    main()
