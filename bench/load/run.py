"""The API load benchmark (issue 9): the service's read routes and downloads under wrk, each
measured back to back against a reference that does no work of its own.

    bench/load/run [--duration 15] [--uvicorn-args "--workers 2"] [--only logs-c20,download]
                   [--database-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres] [--out FILE]

It builds (or reuses) the data with generate.py, then starts, each on a free port of 127.0.0.1:
redis-server; the API as scripts/run starts it (`uvicorn app.main:app --host --port` plus
--uvicorn-args); writer.py, which logs 5 steps a second to the running job through the trainer's
code; the reference app (reference_app.py, the same uvicorn options) serving the API's own
responses, fetched and stored before the load; and nginx (sendfile on) serving the checkpoint
file. Each scenario runs wrk on the API, then the same wrk on its reference. The report (JSON)
holds the machine's facts and, per scenario, both results and ours/reference ratios; a
markdown table is printed last. Everything started is stopped, also on failure or Ctrl-C.

With --database-url, the API and the writer use a fresh PostgreSQL database created for the run
on that server (the URL names the database to connect to for CREATE and DROP DATABASE) and
dropped at the end; the checkpoint file stays under --data-dir."""

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
import socket
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

import generate  # noqa: E402

MIB = 1024**2
WRK_TIMEOUT = "10s"
RANGE_BYTES = 100 * MIB
BACKGROUND_DOWNLOADS = 8
FILE_URL_PATH = (f"/jobs/{generate.CHECKPOINT_JOB}/checkpoints/{generate.CHECKPOINT_NAME}/files/"
                 f"{generate.CHECKPOINT_FILE}")
# The responses the reference app serves: path as wrk asks for it -> stored body's file name.
REFERENCE_BODIES = {
    f"/jobs/{generate.RUNNING_JOB}": "job-running.json",
    "/jobs/5": "job-finished.json",
    "/jobs?limit=50": "jobs-limit-50.json",
    "/jobs/9000/logs?limit=1000": "logs-9000.json",
    "/jobs/9000/events": "events-9000.json",
}


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    connections: int
    # json: the reference app answers the same path; download: nginx serves the same file;
    # healthz: ours while BACKGROUND_DOWNLOADS downloads run, the reference is ours without them.
    kind: str
    description: str
    range_last: int = 0  # with Range: bytes=<the last range_last bytes>

    @property
    def threads(self) -> int:
        return min(2, self.connections)

    @property
    def unit(self) -> str:
        return "MiB/s" if self.kind == "download" else "req/s"


SCENARIOS = [
    Scenario("job-running-c100", f"/jobs/{generate.RUNNING_JOB}", 100, "json",
             "GET the running job's record (the writer updates it 5 times a second), 100 connections"),
    Scenario("job-running-c1000", f"/jobs/{generate.RUNNING_JOB}", 1000, "json",
             "GET the running job's record, 1,000 connections"),
    Scenario("job-finished-c100", "/jobs/5", 100, "json", "GET a finished job's record, 100 connections"),
    Scenario("jobs-list-c20", "/jobs?limit=50", 20, "json", "GET /jobs?limit=50 (newest first), 20 connections"),
    Scenario("logs-c20", "/jobs/9000/logs?limit=1000", 20, "json",
             "GET 1,000 step logs of a job with 10,000, 20 connections"),
    Scenario("events-c20", "/jobs/9000/events", 20, "json", "GET a job's events, 20 connections"),
    Scenario("download", FILE_URL_PATH, 1, "download",
             "download the 2 GiB checkpoint file over and over, 1 connection; reference: nginx"),
    Scenario("download-range", FILE_URL_PATH, 1, "download",
             "download its last 100 MiB with Range, 1 connection; reference: nginx", range_last=RANGE_BYTES),
    Scenario("healthz-under-downloads", "/healthz", 1, "healthz",
             f"GET /healthz, 1 connection, while {BACKGROUND_DOWNLOADS} downloads of the file run; "
             "reference: the same API with no downloads"),
]


# ---- processes ------------------------------------------------------------------------------


class Processes:
    """The processes this run started, each in its own process group, stopped in reverse order."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], *, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.log_dir / f"{name}.log", "ab") as log:
            process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration:g}s", "--latency",
            "--timeout", WRK_TIMEOUT]
    for header in headers:
        argv += ["-H", header]
    return [*argv, url]


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
        self.uvicorn_args = shlex.split(args.uvicorn_args)
        self.data: dict[str, Any] = {}
        self.api = self.reference = self.nginx = ""
        self.writer_stats = run_dir / "writer-stats.json"
        self.checks: dict[str, Any] = {}

    def environment(self, database_url: str, redis_port: int) -> dict[str, str]:
        data_dir = self.data["data_dir"]
        return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "DATA_DIR": data_dir, "DATABASE_URL": database_url,
                "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                "ALLOWED_LOCAL_ROOTS": f"{data_dir}/models,{data_dir}/datasets"}

    def start(self, database_url: str) -> None:
        redis_port, api_port, reference_port, nginx_port = (free_port() for _ in range(4))
        env = self.environment(database_url, redis_port)
        self.processes.start("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no", "--dir", str(self.run_dir)])
        wait_until("redis", lambda: _redis_ping(redis_port), self.processes, 20)

        # The writer heartbeats the running job before the API's first reconcile pass looks at it.
        ready = self.run_dir / "writer-ready"
        # On PostgreSQL the ORM's INSERT casts the byte counts to 32-bit INTEGER: an H100's overflow.
        memory = "none" if database_url else "h100"
        self.processes.start("writer", [str(VENV_BIN / "python"), str(HERE / "writer.py"),
                                        "--job-id", str(generate.RUNNING_JOB), "--rate", str(self.args.writer_rate),
                                        "--memory", memory, "--ready-file", str(ready),
                                        "--stats", str(self.writer_stats)], env=env)
        wait_until("writer", ready.exists, self.processes, 120)

        self.api = f"http://127.0.0.1:{api_port}"
        self.processes.start("api", [str(VENV_BIN / "uvicorn"), "app.main:app", "--host", "127.0.0.1",
                                     "--port", str(api_port), *self.uvicorn_args], env=env)
        wait_until("the API", lambda: answers(f"{self.api}/healthz", 200), self.processes, 90)

        bodies = self.store_reference_bodies()
        self.reference = f"http://127.0.0.1:{reference_port}"
        self.processes.start("reference", [str(VENV_BIN / "uvicorn"), "bench.load.reference_app:app",
                                           "--host", "127.0.0.1", "--port", str(reference_port),
                                           *self.uvicorn_args], env={**env, "LOAD_REFERENCE_BODIES": str(bodies)})
        wait_until("the reference app", lambda: answers(f"{self.reference}/jobs/5", 200), self.processes, 90)

        self.nginx = f"http://127.0.0.1:{nginx_port}"
        conf = self.run_dir / "nginx.conf"
        conf.write_text(nginx_conf(self.run_dir, nginx_port, Path(self.data["file"])))
        self.processes.start("nginx", [nginx_binary(), "-p", str(self.run_dir), "-c", str(conf),
                                       "-e", str(self.run_dir / "nginx-error.log")])
        wait_until("nginx", lambda: answers(f"{self.nginx}{FILE_URL_PATH}", 206, {"Range": "bytes=0-0"}),
                   self.processes, 20)
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
            raise RuntimeError(f"the API's download has {size} bytes, sha256 {digest.hexdigest()}; "
                               f"expected {generate.FILE_SIZE}, {self.data['file_sha256']}")
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
        result = run_wrk(f"{base}{scenario.path}", connections=scenario.connections, threads=scenario.threads,
                         duration=self.args.duration, headers=headers)
        result["settle_s"] = settled
        time.sleep(1)
        return result

    def scenario(self, scenario: Scenario) -> dict[str, Any]:
        entry: dict[str, Any] = {"description": scenario.description, "path": scenario.path,
                                 "connections": scenario.connections, "threads": scenario.threads,
                                 "unit": scenario.unit}
        if scenario.range_last:
            entry["range"] = range_header(scenario.range_last)
        if scenario.kind == "healthz":
            entry["ours"], entry["downloads_during"] = self.under_downloads(scenario)
            entry["reference"] = {"target": "the API with no downloads running", **self.measure(self.api, scenario)}
        else:
            entry["ours"] = {"target": "the API", **self.measure(self.api, scenario)}
            reference = self.nginx if scenario.kind == "download" else self.reference
            target = "nginx (sendfile on), same file" if scenario.kind == "download" \
                else "reference_app.py, same bytes, same uvicorn options"
            entry["reference"] = {"target": target, **self.measure(reference, scenario)}
        entry["ratio"] = ratios(entry["ours"], entry["reference"], scenario.unit)
        return entry

    def under_downloads(self, scenario: Scenario) -> tuple[dict[str, Any], dict[str, Any]]:
        settled = self.settle()
        argv = wrk_argv(f"{self.api}{FILE_URL_PATH}", connections=BACKGROUND_DOWNLOADS, threads=1,
                        duration=self.args.duration + 3, headers=[])
        downloads = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            time.sleep(2)
            ours = run_wrk(f"{self.api}{scenario.path}", connections=scenario.connections,
                           threads=scenario.threads, duration=self.args.duration, headers=[])
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


def _redis_ping(port: int) -> bool:
    import redis

    return bool(redis.Redis(port=port, socket_timeout=1).ping())


def range_header(last: int) -> str:
    return f"bytes={generate.FILE_SIZE - last}-{generate.FILE_SIZE - 1}"


def ratios(ours: dict[str, Any], reference: dict[str, Any], unit: str) -> dict[str, float | None]:
    key = "mib_per_s" if unit == "MiB/s" else "requests_per_s"

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    return {"throughput": ratio(ours.get(key), reference.get(key)),
            "p50": ratio(ours["latency_ms"].get("p50"), reference["latency_ms"].get("p50")),
            "p99": ratio(ours["latency_ms"].get("p99"), reference["latency_ms"].get("p99"))}


# ---- the report -----------------------------------------------------------------------------


def command_line(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr).strip() else ""


def machine_facts(args: argparse.Namespace) -> dict[str, Any]:
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    total = re.search(r"MemTotal:\s+(\d+) kB", meminfo)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "app", "worker", "migrations"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return {
        "cpu_count": os.cpu_count(), "memory_gib": round(int(total[1]) / 1024**2, 1) if total else None,
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "system": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
        "uvicorn_args": args.uvicorn_args, "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "wrk": command_line(["wrk", "--version"]), "nginx": command_line([nginx_binary(), "-v"]),
        "uvicorn": command_line([str(VENV_BIN / "uvicorn"), "--version"]),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip(),
        "uncommitted_changes_in_app_worker_migrations": len(dirty.splitlines()),
    }


def throughput(result: dict[str, Any], unit: str) -> str:
    value = result.get("mib_per_s" if unit == "MiB/s" else "requests_per_s")
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


def markdown_table(scenarios: dict[str, Any]) -> str:
    lines = ["| scenario | conns | unit | ours | reference | ours/ref | p50 ms ours / ref | p99 ms ours / ref "
             "| p99 ours/ref | errors ours | errors ref |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, entry in scenarios.items():
        ours, ref, unit, ratio = entry["ours"], entry["reference"], entry["unit"], entry["ratio"]
        ours_ms, ref_ms = ours["latency_ms"], ref["latency_ms"]
        lines.append(
            f"| {name} | {entry['connections']} | {unit} | {throughput(ours, unit)} | {throughput(ref, unit)} "
            f"| {ratio_text(ratio['throughput'])} | {ms(ours_ms.get('p50'))} / {ms(ref_ms.get('p50'))} "
            f"| {ms(ours_ms.get('p99'))} / {ms(ref_ms.get('p99'))} | {ratio_text(ratio['p99'])} "
            f"| {errors_text(ours)} | {errors_text(ref)} |")
    return "\n".join(lines)


def default_out(args: argparse.Namespace) -> Path:
    engine = "postgresql" if args.database_url else "sqlite"
    options = re.sub(r"[^A-Za-z0-9]+", "-", args.uvicorn_args).strip("-") or "uvicorn-default"
    label = args.label or f"{engine}-{options}-{args.duration:g}s"
    return HERE / "results" / f"{datetime.now(UTC):%Y-%m-%d}-{label}.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=15, help="seconds each wrk run lasts (default 15)")
    parser.add_argument("--uvicorn-args", default="", help='extra uvicorn options for the API and the reference, '
                        'e.g. "--workers 2"')
    parser.add_argument("--only", default="", help="comma-separated scenarios to run: "
                        + ", ".join(s.name for s in SCENARIOS))
    parser.add_argument("--data-dir", type=Path, default=generate.DEFAULT_DATA_DIR)
    parser.add_argument("--database-url", default="", help="a PostgreSQL server to run against "
                        "(postgresql+psycopg://postgres@127.0.0.1:5432/postgres): a fresh database is made there")
    parser.add_argument("--writer-rate", type=float, default=5.0, help="step logs a second for the running job")
    parser.add_argument("--label", default="", help="names the report: results/<date>-<label>.json")
    parser.add_argument("--out", type=Path, help="the JSON report (default bench/load/results/<date>-<label>.json)")
    args = parser.parse_args()
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
        print(f"warning: open files limit {facts['open_files_limit']} is low for 1,000 connections "
              "(bench/load/run raises it)", flush=True)
    run_dir = Path(tempfile.mkdtemp(prefix="load-run-"))
    run_dir.chmod(0o755)  # nginx's workers may run as another user
    print(f"logs in {run_dir}", flush=True)
    processes = Processes(run_dir)
    bench = Bench(args, run_dir, processes)
    database_url = ""
    report: dict[str, Any] = {"started_at": datetime.now(UTC).isoformat(timespec="seconds"), "machine": facts,
                              "duration_s": args.duration, "wrk_timeout": WRK_TIMEOUT, "scenarios": {}}
    try:
        if args.database_url:
            database_url = create_database(args.database_url)
            print(f"fresh database {database_url.rsplit('/', 1)[-1]}", flush=True)
        print("generating the data (or reusing it) ...", flush=True)
        bench.data = generate.generate(args.data_dir, database_url)
        report["data"] = bench.data
        if bench.data["widened_columns"]:
            print(f"warning: widened 32-bit columns to bigint for this run: {bench.data['widened_columns']}",
                  flush=True)
        bench.start(database_url)
        report["checks"] = bench.checks
        for scenario in args.scenarios:
            print(f"{scenario.name}: {scenario.description}", flush=True)
            entry = bench.scenario(scenario)
            report["scenarios"][scenario.name] = entry
            print(f"  ours {throughput(entry['ours'], scenario.unit)} {scenario.unit}, p99 "
                  f"{ms(entry['ours']['latency_ms'].get('p99'))} ms ({errors_text(entry['ours'])}); reference "
                  f"{throughput(entry['reference'], scenario.unit)} {scenario.unit}, p99 "
                  f"{ms(entry['reference']['latency_ms'].get('p99'))} ms", flush=True)
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
    print(f"\nreport: {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out} "
          f"({report['wall_s']} s); writer: {writer.get('rows_written')} step logs, write p50/p99/max "
          f"{writer.get('write_ms', {}).get('p50')}/{writer.get('write_ms', {}).get('p99')}/"
          f"{writer.get('write_ms', {}).get('max')} ms\n")
    print(markdown_table(report["scenarios"]))


if __name__ == "__main__":
    main()
