"""`python -m worker`: an RQ worker for one GPU (set CUDA_VISIBLE_DEVICES to bind it)."""

from __future__ import annotations

import logging
import os
from typing import Annotated

import typer
from rq import Worker

from app.config import get_settings
from app.queue import get_queue, get_redis, register_gpu_memory
from app.reconcile import reconcile

logger = logging.getLogger("worker")
cli = typer.Typer(add_completion=False, help=__doc__)


def visible_gpu_memory() -> int | None:
    """Total memory of the first GPU this worker may use, from NVML (no CUDA initialised)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
        if visible.startswith(("GPU-", "MIG-")):
            handle = pynvml.nvmlDeviceGetHandleByUUID(visible)
        elif visible.isdigit():
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible))
        else:
            return None
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
    except Exception:  # no NVIDIA driver: a CPU worker plans nothing
        return None


class FinetuneWorker(Worker):
    """RQ's forking worker, with our reconcile pass added to its periodic maintenance, and a
    note in Redis of its GPU's size so the API can refuse jobs that cannot fit it."""

    gpu_memory_bytes: int | None = None

    def register_gpu(self) -> None:
        if self.gpu_memory_bytes:
            ttl = max(60, 3 * int(get_settings().reconcile_interval_s))
            register_gpu_memory(self.connection, self.name, self.gpu_memory_bytes, ttl)

    def run_maintenance_tasks(self) -> None:
        super().run_maintenance_tasks()
        self.register_gpu()
        try:
            counts = reconcile(self.connection)
            if any(counts.values()):
                logger.info("reconcile: %s", counts)
        except Exception:
            logger.exception("reconcile failed; will try again at the next maintenance")


@cli.command()
def main(
    burst: Annotated[bool, typer.Option(help="exit once the queue is empty (tests, one-off runs)")] = False,
    name: Annotated[str | None, typer.Option(help="worker name shown in RQ (default: host, GPU and pid)")] = None,
) -> None:
    settings = get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    connection = get_redis()
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
    worker = FinetuneWorker(
        [get_queue(connection)], connection=connection,
        name=name or f"{os.uname().nodename}-gpu{gpus.replace(',', '_')}-{os.getpid()}",
        maintenance_interval=max(1, int(settings.reconcile_interval_s)),
    )
    worker.gpu_memory_bytes = visible_gpu_memory()
    logger.info("worker %s on queue %r (GPUs: %s, %s; data under %s)", worker.name, settings.queue_name, gpus,
                f"{worker.gpu_memory_bytes / 2**30:.1f} GiB" if worker.gpu_memory_bytes else "no GPU memory known",
                settings.data_dir.resolve())
    worker.work(burst=burst, with_scheduler=False)


if __name__ == "__main__":
    cli()
