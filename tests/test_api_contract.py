"""What the published contract promises beyond the happy path: inputs a fuzzer finds answered
with a 4xx naming what was wrong (never a 500), 405s that list what a path takes, a database that
cannot answer said as a 503, /healthz that watches the disk, and the docs usable with tokens on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import HUB_DATASET, HUB_MODEL, HUB_SPEC, Env

TOO_BIG = 2**63  # one past the largest integer the database holds
SPEC = HUB_SPEC  # Hub ids in the tests' Hugging Face cache


def with_tokens(monkeypatch: pytest.MonkeyPatch, tokens: str) -> None:
    from core.config import get_settings

    monkeypatch.setenv("API_TOKENS", tokens)
    get_settings.cache_clear()


@pytest.mark.parametrize(
    "path",
    [
        f"/jobs/{TOO_BIG}",
        f"/jobs/{TOO_BIG}/logs",
        f"/jobs/{TOO_BIG}/events",
        f"/jobs/{TOO_BIG}/checkpoints",
        f"/jobs/{TOO_BIG}/checkpoints/final",
        f"/files/{TOO_BIG}",
        f"/jobs?cursor={TOO_BIG}",
        f"/jobs/1/logs?after_step={TOO_BIG}",
        f"/jobs/1/events?after_id={TOO_BIG}",
        f"/jobs/1/stream?after_step={TOO_BIG}",
    ],
)
def test_integers_past_the_database_range_are_422_naming_the_parameter(
    client: httpx.Client, env: Env, path: str
) -> None:
    response = client.get(path)
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["message"] == "Input should be less than or equal to 9223372036854775807"


def test_a_file_id_past_the_database_range_is_422(client: httpx.Client, env: Env) -> None:
    response = client.post("/jobs", json={"model": "org/m", "dataset": {"file_id": TOO_BIG}})
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "dataset.file_id"


@pytest.mark.parametrize("field", ["model", "dataset.source", "chat_template_from", "validation.source"])
def test_a_home_folder_that_does_not_exist_is_422(client: httpx.Client, env: Env, field: str) -> None:
    spec: dict = {"model": HUB_MODEL, "dataset": {"source": HUB_DATASET}}
    value = "~nosuchuser/models/x"
    if field == "dataset.source":
        spec["dataset"] = {"source": value}
    elif field == "validation.source":
        spec["validation"] = {"source": value}
    else:
        spec[field] = value
    response = client.post("/jobs", json=spec)
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["message"].endswith(
        f"{value!r} names a home folder that does not exist on the server"
    )


def test_get_on_the_estimate_route_is_405_with_allow(client: httpx.Client, env: Env) -> None:
    response = client.get("/jobs/estimate")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.json() == {"error": "MethodNotAllowed", "detail": "/jobs/estimate does not take GET; it takes POST"}


def test_405_lists_every_method_of_the_path(client: httpx.Client, env: Env) -> None:
    assert client.request("PATCH", "/jobs").headers["allow"] == "GET, POST"
    assert client.request("OPTIONS", "/files/1").headers["allow"] == "GET, DELETE"
    assert client.request("PUT", "/jobs/1").headers["allow"] == "GET, DELETE"


@pytest.mark.parametrize("path", ["/jobs/abc", "/jobs/%0B3", "/jobs/+3", "/jobs/3_0", "/jobs/%203"])
def test_a_job_id_not_written_in_digits_is_422(client: httpx.Client, env: Env, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "job_id"


def test_an_unknown_query_parameter_is_422_naming_it(client: httpx.Client, env: Env) -> None:
    response = client.get("/jobs", params={"limt": 10})
    assert response.status_code == 422
    assert response.json()["errors"] == [
        {"field": "limt", "message": "unknown query parameter (this route takes: cursor, fields, limit, status)"}
    ]


def test_a_body_that_is_not_text_is_422_not_400(client: httpx.Client, env: Env) -> None:
    response = client.post("/jobs", content=b"\x1f\x8b\xff\xfe", headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["errors"] == [
        {"field": "body", "message": "the body could not be read as JSON (it is not UTF-8 text)"}
    ]


def test_a_database_that_cannot_answer_is_503_not_500(
    client: httpx.Client, env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.config import get_settings
    from core.db import get_engine

    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/no/such/folder/jobs.db")
    get_settings.cache_clear()
    get_engine.cache_clear()
    response = client.get("/jobs")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json() == {
        "error": "DatabaseUnavailable",
        "detail": "the job database cannot answer right now (OperationalError); retry shortly",
    }


def test_healthz_is_degraded_when_the_disk_is_low(
    client: httpx.Client, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.config import get_settings

    monkeypatch.setenv("MIN_FREE_DISK_BYTES", str(2**62))  # more than any disk has
    get_settings.cache_clear()
    response = client.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert (body["status"], body["database"], body["redis"]) == ("degraded", "ok", "ok")
    assert body["disk"].startswith(f"low: {body['disk_free_bytes'] / 2**30:.2f} GiB free of ")
    assert body["disk"].endswith("under MIN_FREE_DISK_BYTES (4294967296.00 GiB)")


def test_docs_stay_open_with_tokens_and_declare_the_bearer_scheme(
    client: httpx.Client, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_tokens(monkeypatch, "s3cret")
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text
    assert '"persistAuthorization": true' in docs.text  # a person authorizes once
    assert client.get("/redoc").status_code == 200
    document = client.get("/openapi.json").json()
    assert document["components"]["securitySchemes"] == {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "one of the server's API_TOKENS (needed only when the operator sets some)",
        }
    }
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            guarded = operation.get("security") == [{"bearer": []}]
            assert guarded == (path != "/healthz"), (method, path)
            assert ("401" in operation["responses"]) == guarded, (method, path)
    # What Swagger UI's Authorize does: the same header on every call.
    assert client.get("/jobs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.post("/jobs", json=SPEC, headers={"Authorization": "Bearer s3cret"}).status_code == 201


def test_without_tokens_the_document_asks_for_none(client: httpx.Client, env: Env) -> None:
    document = client.get("/openapi.json").json()
    assert "securitySchemes" not in document.get("components", {})
    assert all(
        "security" not in op and "401" not in op["responses"]
        for operations in document["paths"].values()
        for op in operations.values()
    )


def test_401_says_which_scheme_and_odd_tokens_are_refused_not_crashed(
    client: httpx.Client, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_tokens(monkeypatch, "s3cret")
    missing = client.get("/jobs")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="finetune"'
    odd = client.get("/jobs", headers={"Authorization": "Bearer caf\u00e9".encode("latin-1")})  # type: ignore[dict-item]
    assert odd.status_code == 401
    assert odd.json()["detail"] == "the bearer token is not one of this server's API_TOKENS"
    assert client.get("/jobs", headers={"Authorization": "Basic czNjcmV0"}).status_code == 401


def test_every_error_status_a_route_answers_is_in_the_document(client: httpx.Client, env: Env) -> None:
    document = client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    assert set(schemas["ValidationErrorBody"]["required"]) == {"error", "detail"}
    paths = document["paths"]
    assert set(paths["/files"]["post"]["responses"]) >= {"201", "413", "422", "503", "507"}
    download = paths["/jobs/{job_id}/checkpoints/{name}/files/{path}"]["get"]["responses"]
    assert set(download) >= {"200", "206", "400", "404", "416", "422", "503"}
    assert set(paths["/jobs/{job_id}/cancel"]["post"]["responses"]) >= {"200", "404", "409", "422", "503"}
    assert paths["/jobs"]["post"]["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ValidationErrorBody"
    }
    assert set(paths["/healthz"]["get"]["responses"]) == {"200", "503"}


def test_docs_and_redoc_load_every_asset_from_this_host(client: httpx.Client, env: Env) -> None:
    """A GPU host often has no internet: the pages name no other host, and each asset they load
    is served here."""
    import re

    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        assert "cdn." not in html and "fonts.googleapis" not in html, page
        assets = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert assets, page
        for url in assets:
            assert url.startswith("/docs-assets/"), (page, url)
            response = client.get(url)
            assert response.status_code == 200 and len(response.content) > 1000, (page, url)
    assert "/docs-assets" not in client.get("/openapi.json").json()["paths"]


def test_docs_show_the_summary_sentence_once(client: httpx.Client, env: Env) -> None:
    """Swagger UI and ReDoc show the summary, then the description beneath it."""
    info = client.get("/openapi.json").json()["info"]
    assert info["summary"].startswith("Queue, run and watch full fine-tuning jobs")
    assert info["summary"] not in info["description"]
    assert info["description"].startswith("The `/v1` routes are an OpenAI-compatible view")


def test_deeply_nested_json_is_422_saying_so_and_only_after_the_token(
    client: httpx.Client, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_tokens(monkeypatch, "s3cret")
    nested = b"[" * 100_000 + b"]" * 100_000
    headers = {"content-type": "application/json"}
    assert client.post("/jobs", content=nested, headers=headers).status_code == 401
    assert client.post("/v1/fine_tuning/jobs", content=nested, headers=headers).status_code == 401
    message = (
        "the body could not be read as JSON: it nests arrays or objects deeper than the parser allows "
        "(a job spec needs a few levels)"
    )
    headers["authorization"] = "Bearer s3cret"
    response = client.post("/jobs", content=nested, headers=headers)
    assert (response.status_code, response.json()["errors"]) == (422, [{"field": "body", "message": message}])
    response = client.post("/v1/fine_tuning/jobs", content=nested, headers=headers)
    assert (response.status_code, response.json()["error"]["message"]) == (422, f"body: {message}")


def test_errors_quote_only_a_slice_of_what_was_sent(client: httpx.Client, env: Env) -> None:
    long_name = "x" * 900_000  # under MAX_JSON_BODY_BYTES
    response = client.post("/jobs", json={**SPEC, "model": long_name})
    assert response.status_code == 422
    assert len(response.content) < 2_000
    assert response.json()["errors"] == [
        {
            "field": "model",
            "message": "model '" + "x" * 199 + "... (cut, 900,000 characters) is neither a Hugging Face Hub id "
            "(like 'org/name') nor a local path (starting with '/')",
        }
    ]
    # A local path: checked against the allowed roots, and quoted as briefly.
    response = client.post("/jobs", json={**SPEC, "model": f"{env.datasets_dir}/{long_name}"})
    assert response.status_code == 422 and len(response.content) < 2_000
    assert "... (cut, " in response.json()["detail"]
    # Many bad values: the first 50 are named, the rest counted.
    columns = {f"c{i}": i for i in range(10_000)}
    response = client.post("/jobs", json={**SPEC, "dataset": {"source": "a/b", "columns": columns}})
    errors = response.json()["errors"]
    assert response.status_code == 422 and len(response.content) < 10_000
    assert len(errors) == 51 and errors[-1] == {"field": "body", "message": "and 9950 more problem(s) not listed"}


def test_a_local_path_longer_than_the_filesystem_allows_is_422_not_500(client: httpx.Client, env: Env) -> None:
    for path in (f"{env.datasets_dir}/{'x' * 5000}", f"{env.datasets_dir}/{'x/' * 3000}"):
        response = client.post("/jobs", json={**SPEC, "dataset": {"source": path}})
        assert response.status_code == 422
        assert response.json()["errors"][0]["message"].endswith(
            " cannot be looked up on the server (File name too long)"
        )


def test_a_json_body_over_its_limit_is_413_naming_it_with_or_without_a_content_length(
    client: httpx.Client, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.config import get_settings

    monkeypatch.setenv("MAX_JSON_BODY_BYTES", "4096")
    get_settings.cache_clear()
    body = json.dumps({**SPEC, "model": "x" * 5000}).encode()
    limit = "the request body is larger than this server's limit for JSON bodies, 4,096 bytes (MAX_JSON_BODY_BYTES)"
    declared = client.post("/jobs", content=body, headers={"content-type": "application/json"})
    assert (declared.status_code, declared.headers["connection"]) == (413, "close")
    assert declared.json() == {
        "error": "PayloadTooLarge",
        "detail": f"{limit}; the request declares {len(body):,} bytes",
    }

    def chunks() -> Iterator[bytes]:  # chunked transfer: nothing to judge until the bytes arrive
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    streamed = client.post("/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert (streamed.status_code, streamed.headers["connection"]) == (413, "close")
    assert streamed.json() == {"error": "PayloadTooLarge", "detail": limit}
    openai = client.post("/v1/fine_tuning/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert openai.status_code == 413
    assert openai.json()["error"] == {
        "message": limit,
        "type": "invalid_request_error",
        "param": None,
        "code": "payload_too_large",
    }
    small = client.post("/jobs/estimate", json=SPEC)  # a body under the limit is read as before
    assert small.status_code != 413
