"""What the API, the worker and the trainer share: the typed contract, and (as it moves here)
the job store's models, the row rules and the planner. Nothing here imports FastAPI or RQ."""
