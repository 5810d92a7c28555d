"""Whether a spec's Hub ids can be had where its job will run: in this host's Hugging Face cache,
or from a Hub that answers. Asked at submit (app/sources.py), so a job that could only fail with
`model_not_found` once a trainer started is a 422 naming the id instead.

Only the cache's layout on disk and one bounded HTTP request, answered from memory for a while:
no torch, transformers or datasets in the API process. The workers are assumed to see the Hub and
the cache as the API does (one host, or a shared HF_HOME); HUB_CHECK_AT_SUBMIT=false turns it off."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from huggingface_hub import constants, get_session, try_to_load_from_cache

logger = logging.getLogger(__name__)

Kind = Literal["model", "tokenizer", "dataset"]
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# datasets' camelcase_to_snakecase (datasets.naming), which names a Hub dataset's cached builder.
_UPPER_UPPER = re.compile(r"([A-Z]+)([A-Z][a-z])")
_LOWER_UPPER = re.compile(r"([a-z\d])([A-Z])")


@dataclass(frozen=True)
class Reachability:
    reachable: bool
    why_not: str = ""  # a clause: "HF_HUB_OFFLINE is set on this server"


def hub_cache() -> Path:
    return Path(constants.HF_HUB_CACHE)


def datasets_cache() -> Path:
    """Where `datasets` keeps what it prepared from Hub datasets (its HF_DATASETS_CACHE)."""
    return Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")


def _offline(kind: Kind) -> bool:
    if constants.HF_HUB_OFFLINE:  # also set by TRANSFORMERS_OFFLINE
        return True
    flag = os.environ.get("HF_DATASETS_OFFLINE", "").strip().upper()
    return kind == "dataset" and flag in {"1", "ON", "YES", "TRUE"}


def _all_shards(snapshot: Path, index: Path) -> bool:
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return False
    return all((snapshot / name).exists() for name in shards)


def cache_gap(repo_id: str, kind: Kind) -> str | None:
    """None when the cache holds what a trainer needs of this Hub id, offline; else what is
    missing, as a clause ("it is not in ...", "its weights are not in ...")."""
    if kind == "dataset":
        # What datasets loads offline: a builder prepared by an earlier load_dataset, named as
        # datasets.load.CachedDatasetModuleFactory looks for it.
        *namespace, name = repo_id.split("/")
        snake = _LOWER_UPPER.sub(r"\1_\2", _UPPER_UPPER.sub(r"\1_\2", name)).lower()
        root = datasets_cache() / "___".join([*namespace, snake])
        if any(p.is_dir() for p in root.glob("*/*/*")):
            return None
        return f"it has not been loaded into the datasets cache ({datasets_cache()}) before"
    first = "config.json" if kind == "model" else "tokenizer_config.json"
    found = try_to_load_from_cache(repo_id, first, cache_dir=hub_cache())
    if not isinstance(found, str):
        if kind == "tokenizer":
            found = try_to_load_from_cache(repo_id, "tokenizer.json", cache_dir=hub_cache())
        if not isinstance(found, str):
            return f"it is not in the Hugging Face cache ({hub_cache()})"
    snapshot = Path(found).parent
    if kind == "model":
        weights = any((snapshot / name).exists() for name in WEIGHT_FILES) or any(
            _all_shards(snapshot, snapshot / name) for name in WEIGHT_INDEXES if (snapshot / name).exists()
        )
        if not weights:
            return f"only its config.json is in the Hugging Face cache ({hub_cache()}), not all of its weights"
    if not any((snapshot / name).exists() for name in TOKENIZER_FILES):
        return f"its tokenizer is not in the Hugging Face cache ({hub_cache()})"
    return None


class HubProbe:
    """One HEAD request to HF_ENDPOINT at a time, in a thread of its own, its answer kept for
    HUB_PROBE_INTERVAL_S: a submit waits at most HUB_PROBE_TIMEOUT_S for it, even where the
    name lookup hangs (httpx's timeouts do not bound getaddrinfo)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._answers: dict[str, tuple[float, Reachability]] = {}
        self._in_flight: dict[str, Future[Reachability]] = {}

    def ask(self, endpoint: str, *, timeout_s: float, interval_s: float) -> Reachability:
        with self._lock:
            known = self._answers.get(endpoint)
            if known is not None and time.monotonic() - known[0] < interval_s:
                return known[1]
            future = self._in_flight.get(endpoint)
            if future is None:
                future = self._in_flight[endpoint] = Future()
                threading.Thread(
                    target=self._probe, args=(endpoint, timeout_s, future), name="hub-probe", daemon=True
                ).start()
        try:
            return future.result(timeout=timeout_s)
        except FutureTimeout:
            answer = Reachability(False, f"the Hub ({endpoint}) did not answer within {timeout_s:g} s")
            with self._lock:  # later submits need not wait too; the probe's own answer replaces it
                if endpoint in self._in_flight:
                    self._answers[endpoint] = (time.monotonic(), answer)
            return answer

    def _probe(self, endpoint: str, timeout_s: float, future: Future[Reachability]) -> None:
        try:
            get_session().head(endpoint, timeout=timeout_s)
            answer = Reachability(True)
        except Exception as exc:  # httpx.HTTPError, OSError: any answer at all means reachable
            if isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__:  # httpx's ReadTimeout, ...
                # The same words as the submit's own wait, whichever of the two ends first.
                answer = Reachability(False, f"the Hub ({endpoint}) did not answer within {timeout_s:g} s")
            else:
                answer = Reachability(False, f"the Hub ({endpoint}) could not be reached ({type(exc).__name__})")
        logger.info("the Hub at %s is %s", endpoint, "reachable" if answer.reachable else "unreachable")
        with self._lock:
            self._answers[endpoint] = (time.monotonic(), answer)
            self._in_flight.pop(endpoint, None)
        future.set_result(answer)


PROBE = HubProbe()


def reachability(kind: Kind, *, timeout_s: float, interval_s: float) -> Reachability:
    if _offline(kind):
        variable = "HF_HUB_OFFLINE" if constants.HF_HUB_OFFLINE else "HF_DATASETS_OFFLINE"
        return Reachability(False, f"{variable} is set on this server")
    return PROBE.ask(constants.ENDPOINT, timeout_s=timeout_s, interval_s=interval_s)
