"""The reference the API's JSON routes are measured against: a trivial FastAPI app that answers
the same paths with the same bytes, stored before the load, from `async def` routes that do no
work. Run under the same uvicorn options as the API, it shows what uvicorn and FastAPI cost by
themselves on this machine; the API's distance from it is what its own work costs.

    LOAD_REFERENCE_BODIES=DIR .venv/bin/uvicorn bench.load.reference_app:app --port 8001

DIR holds manifest.json ({"/jobs/10000": "jobs-10000.json", ...}) and the bodies it names, as
bench/load/run.py stores them. Query strings are ignored (GET /jobs?limit=50 is GET /jobs).
Downloads have no route here: their reference is nginx serving the same file."""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response

from app import tcp_nodelay

# The API's work-around for uvicorn --workers leaving Nagle's algorithm on (app/tcp_nodelay.py):
# a server-level fix, so the reference gets it too and the ratios compare like with like.
tcp_nodelay.install()

BODIES_ENV = "LOAD_REFERENCE_BODIES"


def body_route(body: bytes) -> Callable[[], Awaitable[Response]]:
    async def serve() -> Response:
        return Response(content=body, media_type="application/json")

    return serve


def create_app(bodies_dir: Path) -> FastAPI:
    app = FastAPI(title="load benchmark reference", openapi_url=None, docs_url=None, redoc_url=None)
    manifest: dict[str, str] = json.loads((bodies_dir / "manifest.json").read_text())
    for path, name in manifest.items():
        app.add_api_route(path, body_route((bodies_dir / name).read_bytes()), methods=["GET"])
    return app


app = create_app(Path(os.environ[BODIES_ENV]))
