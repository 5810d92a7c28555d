"""`python -m trainer JOB_ID`: the trainer child process the worker starts for each job."""

import os
import sys

from trainer.run import main

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(sys.argv))
