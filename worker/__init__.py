"""The worker process (an RQ worker bound to one GPU) and the trainer child it starts per job.

Only worker/trainer.py and what it imports load torch; the worker process itself stays
CUDA-free, because CUDA cannot be initialised before a fork."""
