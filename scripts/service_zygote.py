"""A zygote for the test harness's API and worker processes: `python -m scripts.service_zygote SOCKET`.

A test that starts the service pays for the API's and the worker's imports each time (FastAPI,
SQLAlchemy, pydantic, Redis, RQ: about 3.4 s of CPU under coverage on the 2-core test machine, and
the suite starts the service about a hundred times). The zygote imports those libraries once, and
each start is a fork of it that then runs `python -m uvicorn ...` or `python -m worker` as the
command line would (runpy), with the start's own environment, working directory and log. Only
libraries are imported ahead, never the project's modules, whose import-time code reads settings
that each start gives differently: which libraries, a throwaway process that imports the API and
the worker says (so the list follows the code).

The protocol: a client connects to SOCKET and sends one JSON line {"argv", "env", "cwd", "log"}
(argv as given to `python`, i.e. ["-m", module, *args]); the zygote forks and answers {"pid": N}.
The zygote never reaps its children while it runs: their exit status stays readable in /proc
(scripts/service_harness.py ForkedProcess) until it ends, with the test process that started it.

Test-harness code: the product's processes start as they always do (scripts/run, compose)."""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from core.process_name import name_process

ROOT = Path(__file__).resolve().parent.parent
OURS = {"app", "core", "worker", "trainer", "client", "scripts", "tests", "bench", "__main__"}
MODULES = ("uvicorn", "worker")  # what it starts: `python -m uvicorn ...`, `python -m worker ...`
# Variables that libraries read once, at import (huggingface_hub's HF_HOME and HF_HUB_OFFLINE,
# prometheus-client's multiprocess folder, the interpreter's own): a start whose values differ
# from the zygote's is refused, and the harness starts that process as a process of its own.
READ_AT_IMPORT = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "PROMETHEUS_", "PYTHON")
PR_SET_PDEATHSIG = 1


def library_modules() -> list[str]:
    """The modules outside the project that the API and the worker import, in import order."""
    code = "import json, sys, app.main, worker.__main__; print(json.dumps(list(sys.modules)))"
    unmeasured = {k: v for k, v in os.environ.items() if not k.startswith(("COVERAGE_", "COV_CORE_"))}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=unmeasured, capture_output=True, text=True, check=True
    )
    names: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return [name for name in names if name.split(".")[0] not in OURS]


def preload(names: list[str]) -> int:
    loaded = 0
    for name in names:
        try:
            importlib.import_module(name)
            loaded += 1
        except Exception:  # an alias or a lazily made module: its package brings it when used
            continue
    return loaded


def serve(socket_path: str) -> int:
    """Answer starts until the process that started us ends; in a forked child, run the start's
    module and return its exit code."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the children do not inherit it
    loaded = preload(library_modules())
    path = Path(socket_path)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    print(f"service zygote (pid {os.getpid()}): {loaded} library modules imported; listening on {path}", flush=True)
    while True:
        connection, _ = listener.accept()
        try:
            request = json.loads(connection.makefile("rb").readline())
            if request["argv"][:1] != ["-m"] or request["argv"][1] not in MODULES:
                raise ValueError(f"not a start this zygote makes: {request['argv']!r}")
            differ = imported_differently(request["env"])
            if differ:
                raise ValueError(f"the libraries here were imported with other values of {', '.join(differ)}")
            pid = os.fork()
            if pid == 0:
                break  # the child: out of the loop, so that nothing of its own is taken for a failed request
            connection.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"service zygote: a request refused: {exc}", flush=True)
            with contextlib.suppress(OSError):
                connection.sendall(json.dumps({"refused": str(exc)}).encode() + b"\n")
        finally:
            connection.close()
    listener.close()
    return run(request)


def imported_differently(env: dict[str, str]) -> list[str]:
    names = {name for name in (*env, *os.environ) if name.startswith(READ_AT_IMPORT)}
    return sorted(name for name in names if env.get(name) != os.environ.get(name))


def run(request: dict[str, Any]) -> int:
    """In the child: become `python <argv>` (a module run as __main__), as Popen would have started it."""
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in request["env"].items()})
    os.chdir(request["cwd"])
    log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(devnull)
    module = request["argv"][1]
    # A name of its own in /proc/PID/comm (its command line stays the zygote's): `top` and
    # scripts/cpu_by_process.py tell the API from the worker by it.
    name_process(f"zygote:{module}")
    sys.argv = [module, *request["argv"][2:]]  # runpy puts the module's path first, as `python -m` does
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m scripts.service_zygote SOCKET", file=sys.stderr)
        return 2
    return serve(argv[1])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
