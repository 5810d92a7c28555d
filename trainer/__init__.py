"""The trainer: the child process a worker starts for one job (`python -m trainer JOB_ID`).

The job's spec to TRL's SFTConfig, its data, the reporting callback, checkpoints written whole or
not at all, and what went wrong in words. It imports core (the models, the contract, the store)
and the training libraries, never the API (FastAPI, Starlette) nor the queue (RQ): a test holds it.
Only this package loads torch; the worker stays CUDA-free, because CUDA cannot be initialised
before a fork."""
