"""The service's real processes (redis-server, the API under uvicorn, `python -m worker` and the
trainers its workers start), started the way a user starts them. One harness for everything
that runs the whole service: the tests (`tests/conftest.py`'s `service`, the fault suite's
`cluster`), the GPU scripts (`scripts/gpu_*.py`) and the service benchmark.

Each piece can be started, killed and started again on its own, so a fault test can break one
and watch the others; `stop()` reaps every process started, restarted ones too."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from core.contract import FORKED_STANDBY_NAME
from scripts.service_zygote import MODULES as ZYGOTE_MODULES
from worker.ranks import free_port
from worker.standby import AdoptedTrainer

ROOT = Path(__file__).resolve().parent.parent
# The socket of a service zygote (scripts/service_zygote.py) the API and the workers are forked
# from, their libraries imported; unset (or not answering): each is a process of its own. The tests
# set it (tests/conftest.py).
ZYGOTE_ENV = "SERVICE_ZYGOTE"
START_TIMEOUT_S = 30.0
# How long a test waits for a job to reach a status or a step, unless it says otherwise: generous,
# since it only bounds a failure. The tests run side by side (scripts/test), and on a busy 2-core
# machine a job of 400 logged steps took over 4 minutes; a healthy job is never waited for so long.
JOB_TIMEOUT_S = 600.0
FINISHED = frozenset({"succeeded", "failed", "cancelled"})

T = TypeVar("T")


# ---- small tools ----------------------------------------------------------------------------------


def unmeasured_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (this process's by default) without coverage's variables: a third-party process the
    tests start (mlflow, moto, schemathesis, Ray) runs none of the measured packages, and coverage,
    which measures every Python process started with them, would only slow it down (a third more
    CPU for mlflow's imports)."""
    return {
        k: v for k, v in (os.environ if env is None else env).items() if not k.startswith(("COVERAGE_", "COV_CORE_"))
    }


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.1) -> T:
    """predicate's first truthy value, polled every interval_s; AssertionError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def redis_server_command(port: int, workdir: Path, binary: str | None = None) -> list[str]:
    """redis-server on loopback with no persistence: a restart loses every queued entry, the
    hardest case for the service (and nothing is written to disk between runs)."""
    binary = binary or shutil.which("redis-server")
    if binary is None:
        raise AssertionError("redis-server is not installed (scripts/test installs it)")
    return [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
    ]


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


def trainer_rank(pid: int) -> int | None:
    """A trainer's rank, by the log it writes (trainer.log for rank 0, trainer-rank<N>.log): a rank
    forked by the trainer fork server shows the server's /proc environ, not its RANK."""
    try:
        log = Path(os.readlink(f"/proc/{pid}/fd/1")).name
    except OSError:
        return None
    if log == "trainer.log":
        return 0
    return int(log.removeprefix("trainer-rank").removesuffix(".log")) if log.startswith("trainer-rank") else None


def trainer_pids(data_dir: Path, job_id: int | None = None) -> list[int]:
    """Live trainer processes of this DATA_DIR (another service on the machine has trainers for
    job 1 too), of one job or of all. A trainer whose worker died is no one's descendant, so
    it is found by its command line and environment; a standby trainer (`-m trainer --standby`)
    names its job only in the job's trainer.lock, which holds its pid once it has taken one, and a
    forked one (`-m trainer --forkserver SOCKET`) by its output, the job's trainer.log (a rank's
    trainer-rank<N>.log). A standby the fork server forked is one of all of them (job_id None)
    before it has a job too, found by its output, DATA_DIR/standby/standby.log."""
    found = []
    lock = data_dir.resolve() / "jobs" / str(job_id) / "trainer.lock"
    try:
        locked_by = lock.read_text().strip() if job_id is not None else ""
    except OSError:
        locked_by = ""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        standby = argv[-2:] == [b"trainer", b"--standby"]
        forked = argv[-3:-1] == [b"trainer", b"--forkserver"]
        if state == "Z" or (argv[-2:-1] != [b"trainer"] and not standby and not forked):
            continue
        if forked:
            # Forked by the trainer fork server, it keeps the server's command line and environment
            # (as /proc shows them): its output, the job's trainer.log, says whose it is. The server
            # itself writes elsewhere.
            try:
                log = Path(os.readlink(entry / "fd" / "1"))
            except OSError:
                continue
            # Rank 0 and a single trainer write trainer.log, the other ranks trainer-rank<N>.log.
            named = log.name == "trainer.log" or re.fullmatch(r"trainer-rank[0-9]+\.log", log.name) is not None
            in_jobs = named and log.parent.parent == data_dir.resolve() / "jobs"
            if (in_jobs and (job_id is None or log.parent.name == str(job_id))) or (
                job_id is None and log == data_dir.resolve() / "standby" / "standby.log"
            ):
                found.append(int(entry.name))
            continue
        if job_id is None:
            of_the_job = True
        elif standby:
            of_the_job = locked_by == entry.name
        else:
            of_the_job = argv[-1] == str(job_id).encode()
        if of_the_job and f"DATA_DIR={data_dir.resolve()}".encode() in environ:
            found.append(int(entry.name))
    return found


def standby_pids(data_dir: Path) -> list[int]:
    """Live standby trainers of this DATA_DIR, used or not: exec'd ones (`-m trainer --standby`) and
    those the trainer fork server forked (named FORKED_STANDBY_NAME in /proc/PID/comm)."""
    found = []
    for pid in trainer_pids(data_dir):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if argv[-2:] == [b"trainer", b"--standby"] or name == FORKED_STANDBY_NAME:
            found.append(pid)
    return found


def kill(pids: Iterable[int], sig: signal.Signals = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


# A process the service zygote forked is not our child: the worker's handle on a trainer it did not
# start (poll, wait, signals, from /proc, where the zygote keeps its status) is what the harness uses.
ForkedProcess = AdoptedTrainer
Process = subprocess.Popen[bytes] | ForkedProcess


def fork_from_zygote(args: list[str], env: dict[str, str], log: Path) -> ForkedProcess | None:
    """`args` (`python -m uvicorn ...` or `python -m worker ...`) forked by the zygote that
    SERVICE_ZYGOTE names, or None when there is none or it does not answer."""
    socket_path = os.environ.get(ZYGOTE_ENV)
    if not socket_path or args[:2] != [sys.executable, "-m"] or args[2] not in ZYGOTE_MODULES:
        return None
    request = {"argv": args[1:], "env": env, "cwd": str(ROOT), "log": str(log)}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(30)
            connection.connect(socket_path)
            connection.sendall((json.dumps(request) + "\n").encode())
            answer = json.loads(connection.makefile("rb").readline())
    except (OSError, ValueError) as exc:
        print(f"no process from the service zygote at {socket_path} ({exc!r}): starting one")
        return None
    if "pid" in answer:
        return ForkedProcess(int(answer["pid"]))
    print(f"the service zygote refused ({answer.get('refused')}): starting a process of its own")
    return None


# ---- the service ----------------------------------------------------------------------------------


class Service:
    """The service's processes under `root` (logs: root/<name>.log). With `redis_url` the service
    uses that Redis; without, it runs a redis-server of its own that start_redis() starts and
    kill_redis() kills. `settings` are environment variables over the harness's defaults."""

    def __init__(
        self,
        root: Path,
        *,
        allowed_roots: Iterable[Path] = (),
        data_dir: Path | None = None,
        redis_url: str | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir or root / "data"
        self.own_redis = redis_url is None
        self.redis_port = free_port()
        self.api_port = free_port()
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.env: dict[str, str] = {
            **os.environ,
            "DATA_DIR": str(self.data_dir),
            "DATABASE_URL": "",  # SQLite under DATA_DIR unless a caller says otherwise
            "REDIS_URL": redis_url or f"redis://127.0.0.1:{self.redis_port}/0",
            "ALLOWED_LOCAL_ROOTS": ",".join(str(path) for path in allowed_roots),
            "PYTHONUNBUFFERED": "1",
            **(settings or {}),
        }
        self.redis: Process | None = None
        self.api: Process | None = None
        self.workers: list[Process] = []
        # Every process started, restarted ones too: stop() reaps them all (a Popen dropped
        # before its process is reaped is a ResourceWarning).
        self.started: list[Process] = []
        self.clients: list[httpx.Client] = []
        self._poller: httpx.Client | None = None

    @property
    def worker(self) -> Process:
        """The worker started last."""
        return self.workers[-1]

    # ---- processes --------------------------------------------------------------------------------

    def _start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Process:
        forked = fork_from_zygote(args, env or self.env, self.root / f"{name}.log")
        if forked is not None:
            self.started.append(forked)
            return forked
        with open(self.root / f"{name}.log", "ab") as log:
            self.started.append(
                subprocess.Popen(args, cwd=ROOT, env=env or self.env, stdout=log, stderr=subprocess.STDOUT)
            )
        return self.started[-1]

    def start_redis(self) -> None:
        assert self.own_redis, "this service uses a Redis it did not start"
        self.redis = self._start("redis", redis_server_command(self.redis_port, self.root))

        def answers() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.redis_port), 1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
            return False

        wait_until(answers, START_TIMEOUT_S, "redis-server to answer")

    def kill_redis(self) -> None:
        assert self.redis is not None
        self.redis.kill()
        self.redis.wait(10)

    def migrate(self) -> None:
        """`alembic upgrade head`, as the image's prestart step runs it; a SQLite database already
        at head (a test fixture migrated it, or the service is started again) is left alone, which
        spares a process that would change nothing."""
        if self._sqlite_at_head():
            return
        subprocess.run(
            [sys.executable, "-m", "alembic", "upgrade", "head"],
            cwd=ROOT,
            env=self.env,
            check=True,
            capture_output=True,
        )

    def _sqlite_at_head(self) -> bool:
        database = Path(self.env["DATA_DIR"]) / "jobs.db"
        if self.env.get("DATABASE_URL") or not database.is_file():
            return False
        from alembic.config import Config
        from alembic.script import ScriptDirectory

        head = ScriptDirectory.from_config(Config(str(ROOT / "alembic.ini"))).get_current_head()
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
            try:
                rows = connection.execute("SELECT version_num FROM alembic_version").fetchall()
            except sqlite3.Error:
                return False
        return rows == [(head,)]

    def start_api(self, *uvicorn_args: str, timeout_s: float = 60) -> subprocess.Popen[bytes]:
        """uvicorn as scripts/run starts it; waits until /healthz answers (503 counts: a fault
        test may start the API while Redis is down)."""
        self.api = self._start(
            "api",
            [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(self.api_port)]
            + list(uvicorn_args),
        )

        def answers() -> bool:
            try:
                return self.poller().get("/healthz", timeout=2).status_code in (200, 503)
            except httpx.HTTPError:
                return False

        wait_until(answers, timeout_s, f"the API to answer (see {self.root}/api.log)", interval_s=0.2)
        return self.api

    def start_worker(self, **extra_env: str) -> subprocess.Popen[bytes]:
        """Start a worker and wait until it listens on its queue (its signal handlers are set)."""
        wait = self._spawn_worker(**extra_env)
        wait()
        return self.worker

    def _spawn_worker(self, **extra_env: str) -> Callable[[], None]:
        """Start a worker; returns what waits until it listens on its queue."""
        log = self.root / "worker.log"

        def listening() -> int:
            return log.read_text(errors="replace").count("*** Listening on") if log.exists() else 0

        before = listening()
        self.workers.append(self._start("worker", [sys.executable, "-m", "worker"], {**self.env, **extra_env}))
        return lambda: wait_until(lambda: listening() > before, 60, f"the worker to listen on its queue (see {log})")

    def start(self, *, worker: bool = True, **worker_env: str) -> Service:
        """Redis (when the service has its own), the migrations, then the API and the worker side
        by side, as `docker compose up` starts them; returns once each answers."""
        if self.own_redis:
            self.start_redis()
        self.migrate()
        wait_for_worker = self._spawn_worker(**worker_env) if worker else None
        self.start_api()
        if wait_for_worker is not None:
            wait_for_worker()
        return self

    def everything(self) -> list[int]:
        """Every live process of this service: redis, API, workers, their horses and trainers."""
        roots = [p.pid for p in (self.redis, self.api, *self.workers) if p is not None and p.poll() is None]
        found = {pid for root in roots for pid in process_tree(root)}
        return sorted(found | set(trainer_pids(self.data_dir)))

    def worker_tree(self, worker: subprocess.Popen[bytes]) -> list[int]:
        """A worker, its work horses and their trainers: those it started and those the trainer
        fork server forked for its jobs (the server's children, not the horse's), which are taken
        to be its own: the tests that kill a worker this way run one worker at a time."""
        tree = process_tree(worker.pid)
        return tree + [pid for pid in trainer_pids(self.data_dir) if pid not in tree]

    def kill_tree(self, process: subprocess.Popen[bytes]) -> None:
        kill(process_tree(process.pid))
        process.wait(10)

    def stop_workers(self, timeout_s: float = 30) -> None:
        """SIGTERM to every live worker (their jobs go back to the queue), then SIGKILL after timeout_s."""
        for worker in self.workers:
            if worker.poll() is None:
                worker.terminate()
                try:
                    worker.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    kill(self.worker_tree(worker))
                    worker.wait(10)

    def stop(self, *, graceful: bool = True) -> None:
        """graceful: SIGTERM to workers, then the API, then Redis, as `docker compose down` does
        (their coverage data and logs get written); whatever is left after 15 s, and every
        trainer, is killed."""
        for http in self.clients:
            http.close()
        if self._poller is not None:
            self._poller.close()
            self._poller = None
        if graceful:
            for process in reversed(self.started):
                if process.poll() is None:
                    process.terminate()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.wait(15)
        kill(self.everything() + [p.pid for p in self.started if p.poll() is None])
        for process in self.started:
            process.wait(10)

    def logs(self, tail_chars: int = 4000) -> str:
        return "".join(
            f"----- {path.name} -----\n{path.read_text(errors='replace')[-tail_chars:]}\n"
            for path in sorted(self.root.glob("*.log"))
        )

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- the API, as a client ---------------------------------------------------------------------

    def http(self, timeout_s: float = 60) -> httpx.Client:
        """A client of the API, closed with the service (plain HTTP: no CA bundle read for it,
        which costs 60 ms of CPU a client)."""
        self.clients.append(httpx.Client(base_url=self.url, timeout=timeout_s, verify=False))
        return self.clients[-1]

    def poller(self) -> httpx.Client:
        """The client of the harness's own calls (made every 0.2 s while a test waits), kept until
        stop(); it keeps no connection between requests, so that a restarted API is reached as a
        new client would reach it."""
        if self._poller is None:
            self._poller = httpx.Client(
                base_url=self.url, timeout=30, verify=False, limits=httpx.Limits(max_keepalive_connections=0)
            )
        return self._poller

    def submit(self, spec: dict[str, Any]) -> int:
        response = self.poller().post("/jobs", json=spec)
        assert response.status_code == 201, response.text
        return int(response.json()["id"])

    def job(self, job_id: int) -> dict[str, Any]:
        return dict(self.poller().get(f"/jobs/{job_id}").json())

    def events(self, job_id: int) -> list[tuple[str, str]]:
        items = self.poller().get(f"/jobs/{job_id}/events").json()["items"]
        return [(e["kind"], e["message"]) for e in items]

    def job_dir(self, job_id: int) -> Path:
        return self.data_dir / "jobs" / str(job_id)

    def wait_for_failpoint(self, job_id: int, name: str, timeout_s: float = 180) -> Path:
        """The marker file of a `pause` failpoint (FINETUNE_FAILPOINTS, trainer/failpoints.py) once
        the job's trainer holds there; deleting it lets the trainer go on."""
        from trainer.failpoints import marker

        path = marker(self.job_dir(job_id), name)
        wait_until(path.exists, timeout_s, f"the trainer of job {job_id} to reach failpoint {name}", interval_s=0.1)
        return path

    def wait_for(
        self, job_id: int, statuses: Iterable[str] = FINISHED, timeout_s: float = JOB_TIMEOUT_S, *, echo: bool = False
    ) -> dict[str, Any]:
        """The job's record once its status is one of `statuses`; with echo, each new status and
        step is printed (the GPU scripts show their progress)."""
        wanted, last = set(statuses), None

        def reached() -> dict[str, Any] | None:
            nonlocal last
            try:
                record = self.job(job_id)
            except httpx.HTTPError:
                return None
            progress = record["progress"]
            if echo and (record["status"], progress["step"]) != last:
                last = (record["status"], progress["step"])
                print(
                    f"  job {job_id}: {record['status']} step {progress['step']}/{progress['total_steps']} "
                    f"eta {progress['eta_seconds']}",
                    flush=True,
                )
            return record if record["status"] in wanted else None

        return dict(wait_until(reached, timeout_s, f"job {job_id} to reach {wanted}", interval_s=0.3))

    def wait_for_step(self, job_id: int, step: int, timeout_s: float = JOB_TIMEOUT_S) -> None:
        wait_until(
            lambda: self.job(job_id)["progress"]["step"] >= step,
            timeout_s,
            f"job {job_id} at step {step}",
            interval_s=0.2,
        )
