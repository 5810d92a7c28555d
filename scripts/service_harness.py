"""Start the service's real processes (redis-server, uvicorn, `python -m worker`) for scripts
that exercise it as a user would: the GPU end-to-end check and the benchmark."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants, from /proc (children of children included)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Service:
    def __init__(self, workdir: Path, *, allowed_roots: list[Path], extra_env: dict[str, str] | None = None):
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        workdir.mkdir(parents=True, exist_ok=True)
        redis_port, api_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{api_port}"
        self.env = {
            **os.environ,
            "DATA_DIR": str(workdir / "data"),
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "ALLOWED_LOCAL_ROOTS": ",".join(str(r) for r in allowed_roots),
            "PYTHONUNBUFFERED": "1",
            **(extra_env or {}),
        }
        self.redis_port, self.api_port = redis_port, api_port

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 (the process owns it)
        self.procs.append(subprocess.Popen(args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def start(self, *, worker: bool = True) -> Service:
        redis = shutil.which("redis-server")
        if redis is None:
            raise SystemExit("redis-server not found on PATH")
        self._start(
            "redis",
            [
                redis,
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
        )
        time.sleep(0.5)
        subprocess.run(
            [sys.executable, "-m", "alembic", "upgrade", "head"],
            cwd=ROOT,
            env=self.env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        self._start(
            "api",
            [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(self.api_port)],
        )
        if worker:
            self.start_worker()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise SystemExit(f"the API did not become healthy; see {self.workdir}/api.log")

    def start_worker(self, **extra_env: str) -> subprocess.Popen[bytes]:
        env, self.env = self.env, {**self.env, **extra_env}
        try:
            self._start("worker", [sys.executable, "-m", "worker"])
        finally:
            self.env = env
        return self.procs[-1]

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for(http: httpx.Client, job_id: int, *, timeout_s: float, echo: bool = True) -> dict:
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        record = http.get(f"/jobs/{job_id}").json()
        progress = (record["status"], record["progress"]["step"])
        if echo and progress != last:
            print(
                f"  job {job_id}: {record['status']} step {record['progress']['step']}/"
                f"{record['progress']['total_steps']} eta {record['progress']['eta_seconds']}",
                flush=True,
            )
            last = progress
        if record["status"] in ("succeeded", "failed", "cancelled"):
            return record
        time.sleep(1)
    raise SystemExit(f"job {job_id} did not finish within {timeout_s:.0f} s")
