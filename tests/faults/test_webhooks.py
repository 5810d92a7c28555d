"""The API killed (SIGKILL) while it delivers a webhook: its claim on the delivery expires after
WEBHOOK_CLAIM_LEASE_S and the next API takes it back, and nothing it had not claimed yet waits
for it: every delivery arrives (at least once; receivers drop repeats by `webhook-id`)."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from sqlmodel import Session

from tests.conftest import wait_until
from tests.faults.conftest import Cluster

pytestmark = pytest.mark.slow

SECRET = "whsec_" + base64.b64encode(b"the operator's webhook key").decode()
DELIVERIES = 10


class BlockingReceiver:
    """Holds the first request it gets without answering (a receiver that hangs); answers 204 to
    every other, noting each `webhook-id` it acknowledged."""

    def __init__(self) -> None:
        self.first_arrived = threading.Event()
        self.release = threading.Event()
        self.acknowledged: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["content-length"]))
                if not receiver.first_arrived.is_set():
                    receiver.first_arrived.set()
                    receiver.release.wait(60)
                    return  # no answer at all: the sender is left waiting
                receiver.acknowledged.append(self.headers["webhook-id"])
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[BlockingReceiver]:
    made = BlockingReceiver()
    yield made
    made.release.set()
    made.server.shutdown()
    made.server.server_close()


def queue_deliveries(cluster: Cluster, url: str) -> int:
    """A job and its webhook deliveries, as a worker or trainer queues them while the API runs."""
    from core.db import make_engine
    from core.models import Job, JobStatus, WebhookDelivery

    engine = make_engine(f"sqlite:///{cluster.data_dir / 'jobs.db'}")
    try:
        with Session(engine) as session:
            job = Job(spec={"model": "org/m", "dataset": {"source": "org/d"}}, status=JobStatus.running)
            session.add(job)
            session.flush()
            assert job.id is not None
            for step in range(1, DELIVERIES + 1):
                payload = {"type": "progress", "job_id": job.id, "step": step}
                session.add(WebhookDelivery(job_id=job.id, url=url, event="progress", payload=payload))
            session.commit()
            return job.id
    finally:
        engine.dispose()


def test_api_killed_mid_delivery_loses_no_webhook(cluster: Cluster, receiver: BlockingReceiver) -> None:
    cluster.env.update({"WEBHOOK_ALLOWED_HOSTS": "127.0.0.1", "WEBHOOK_SECRET": SECRET, "WEBHOOK_CLAIM_LEASE_S": "2"})
    cluster.start_redis()
    cluster.migrate()
    job_id = queue_deliveries(cluster, receiver.url)

    first_api = cluster.start_api()
    assert receiver.first_arrived.wait(60), "the API never sent a webhook"
    first_api.kill()  # SIGKILL, mid-delivery: the receiver has not answered
    first_api.wait(10)

    cluster.start_api()
    expected = {f"msg_{n}" for n in range(1, DELIVERIES + 1)}
    wait_until(lambda: expected <= set(receiver.acknowledged), 120, "every delivery to arrive", interval_s=0.2)

    with httpx.Client(base_url=cluster.url, timeout=30) as http:
        deliveries = http.get(f"/jobs/{job_id}/webhooks").json()["items"]
    assert [d["status"] for d in deliveries] == ["delivered"] * DELIVERIES
    # The one the first API was sending when it died: taken back after its lease, sent again.
    retaken = [d for d in deliveries if d["attempts"] == 2]
    assert len(retaken) == 1, deliveries
    assert retaken[0]["claimed_by"].endswith(f":{cluster.api.pid}")  # type: ignore[union-attr]
    assert all(d["attempts"] == 1 for d in deliveries if d is not retaken[0])
