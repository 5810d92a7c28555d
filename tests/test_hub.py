"""A Hub id that the workers cannot get (not in the Hugging Face cache, and the Hub unreachable) is
a 422 at submit naming the id and why, not a `model_not_found` a minute after a trainer started.
The tests run offline (HF_HUB_OFFLINE), with their own cache (conftest's hf_home); the Hub's
answers to the reachability probe come from local sockets standing in for it."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from app import hub
from tests.builders import cache_hub_dataset, cache_hub_model, chat_rows
from tests.conftest import HUB_DATASET, HUB_MODEL, Env, clear_caches, job_spec, run_to_end


def hub_cache(env: Env) -> Path:
    return Path(env.vars["HF_HUB_CACHE"])


def refusals(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 422, response.text
    return {error["field"]: error["message"] for error in response.json()["errors"]}


def test_hub_ids_not_in_the_cache_are_refused_offline_each_named(client: httpx.Client, env: Env) -> None:
    spec = {
        "model": "test-org/not-downloaded",
        "chat_template_from": "test-org/no-tokenizer-here",
        "dataset": {"source": "test-org/never-loaded"},
        "validation": {"source": HUB_DATASET},
    }
    errors = refusals(client.post("/jobs", json=spec))
    cache = hub_cache(env)
    assert errors == {
        "model": (
            f"model 'test-org/not-downloaded' is a Hub id that this server cannot get: it is not in the Hugging "
            f"Face cache ({cache}), and HF_HUB_OFFLINE is set on this server; download it where the workers read "
            "the cache (`hf download test-org/not-downloaded`, with the HF_HOME they use), or name a model folder "
            "under ALLOWED_LOCAL_ROOTS"
        ),
        "chat_template_from": (
            f"chat_template_from 'test-org/no-tokenizer-here' is a Hub id that this server cannot get: it is not in "
            f"the Hugging Face cache ({cache}), and HF_HUB_OFFLINE is set on this server; download it where the "
            "workers read the cache (`hf download test-org/no-tokenizer-here`, with the HF_HOME they use), or name "
            "a model folder under ALLOWED_LOCAL_ROOTS"
        ),
        "dataset.source": (
            "dataset source 'test-org/never-loaded' is a Hub id that this server cannot get: it has not been loaded "
            f"into the datasets cache ({env.vars['HF_DATASETS_CACHE']}) before, and HF_HUB_OFFLINE is set on this "
            "server; load it once with datasets.load_dataset('test-org/never-loaded') where the Hub is reachable, "
            "with the HF_HOME the workers use, or upload its rows (POST /files) and give dataset.file_id"
        ),
    }
    assert client.get("/jobs").json()["items"] == []


def test_hub_ids_in_the_cache_are_accepted_offline(client: httpx.Client, env: Env) -> None:
    spec = {"model": HUB_MODEL, "chat_template_from": HUB_MODEL, "dataset": {"source": HUB_DATASET}}
    response = client.post("/jobs", json=spec)
    assert response.status_code == 201, response.text
    assert response.json()["spec"]["model"] == HUB_MODEL


def test_a_model_cached_in_part_is_refused_naming_what_is_missing(client: httpx.Client, env: Env) -> None:
    config = json.dumps({"model_type": "llama"}).encode()
    # POST /jobs/estimate with the Hub reachable downloads config.json alone: not a model yet.
    cache_hub_model(hub_cache(env), "test-org/config-only", {"config.json": config})
    index = json.dumps({"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}).encode()
    cache_hub_model(
        hub_cache(env),
        "test-org/one-shard-of-two",
        {"config.json": config, "model.safetensors.index.json": index, "model-1.safetensors": b""},
    )
    cache_hub_model(hub_cache(env), "test-org/no-tokenizer", {"config.json": config, "model.safetensors": b""})
    cache = hub_cache(env)
    for model, missing in [
        (
            "test-org/config-only",
            f"only its config.json is in the Hugging Face cache ({cache}), not all of its weights",
        ),
        ("test-org/one-shard-of-two", f"only its config.json is in the Hugging Face cache ({cache})"),
        ("test-org/no-tokenizer", f"its tokenizer is not in the Hugging Face cache ({cache})"),
    ]:
        message = refusals(client.post("/jobs", json={"model": model, "dataset": {"source": HUB_DATASET}}))["model"]
        assert f"model {model!r} is a Hub id that this server cannot get: {missing}" in message


def test_the_datasets_cache_is_read_as_datasets_reads_it_offline(client: httpx.Client, env: Env) -> None:
    from datasets.load import CachedDatasetModuleFactory
    from datasets.naming import camelcase_to_snakecase

    folder = Path(env.vars["HF_DATASETS_CACHE"]) / f"test-org___{camelcase_to_snakecase('SomeChatSet')}"
    (folder / "default" / "0.0.0" / "abc").mkdir(parents=True)
    CachedDatasetModuleFactory("test-org/SomeChatSet", cache_dir=env.vars["HF_DATASETS_CACHE"]).get_module()
    response = client.post("/jobs", json={"model": HUB_MODEL, "dataset": {"source": "test-org/SomeChatSet"}})
    assert response.status_code == 201, response.text


def test_the_v1_route_refuses_an_uncached_model_naming_its_param(client: httpx.Client, env: Env) -> None:
    content = "".join(json.dumps(row) + "\n" for row in chat_rows(4)).encode()
    file_id = client.post("/v1/files", files={"file": ("c.jsonl", content)}, data={"purpose": "fine-tune"}).json()["id"]
    response = client.post("/v1/fine_tuning/jobs", json={"model": "test-org/not-downloaded", "training_file": file_id})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "model" and "HF_HUB_OFFLINE is set on this server" in error["message"]


def test_the_check_can_be_turned_off(client: httpx.Client, env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUB_CHECK_AT_SUBMIT", "false")
    clear_caches()
    response = client.post("/jobs", json={"model": "test-org/not-downloaded", "dataset": {"source": HUB_DATASET}})
    assert response.status_code == 201, response.text


@pytest.mark.slow  # it trains
def test_a_hub_model_and_dataset_from_the_cache_train_offline(client: httpx.Client, env: Env, tiny_model: Path) -> None:
    """The cache holds what the trainer needs when the check says it does: the same ids train."""
    cache_hub_model(hub_cache(env), "test-org/tiny-llama", tiny_model)
    cache_hub_dataset(Path(env.vars["HF_DATASETS_CACHE"]), "test-org/tiny-chat", chat_rows(16))
    spec = job_spec(tiny_model, Path("unused"), max_steps=2, save_steps=2)
    spec.update(model="test-org/tiny-llama", chat_template_from="test-org/tiny-llama")
    spec["dataset"] = {"source": "test-org/tiny-chat"}
    record = run_to_end(client, spec)
    assert record["status"] == "succeeded", record["error"]


# --- when the server is not told it is offline: a probe of HF_ENDPOINT ---------------------------


@pytest.fixture
def online(env: Env, monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """The API as on a host without HF_HUB_OFFLINE: it asks the Hub (HF_ENDPOINT) whether it answers."""
    import huggingface_hub.constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HUB_PROBE_TIMEOUT_S", "0.5")
    monkeypatch.setattr(hub, "PROBE", hub.HubProbe())  # no answer kept from another test
    clear_caches()
    yield monkeypatch


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_hub_is_probed_and_the_uncached_model_refused(
    client: httpx.Client, online: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    endpoint = f"http://127.0.0.1:{closed_port()}"
    online.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    message = refusals(
        client.post("/jobs", json={"model": "test-org/not-downloaded", "dataset": {"source": HUB_DATASET}})
    )
    assert f"and the Hub ({endpoint}) could not be reached (ConnectError); download it" in message["model"]


def test_a_hub_that_never_answers_costs_a_submit_at_most_the_probe_timeout(
    client: httpx.Client, online: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    with socket.socket() as silent:  # accepts connections (the kernel does) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        online.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
        spec = {"model": "test-org/not-downloaded", "dataset": {"source": HUB_DATASET}}
        message = refusals(client.post("/jobs", json=spec))["model"]
    assert f"and the Hub ({endpoint}) did not answer within 0.5 s; download it" in message


def test_a_reachable_hub_accepts_an_uncached_model_and_is_asked_once_a_while(
    client: httpx.Client, online: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    asked: list[str] = []

    class Hub(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            asked.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        online.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        for _ in range(3):
            response = client.post(
                "/jobs", json={"model": "test-org/downloaded-by-the-worker", "dataset": {"source": HUB_DATASET}}
            )
            assert response.status_code == 201, response.text
    finally:
        server.shutdown()
        server.server_close()
    assert asked == ["/"]  # one probe for three submits (HUB_PROBE_INTERVAL_S)
