"""A real S3 API server process for the shared-store tests: moto's standalone server (`moto_server`,
from moto[server] on PyPI), a process of its own on a loopback port that the store reaches over
HTTP as it would MinIO or AWS. (MinIO's server is on none of the registries this project may use:
its PyPI and npm packages are clients.)"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx

from scripts.service_harness import START_TIMEOUT_S, free_port, unmeasured_environment, wait_until

REGION = "us-east-1"


@dataclass
class S3Server:
    process: subprocess.Popen[bytes]
    endpoint: str
    log: Path

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach it through the AWS client's own variables."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "test-key",
            "AWS_SECRET_ACCESS_KEY": "test-secret",
            "AWS_DEFAULT_REGION": REGION,
        }

    def create_bucket(self, name: str) -> str:
        response = httpx.put(f"{self.endpoint}/{name}", timeout=10)
        assert response.status_code == 200, response.text
        return name

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


def start_s3_server(workdir: Path) -> S3Server:
    binary = shutil.which("moto_server")
    assert binary is not None, "moto_server is not installed (moto[server], a dev dependency)"
    port = free_port()
    log = workdir / "moto_server.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [binary, "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=unmeasured_environment(),  # moto's code is not ours to measure
        )
    server = S3Server(process, f"http://127.0.0.1:{port}", log)

    def answers() -> bool:
        try:
            return httpx.get(f"{server.endpoint}/", timeout=1, verify=False).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(answers, START_TIMEOUT_S, "moto_server to answer")
    except AssertionError:
        server.stop()
        raise
    return server
