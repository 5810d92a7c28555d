"""The worker process: an RQ worker bound to one GPU (`python -m worker`). It claims a job,
starts the trainer child process for it (`python -m trainer JOB_ID`, the trainer package),
heartbeats it, carries cancels, and records how it ended. It imports core, never the API."""
