"""`python -m trainer JOB_ID`: the trainer child process the worker starts for each job."""

import time

STARTED = time.monotonic()  # before any import: the interpreter's own start is all that precedes it

import os  # noqa: E402
import sys  # noqa: E402

from trainer.run import main  # noqa: E402

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(sys.argv, started=STARTED))
