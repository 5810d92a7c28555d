"""`python -m trainer JOB_ID`: the trainer child process the worker starts for each job; `python -m trainer
--standby`: one started ahead of its job, with its imports done (trainer/standby.py); `python -m trainer
--forkserver SOCKET`: on a host without GPUs, imports once and forks each job's trainer, and the
worker's standby (trainer/forkserver.py)."""

import time

STARTED = time.monotonic()  # before any import: the interpreter's own start is all that precedes it

import faulthandler  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # `kill -QUIT <trainer pid>` writes every thread's Python stack into the trainer's log (stderr)
    # and training goes on: how to see where a rank that makes no progress is (docs/scheduling.md).
    # (SIGUSR1 and SIGUSR2 are the worker's cancel and pause: one signal never means two things.)
    faulthandler.register(signal.SIGQUIT, all_threads=True)
    if sys.argv[1:] == ["--standby"]:
        from trainer.standby import serve

        sys.exit(serve(sys.argv[0]))
    if sys.argv[1:2] == ["--forkserver"]:
        from trainer import forkserver

        sys.exit(forkserver.main(sys.argv))
    from trainer.run import main

    sys.exit(main(sys.argv, started=STARTED))
