"""The HTTP API process: validates job specs, stores jobs, enqueues them, serves results.

Nothing under app/ imports torch or the worker package."""
