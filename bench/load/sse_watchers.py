"""Many clients following one running job's Server-Sent Events at once: what it costs the API and
the database to keep a thousand browsers on a job's watch page.

    .venv/bin/python bench/load/sse_watchers.py --url http://127.0.0.1:8000 --job-id 10000 \\
        --watchers 1000 --duration 20 [--from-start] [--ready-file F] [--out stats.json]

Each watcher is one raw asyncio connection (asyncio.open_connection, no HTTP library: a thousand
streams would cost more in the client than in the server) that sends
`GET /jobs/<id>/stream?after_step=<S>&after_event_id=<E> HTTP/1.1` with
`Accept: text/event-stream`, reads the
chunked body as it comes and parses its events just enough to count them: `log` events, whose
data's `created_at` gives the delivery delay (receive time minus the log's creation; the writer
runs on the same machine and clock), `job` and `event` events, and `: ping` comments.

S and E are the step the job's record shows and its newest event's id, read just before the
watchers connect, so each follows the job from where it is, as a watch page that reconnects
does; only logs created after a watcher sent its request count as live (their delays are the ones
reported), the few written between reading S and connecting are caught up and counted apart.
`--from-start` omits both, as a page opened for the first time does: each watcher then reads the
job's whole history first (the generated running job's 10,000 step logs and 100 events), which is
another measurement.

All watchers connect at once. Each stream's first event (the job record) comes once the API has
caught that watcher up on its own (one database read per watcher); when every watcher has had it,
or has failed, --ready-file is written ({"connected": N, "errors": M, "connect_s": ..,
"caught_up_s": ..}) and the watchers stay for --duration seconds more: the steady state (the
logs created from then on), where the API's one shared reader per job feeds them all. Then all
disconnect together. The summary (JSON, to --out and stdout) has the watchers connected,
connection errors by kind, streams the server ended early, the time to the response headers and
to the first event, log events per watcher (min/median/max, all live ones and those of the
steady state), the delivery delay's percentiles over all live logs and over the steady state
only, and the delays second by second from the first connection (when it lagged)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import statistics
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

CONNECT_TIMEOUT_S = 30.0
CATCH_UP_TIMEOUT_S = 120.0  # from the first connection until every watcher has had its first event
READ_SIZE = 64 * 1024
CREATED_AT = re.compile(rb'"created_at":"([^"]+)"')


class StreamEnded(Exception):
    """The server ended the body (the zero-length chunk) or closed the connection."""


class ChunkedBody:
    """Decodes a `Transfer-Encoding: chunked` body fed to it in pieces of any size."""

    def __init__(self) -> None:
        self.buffer = b""
        self.remaining = 0  # data bytes left in the current chunk
        self.need_crlf = False  # the CRLF after a chunk's data is still to come
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self.buffer += data
        out = []
        while self.buffer and not self.done:
            if self.remaining:
                piece = self.buffer[: self.remaining]
                out.append(piece)
                self.remaining -= len(piece)
                self.buffer = self.buffer[len(piece) :]
                if not self.remaining:
                    self.need_crlf = True
                continue
            if self.need_crlf:
                if len(self.buffer) < 2:
                    break
                self.buffer = self.buffer[2:]
                self.need_crlf = False
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                break
            size = int(self.buffer[:end].split(b";", 1)[0], 16)
            self.buffer = self.buffer[end + 2 :]
            if size == 0:
                self.done = True
            else:
                self.remaining = size
        return b"".join(out)


class EventParser:
    """Server-Sent Events as the API sends them (lines end in CRLF or LF; an empty line ends an
    event): yields (event name, data) for each event, and counts comment lines (`: ping`)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.event = b""
        self.data: list[bytes] = []
        self.comments = 0

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self.buffer += data
        events = []
        *lines, self.buffer = self.buffer.split(b"\n")
        for raw in lines:
            line = raw[:-1] if raw.endswith(b"\r") else raw
            if not line:
                if self.data or self.event:
                    events.append((self.event or b"message", b"\n".join(self.data)))
                self.event, self.data = b"", []
            elif line.startswith(b":"):
                self.comments += 1
            else:
                name, _, value = line.partition(b":")
                value = value[1:] if value.startswith(b" ") else value
                if name == b"event":
                    self.event = value
                elif name == b"data":
                    self.data.append(value)
        return events


@dataclass
class Watcher:
    index: int
    connected: bool = False
    error: str | None = None
    sent_at: float = 0.0  # wall clock, when the request was written
    headers_s: float | None = None  # from the request to the response headers
    first_event_s: float | None = None  # from the request to the first event (caught up)
    logs: int = 0
    caught_up_logs: int = 0  # logs created before the request: read from the job's history
    jobs: int = 0
    events: int = 0
    pings: int = 0
    ended_early: bool = False
    delays: list[float] = field(default_factory=list)
    received: list[float] = field(default_factory=list)  # wall clock of each delay's log


def parse_created_at(data: bytes) -> float | None:
    match = CREATED_AT.search(data)
    if match is None:
        return None
    return datetime.fromisoformat(match[1].decode()).timestamp()


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """The response's status and headers; returns what was read past them too."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = await reader.read(READ_SIZE)
        if not chunk:
            raise StreamEnded("connection closed before the response headers")
        buffer += chunk
    head, rest = buffer.split(b"\r\n\r\n", 1)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, rest


async def watch(watcher: Watcher, host: str, port: int, target: str, stop: asyncio.Event) -> None:
    writer = None
    try:
        started = time.monotonic()
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
        watcher.sent_at = time.time()
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n"
            "Cache-Control: no-cache\r\n\r\n".encode()
        )
        await writer.drain()
        status, headers, rest = await asyncio.wait_for(read_head(reader), CONNECT_TIMEOUT_S)
        if status != 200:
            raise StreamEnded(f"HTTP {status}")
        if "chunked" not in headers.get("transfer-encoding", ""):
            raise StreamEnded(f"not chunked: {headers}")
        watcher.connected = True
        watcher.headers_s = time.monotonic() - started
        body, parser = ChunkedBody(), EventParser()
        data = rest
        while True:
            received = time.time()
            events = parser.feed(body.feed(data))
            if events and watcher.first_event_s is None:
                watcher.first_event_s = time.monotonic() - started
            for name, payload in events:
                if name == b"log":
                    created = parse_created_at(payload)
                    if created is not None and created < watcher.sent_at:
                        watcher.caught_up_logs += 1
                    else:
                        watcher.logs += 1
                        if created is not None:
                            watcher.delays.append(received - created)
                            watcher.received.append(received)
                elif name == b"job":
                    watcher.jobs += 1
                elif name == b"event":
                    watcher.events += 1
            watcher.pings = parser.comments
            if body.done:
                raise StreamEnded("the server ended the stream")
            if stop.is_set():
                return
            data = await reader.read(READ_SIZE)
            if not data:
                raise StreamEnded("connection closed by the server")
    except asyncio.CancelledError:  # the run is over: this watcher leaves
        pass
    except StreamEnded as exc:
        if watcher.connected:
            watcher.ended_early = not stop.is_set()
            if watcher.ended_early:
                watcher.error = str(exc)
        else:
            watcher.error = str(exc)
    except (OSError, TimeoutError, ValueError) as exc:
        watcher.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        watcher.ended_early = watcher.connected
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def percentile(sorted_values: list[float], share: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(share * len(sorted_values)))]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def tail_query(base: str, job_id: int) -> str:
    """?after_step=S&after_event_id=E: the job's step and newest event id now."""
    step = int(get_json(f"{base}/jobs/{job_id}")["progress"]["step"])
    event_id = after = None
    while True:
        page = get_json(f"{base}/jobs/{job_id}/events?limit=5000" + (f"&after_id={after}" if after else ""))
        if page["items"]:
            event_id = page["items"][-1]["id"]
        if page["next_after_id"] is None:
            break
        after = page["next_after_id"]
    return f"?after_step={step}" + ("" if event_id is None else f"&after_event_id={event_id}")


def by_second(watchers: list[Watcher], start: float) -> list[dict[str, Any]]:
    """The delays of the logs received in each second from `start` (wall clock): when it lagged."""
    seconds: dict[int, list[float]] = {}
    for w in watchers:
        for received, delay in zip(w.received, w.delays, strict=True):
            seconds.setdefault(int(received - start), []).append(delay)
    out = []
    for second in sorted(seconds):
        delays = sorted(seconds[second])
        out.append(
            {
                "second": second,
                "logs": len(delays),
                "p50_ms": round(1000 * delays[len(delays) // 2], 1),
                "max_ms": round(1000 * delays[-1], 1),
            }
        )
    return out


def delay_percentiles(delays: list[float]) -> dict[str, float | None]:
    delays = sorted(delays)

    def ms(value: float | None) -> float | None:
        return None if value is None else round(1000 * value, 1)

    return {
        "logs": len(delays),
        "p50": ms(percentile(delays, 0.5)),
        "p90": ms(percentile(delays, 0.9)),
        "p99": ms(percentile(delays, 0.99)),
        "max": ms(delays[-1] if delays else None),
        "min": ms(delays[0] if delays else None),
    }


def summary(
    watchers: list[Watcher],
    args: argparse.Namespace,
    target: str,
    phases: dict[str, float],
    start: float,
    steady_from: float,
) -> dict[str, Any]:
    connected = [w for w in watchers if w.connected]
    errors: dict[str, int] = {}
    for w in watchers:
        if w.error and not w.connected:
            key = re.sub(r"\d+", "N", w.error)[:120]
            errors[key] = errors.get(key, 0) + 1
    ended = [w for w in connected if w.ended_early]
    logs = sorted(w.logs for w in connected)
    # The steady state's logs: created once every watcher had its first event (the backlog of the
    # catch-up, delivered after it, is not).
    steady_logs = sorted(
        sum(1 for at, delay in zip(w.received, w.delays, strict=True) if at - delay >= steady_from) for w in connected
    )
    heads = sorted(w.headers_s for w in connected if w.headers_s is not None)
    firsts = sorted(w.first_event_s for w in connected if w.first_event_s is not None)

    def ms(value: float | None) -> float | None:
        return None if value is None else round(1000 * value, 1)

    return {
        "url": f"{args.url}{target}",
        "watchers": len(watchers),
        "connected": len(connected),
        "connection_errors": sum(errors.values()),
        "errors_by_kind": errors,
        "ended_early": len(ended),
        "ended_early_reasons": sorted({w.error or "" for w in ended})[:5],
        **{key: round(value, 2) for key, value in phases.items()},
        "headers_ms": {"p50": ms(percentile(heads, 0.5)), "max": ms(heads[-1] if heads else None)},
        "first_event_ms": {
            "p50": ms(percentile(firsts, 0.5)),
            "max": ms(firsts[-1] if firsts else None),
            "watchers_without": len(connected) - len(firsts),
        },
        "log_events_per_watcher": {
            "min": logs[0] if logs else None,
            "median": statistics.median(logs) if logs else None,
            "max": logs[-1] if logs else None,
        },
        "log_events_per_watcher_steady": {
            "min": steady_logs[0] if steady_logs else None,
            "median": statistics.median(steady_logs) if steady_logs else None,
            "max": steady_logs[-1] if steady_logs else None,
        },
        "log_events": sum(logs),
        "caught_up_log_events": sum(w.caught_up_logs for w in connected),
        "job_events": sum(w.jobs for w in connected),
        "event_events": sum(w.events for w in connected),
        "pings": sum(w.pings for w in connected),
        "delay_ms": delay_percentiles([d for w in connected for d in w.delays]),
        "delay_ms_steady": delay_percentiles(
            [d for w in connected for d, at in zip(w.delays, w.received, strict=True) if at - d >= steady_from]
        ),
        "delay_by_second": by_second(connected, start),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    parts = urlsplit(args.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = f"/jobs/{args.job_id}/stream" + ("" if args.from_start else tail_query(args.url, args.job_id))
    stop = asyncio.Event()
    watchers = [Watcher(i) for i in range(args.watchers)]
    started, start_wall = time.monotonic(), time.time()
    tasks = [asyncio.create_task(watch(w, host, port, target, stop)) for w in watchers]
    pairs = list(zip(watchers, tasks, strict=True))
    # Every watcher has its headers, or has failed ...
    while time.monotonic() - started < CONNECT_TIMEOUT_S + 5:
        if all(w.connected or w.error or task.done() for w, task in pairs):
            break
        await asyncio.sleep(0.05)
    connect_s = time.monotonic() - started
    # ... and its first event: the API has caught it up.
    while time.monotonic() - started < CATCH_UP_TIMEOUT_S:
        if all(w.first_event_s is not None or w.error or task.done() for w, task in pairs):
            break
        await asyncio.sleep(0.05)
    caught_up_s, steady_from = time.monotonic() - started, time.time()
    ready = {
        "connected": sum(w.connected for w in watchers),
        "errors": sum(bool(w.error) for w in watchers),
        "connect_s": round(connect_s, 2),
        "caught_up_s": round(caught_up_s, 2),
    }
    if args.ready_file is not None:
        args.ready_file.write_text(json.dumps(ready))
    print(
        f"{ready['connected']} of {args.watchers} watchers connected in {connect_s:.1f} s, "
        f"all had their first event after {caught_up_s:.1f} s",
        flush=True,
    )
    held = time.monotonic()
    await asyncio.sleep(args.duration)
    stop.set()
    held_s = time.monotonic() - held
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    phases = {"connect_all_s": connect_s, "first_events_all_s": caught_up_s, "held_s": held_s}
    return summary(watchers, args, target, phases, start_wall, steady_from)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the API's base URL")
    parser.add_argument("--job-id", type=int, default=10_000)
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=20, help="seconds the watchers stay once connected")
    parser.add_argument(
        "--from-start", action="store_true", help="no after_step: every watcher reads the job's whole history first"
    )
    parser.add_argument("--ready-file", type=Path, help="written once every watcher is connected or failed")
    parser.add_argument("--out", type=Path, help="the summary (JSON)")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    text = json.dumps(result, indent=1)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text, flush=True)
    sys.exit(0 if result["connected"] else 1)


if __name__ == "__main__":
    main()
