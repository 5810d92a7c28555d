"""`finetune`: submit, list, follow, pause, cancel and download jobs from a terminal.

    finetune submit spec.yaml --follow
    finetune follow 7
    finetune download 7 final --dest ./llama-tuned
    finetune verify 7 final
    finetune admin tokens create alice --project vision

The service's URL and token come from --url / --token or FINETUNE_URL / FINETUNE_TOKEN. Local
paths in a spec are paths on the service's host: ./ and ../ ones are sent made absolute, against
the spec file's folder (the working directory for --model and --dataset)."""

from __future__ import annotations

import functools
import hashlib
import json
import ssl
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=True)
console = Console()
FINISHED = ("succeeded", "failed", "cancelled")
GIB = 1024**3
CHUNK = 1024 * 1024
# Spec values that are relative local paths: the server resolves a path against its own working
# directory, which is not the user's, so they are made absolute here (right where the service
# runs on this machine, as scripts/run does). Hub ids, "~" and absolute paths go as they are.
RELATIVE_PREFIXES = ("./", "../")
VERIFY_POLL_S = 1.0
# A create is sent this many times at most, CREATE_RETRY_S apart at first and twice as long after
# each failure (0.5 + 1 + 2 + 4 s: a service restarting has time to come back).
CREATE_ATTEMPTS = 5
CREATE_RETRY_S = 0.5
# Answers that say "not now" rather than "no": a proxy without its upstream, a database away.
RETRIED_STATUSES = frozenset({502, 503, 504})


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context for the command's clients: building one reads the CA bundle (60 ms of CPU
    each), and `finetune follow` makes a client for each poll."""
    return httpx.create_ssl_context()


class Api:
    def __init__(self, url: str, token: str | None) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def client(self) -> httpx.Client:
        """A connection pool for a few requests: use it in a `with`."""
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=60, verify=tls_context())

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        with self.client() as http:
            response = http.request(method, path, **kwargs)
        return self.answer(method, path, response)

    def create(self, path: str, request: Callable[[], dict[str, Any]]) -> Any:
        """POST a create (a job, a file) with a fresh Idempotency-Key, sent again with the same key
        when the connection fails or the service is briefly unavailable: the service makes the job
        or file once however many of the attempts reached it. `request()` gives the keyword
        arguments of each attempt (a file to upload is opened afresh)."""
        headers = {"Idempotency-Key": str(uuid.uuid4())}
        for attempt in range(1, CREATE_ATTEMPTS + 1):
            arguments = request()
            try:
                with self.client() as http:
                    response = http.post(path, headers=headers, **arguments)
            except httpx.TransportError as exc:
                if attempt == CREATE_ATTEMPTS:
                    console.print(f"[red]POST {path}: {exc!r}, {attempt} times; is the service at {self.url}?[/red]")
                    raise typer.Exit(2) from None
                console.print(f"[yellow]POST {path}: {exc!r}; sending it again (same Idempotency-Key)[/yellow]")
            else:
                if response.status_code not in RETRIED_STATUSES or attempt == CREATE_ATTEMPTS:
                    return self.answer("POST", path, response)
                console.print(f"[yellow]POST {path}: {response.status_code}; sending it again[/yellow]")
            finally:
                _close_files(arguments)
            time.sleep(CREATE_RETRY_S * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    def answer(self, method: str, path: str, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            if response.status_code == 401:
                detail += (
                    " (the token given with --token or FINETUNE_TOKEN is not one the server accepts)"
                    if "Authorization" in self.headers
                    else " (give one of the server's API_TOKENS, or a token an admin made, with --token or "
                    "FINETUNE_TOKEN)"
                )
            console.print(f"[red]{method} {path}: {response.status_code} {detail}[/red]")
            raise typer.Exit(2)
        return response.json() if response.content else None


def _close_files(arguments: dict[str, Any]) -> None:
    for part in (arguments.get("files") or {}).values():
        if isinstance(part, tuple) and hasattr(part[1], "close"):
            part[1].close()


UrlOption = Annotated[str, typer.Option("--url", envvar="FINETUNE_URL", help="the service")]
TokenOption = Annotated[
    str | None, typer.Option("--token", envvar="FINETUNE_TOKEN", help="one of API_TOKENS, or a token an admin made")
]


def api(url: str, token: str | None) -> Api:
    return Api(url, token)


def absolute(value: Any, base: Path) -> Any:
    if isinstance(value, str) and value.startswith(RELATIVE_PREFIXES):
        return str((base / value).resolve())
    return value


def read_spec(path: Path) -> dict[str, Any]:
    """A job spec from a .json, .yaml or .yml file, its ./ and ../ paths made absolute against
    the file's folder."""
    text = path.read_text()
    spec = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(spec, dict):
        raise typer.BadParameter(f"{path} holds no job spec (a mapping)")
    base = path.resolve().parent
    for key in ("model", "chat_template_from"):
        if key in spec:
            spec[key] = absolute(spec[key], base)
    for key in ("dataset", "validation"):
        if isinstance(spec.get(key), dict) and "source" in spec[key]:
            spec[key]["source"] = absolute(spec[key]["source"], base)
    return spec


@app.command()
def submit(
    spec_file: Annotated[
        Path | None, typer.Argument(help="a job spec in JSON or YAML (./ and ../ paths: from its folder)")
    ] = None,
    model: Annotated[str | None, typer.Option(help="overrides the spec's model (./ and ../: from here)")] = None,
    dataset: Annotated[str | None, typer.Option(help="overrides the spec's dataset.source (likewise)")] = None,
    max_steps: Annotated[int | None, typer.Option(help="overrides hyperparameters.max_steps")] = None,
    follow_job: Annotated[bool, typer.Option("--follow", help="then follow it to the end")] = False,
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
) -> None:
    """Submit a job from a spec file, flags, or both (flags win)."""
    spec = read_spec(spec_file) if spec_file else {}
    if model:
        spec["model"] = absolute(model, Path.cwd())
    if dataset:
        spec["dataset"] = {**spec.get("dataset", {}), "source": absolute(dataset, Path.cwd())}
    if max_steps is not None:
        spec["hyperparameters"] = {**spec.get("hyperparameters", {}), "max_steps": max_steps}
    record = api(url, token).create("/jobs", lambda: {"json": spec})
    console.print(f"job {record['id']} {record['status']}")
    if follow_job:
        follow(record["id"], url=url, token=token)


@app.command()
def upload(
    path: Annotated[Path, typer.Argument(help="a .jsonl, .json or .parquet dataset", exists=True, dir_okay=False)],
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
) -> None:
    """Upload a dataset file (POST /files); prints its id for a spec's `dataset: {file_id: ...}`."""

    def request() -> dict[str, Any]:
        return {"files": {"file": (path.name, path.open("rb"))}}  # streamed, opened afresh for each attempt

    made = api(url, token).create("/files", request)
    console.print(
        f"file {made['id']} {made['filename']}: {made['rows']} rows ({made['row_format']}), {made['bad_rows']} bad"
    )


@app.command("list")
def list_jobs(
    status: Annotated[str | None, typer.Option(help="only jobs of this status")] = None,
    limit: int = 20,
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
) -> None:
    """Jobs, newest first."""
    params: dict[str, Any] = {"limit": limit, "fields": "id,status,created_at,progress,metrics,spec"}
    if status:
        params["status"] = status
    page = api(url, token).call("GET", "/jobs", params=params)
    table = Table("id", "status", "model", "step", "loss", "tokens/s", "created")
    for job in page["items"]:
        progress, metrics = job["progress"], job["metrics"]
        table.add_row(
            str(job["id"]),
            job["status"],
            str(job["spec"].get("model", ""))[-40:],
            f"{progress['step']}/{progress['total_steps'] or '?'}",
            _num(metrics.get("loss"), ".4f"),
            _num(metrics.get("tokens_per_second"), ",.0f"),
            job["created_at"][:19],
        )
    console.print(table)


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# A preference or reward job's own figures that `follow` and `logs` show (TRL's names), when it has them.
METHOD_HEADLINES = ("rewards/margins", "rewards/accuracies", "reward", "kl")


def _status_line(record: dict[str, Any]) -> str:
    metrics, vram = record["metrics"], record.get("vram") or {}
    memory = vram.get("device_used_gib")
    own = metrics.get("method_metrics") or {}
    parts = [
        f"{record['status']}" + (f" ({record['phase']})" if record.get("phase") else ""),
        f"loss {_num(metrics.get('loss'), '.4f')}",
        *(f"{name} {_num(own[name], '.3f')}" for name in METHOD_HEADLINES if own.get(name) is not None),
        f"eval {_num(metrics.get('eval_loss'), '.4f')}",
        f"{_num(metrics.get('tokens_per_second'), ',.0f')} tok/s",
        f"GPU {memory:.1f} GiB" if memory is not None else "GPU -",
        f"ETA {_duration(record['progress'].get('eta_seconds'))}",
    ]
    return " | ".join(parts)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@app.command()
def follow(
    job_id: int,
    interval: Annotated[float, typer.Option(help="seconds between polls")] = 1.0,
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
) -> None:
    """A live progress bar (step / total, loss, a preference or reward job's margin or reward, eval loss,
    tokens/s, GPU memory, ETA) until the
    job ends or is paused; exits 0 when it succeeded, 1 otherwise."""
    client = api(url, token)
    fields = "status,phase,progress,metrics,vram,error"
    etag, record = None, None
    with (
        client.client() as http,
        Progress(
            TextColumn(f"job {job_id}"),
            BarColumn(),
            TextColumn("{task.fields[steps]} steps"),
            TextColumn("{task.description}"),
            console=console,
            transient=False,
        ) as progress,
    ):
        task = progress.add_task("", total=None, steps="0/?")
        while True:
            response = http.get(
                f"/jobs/{job_id}", params={"fields": fields}, headers={"If-None-Match": etag} if etag else {}
            )
            if response.status_code == 200:
                etag, record = response.headers.get("etag"), response.json()
            elif response.status_code != 304:
                client.call("GET", f"/jobs/{job_id}")  # says what is wrong, and exits
            assert record is not None
            step, total = record["progress"]["step"], record["progress"]["total_steps"]
            # The total is known once the trainer has counted the data: "?" until then.
            progress.update(
                task, completed=step, total=total, steps=f"{step}/{total or '?'}", description=_status_line(record)
            )
            if record["status"] in (*FINISHED, "paused"):
                break
            time.sleep(interval)
    if record["error"]:
        console.print(f"[red]{record['error']['code']}: {record['error']['message']}[/red]")
    console.print(f"job {job_id} {record['status']}")
    raise typer.Exit(0 if record["status"] == "succeeded" else 1)


@app.command()
def logs(job_id: int, url: UrlOption = "http://127.0.0.1:8000", token: TokenOption = None) -> None:
    """Every step log of the job."""
    client, after = api(url, token), None
    rows: list[dict[str, Any]] = []
    while True:
        page = client.call("GET", f"/jobs/{job_id}/logs", params={"after_step": after} if after else {})
        rows += page["items"]
        after = page["next_after_step"]
        if after is None:
            break
    own = [
        name
        for name in METHOD_HEADLINES
        if any((row.get("method_metrics") or {}).get(name) is not None for row in rows)
    ]
    table = Table("step", "loss", "lr", "grad norm", "tokens/s", "eval loss", *own)
    for row in rows:
        table.add_row(
            str(row["step"]),
            _num(row["loss"], ".4f"),
            _num(row["learning_rate"], ".2e"),
            _num(row["grad_norm"], ".3f"),
            _num(row["tokens_per_second"], ",.0f"),
            _num(row["eval_loss"], ".4f"),
            *(_num((row.get("method_metrics") or {}).get(name), ".4f") for name in own),
        )
    console.print(table)


@app.command()
def events(job_id: int, url: UrlOption = "http://127.0.0.1:8000", token: TokenOption = None) -> None:
    """The job's events, oldest first."""
    for event in api(url, token).call("GET", f"/jobs/{job_id}/events", params={"limit": 5000})["items"]:
        console.print(f"{event['created_at'][:19]}  [bold]{event['kind']}[/bold]  {event['message']}")


def _change(action: str, job_id: int, url: str, token: str | None) -> None:
    record = api(url, token).call("POST", f"/jobs/{job_id}/{action}")
    console.print(f"job {job_id} {record['status']}" + (" (cancel requested)" if record["cancel_requested"] else ""))


@app.command()
def cancel(job_id: int, url: UrlOption = "http://127.0.0.1:8000", token: TokenOption = None) -> None:
    """Cancel a job: a queued or paused one never runs again, a running one stops at its next step."""
    _change("cancel", job_id, url, token)


@app.command()
def pause(job_id: int, url: UrlOption = "http://127.0.0.1:8000", token: TokenOption = None) -> None:
    """Pause a job: it saves a checkpoint at its next step and frees the GPU."""
    _change("pause", job_id, url, token)


@app.command()
def resume(job_id: int, url: UrlOption = "http://127.0.0.1:8000", token: TokenOption = None) -> None:
    """Queue a paused job again; it continues from its checkpoint."""
    _change("resume", job_id, url, token)


@app.command()
def estimate(
    spec_file: Path,
    gpu_memory_gib: Annotated[float | None, typer.Option(help="plan for this card instead")] = None,
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
) -> None:
    """Expected peak GPU memory and disk of a spec, with the verdict for the card."""
    spec = read_spec(spec_file)
    if gpu_memory_gib:
        spec["gpu_memory_bytes"] = int(gpu_memory_gib * GIB)
    plan = api(url, token).call("POST", "/jobs/estimate", json=spec)
    memory, disk = plan["memory"], plan["disk"]
    console.print(f"GPU memory: {memory['total_gib']} GiB ({memory['verdict'] or 'GPU size unknown'})")
    for name, size in memory["parts"].items():
        console.print(f"  {name:<24} {size / GIB:8.2f} GiB")
    if memory.get("max_micro_batch") is not None:
        console.print(f"  largest micro-batch that fits: {memory['max_micro_batch']}")
    auto = plan.get("auto_micro_batch")
    if auto:
        console.print(f'  micro-batch "auto" times {auto["candidates"]} (planned for the first)')
    required = disk.get("required_bytes")
    console.print(f"disk: {'unknown' if required is None else f'{required / GIB:.1f} GiB'} needed")
    timing = plan.get("time") or {}
    if timing.get("seconds") is not None:
        console.print(
            f"training: about {timing['seconds'] / 60:.1f} min at {timing['tokens_per_second']:,.0f} tokens/s"
        )
    learned = plan.get("learned")
    if learned:
        jobs = ", ".join(str(m["job_id"]) for m in learned["measurements"])
        figures = [
            f"{learned['total_gib']} GiB ({learned['verdict']})" if learned.get("total_gib") is not None else None,
            f"{learned['tokens_per_second']:,.0f} tokens/s" if learned.get("tokens_per_second") is not None else None,
            f"about {learned['seconds'] / 60:.1f} min" if learned.get("seconds") is not None else None,
        ]
        console.print(f"measured on finished job(s) {jobs}: {', '.join(f for f in figures if f)}")


@app.command()
def download(
    job_id: int,
    name: Annotated[str, typer.Argument(help="the checkpoint, e.g. final or checkpoint-500")] = "final",
    dest: Annotated[Path | None, typer.Option(help="folder to write into (default: job-<id>-<name>)")] = None,
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
) -> None:
    """Download a checkpoint's files with a progress bar. A file already there whole (sha256) is
    skipped; one cut short (`<file>.part`) continues with an HTTP Range request; every file's
    sha256 is checked against the service's record."""
    client = api(url, token)
    checkpoint = client.call("GET", f"/jobs/{job_id}/checkpoints/{name}")
    corrupt = [f["path"] for f in checkpoint["files"] if f.get("corrupt")]
    if corrupt:
        console.print(
            f"[red]{name} is corrupt: {', '.join(corrupt)} no longer match the sha256 they were saved with, and the "
            f"service does not serve them; restore them on the server and run `finetune verify {job_id} {name}`[/red]"
        )
        raise typer.Exit(1)
    if any(f["sha256"] is None for f in checkpoint["files"]):
        console.print("[yellow]some files are still being hashed; they are checked by size only[/yellow]")
    folder = dest or Path(f"job-{job_id}-{name}")
    total = sum(f["size"] for f in checkpoint["files"])
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(f"{name} ({len(checkpoint['files'])} files)", total=total)
        with client.client() as http:
            for entry in checkpoint["files"]:
                _fetch(http, entry, folder, progress, task)
    console.print(f"{folder}: {len(checkpoint['files'])} files, {total:,} bytes, sha256 checked")


@app.command()
def verify(
    job_id: int,
    name: Annotated[str, typer.Argument(help="the checkpoint, e.g. final or checkpoint-500")] = "final",
    wait: Annotated[bool, typer.Option(help="wait for the result")] = True,
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
) -> None:
    """Have the service hash a checkpoint's files again and hold them against the sha256 they were
    saved with (it reads every byte: a while for a large model). Exits 1 when it is corrupt."""
    client = api(url, token)
    checkpoint = client.call("POST", f"/jobs/{job_id}/checkpoints/{name}/verify")
    if not wait:
        console.print(f"{name}: verification requested")
        return
    while checkpoint["verify_requested_at"] is not None:
        time.sleep(VERIFY_POLL_S)
        checkpoint = client.call("GET", f"/jobs/{job_id}/checkpoints/{name}")
    corrupt = [f["path"] for f in checkpoint["files"] if f.get("corrupt")]
    if corrupt:
        console.print(f"[red]{name} is corrupt: {', '.join(corrupt)} no longer match their sha256[/red]")
        raise typer.Exit(1)
    console.print(f"{name}: {len(checkpoint['files'])} files match their sha256 ({checkpoint['status']})")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(http: httpx.Client, entry: dict[str, Any], folder: Path, progress: Progress, task: Any) -> None:
    target = folder / entry["path"]
    target.parent.mkdir(parents=True, exist_ok=True)
    expected = entry["sha256"]
    if target.exists() and target.stat().st_size == entry["size"] and (not expected or _sha256(target) == expected):
        progress.advance(task, entry["size"])
        return
    partial = target.with_name(target.name + ".part")
    have = partial.stat().st_size if partial.exists() else 0
    if have > entry["size"]:
        partial.unlink()
        have = 0
    progress.advance(task, have)
    headers = {"Range": f"bytes={have}-"} if have else {}
    if have < entry["size"]:
        with http.stream("GET", entry["url"], headers=headers) as response:
            if response.status_code not in (200, 206):
                console.print(f"[red]{entry['path']}: {response.status_code}[/red]")
                raise typer.Exit(2)
            if have and response.status_code == 200:  # the server sent it whole: start again
                progress.advance(task, -have)
                have = 0
            with open(partial, "ab" if have else "wb") as handle:
                for chunk in response.iter_bytes(CHUNK):
                    handle.write(chunk)
                    progress.advance(task, len(chunk))
    if expected and _sha256(partial) != expected:
        partial.unlink()
        console.print(f"[red]{entry['path']}: sha256 does not match the service's; removed, run again[/red]")
        raise typer.Exit(1)
    partial.replace(target)


# ---- who may do what (docs/security.md) -----------------------------------------------------------

admin = typer.Typer(help="Projects, their quotas, tokens and the audit (an admin's token).", no_args_is_help=True)
tokens_app = typer.Typer(help="Tokens: made (shown once), listed by prefix, revoked.", no_args_is_help=True)
projects_app = typer.Typer(help="Projects and their quotas.", no_args_is_help=True)
app.add_typer(admin, name="admin")
admin.add_typer(tokens_app, name="tokens")
admin.add_typer(projects_app, name="projects")


def _size(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.1f} GiB"


@app.command()
def whoami(url: UrlOption = "http://127.0.0.1:8000", token: TokenOption = None) -> None:
    """Who the token is: principal, role and project."""
    me = api(url, token).call("GET", "/me")
    prefix = f" (token {me['token_prefix']})" if me["token_prefix"] else ""
    console.print(f"{me['principal']}: {me['role']} of project {me['project']}{prefix}")


@tokens_app.command("create")
def create_token(
    principal: Annotated[str, typer.Argument(help="whose token (made when it does not exist yet)")],
    project: Annotated[str | None, typer.Option(help="a new principal's project (default: default)")] = None,
    role: Annotated[
        str | None, typer.Option(help="a new principal's role: admin, member or viewer (default member)")
    ] = None,
    kind: Annotated[str | None, typer.Option(help="user, or project (its own identity, for CI)")] = None,
    expires_in_days: Annotated[float | None, typer.Option(help="none: it never expires")] = None,
    rate_limit_per_minute: Annotated[int | None, typer.Option(help="its own request rate")] = None,
    description: Annotated[str | None, typer.Option(help="what it is for")] = None,
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
) -> None:
    """Make a token and print it: it is shown this once (the server keeps only its SHA-256)."""
    body = {
        "principal": principal,
        "project": project,
        "role": role,
        "kind": kind,
        "expires_in_days": expires_in_days,
        "rate_limit_per_minute": rate_limit_per_minute,
        "description": description,
    }
    made = api(url, token).call("POST", "/admin/tokens", json={k: v for k, v in body.items() if v is not None})
    expires = f", expires {made['expires_at'][:19]}" if made["expires_at"] else ""
    console.print(f"{made['prefix']} for {made['principal']} ({made['role']} of {made['project']}){expires}")
    print(made["token"])  # alone on its line, for `$(finetune admin tokens create ...)`-style use


@tokens_app.command("list")
def list_tokens(
    principal: Annotated[str | None, typer.Option(help="only this principal's")] = None,
    project: Annotated[str | None, typer.Option(help="only this project's")] = None,
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
) -> None:
    """Every token, by its prefix (never the token)."""
    params = {k: v for k, v in {"principal": principal, "project": project}.items() if v}
    table = Table("prefix", "principal", "role", "project", "state", "expires", "created", "description")
    for item in api(url, token).call("GET", "/admin/tokens", params=params)["items"]:
        table.add_row(
            item["prefix"],
            item["principal"],
            item["role"],
            item["project"],
            item["state"],
            (item["expires_at"] or "-")[:19],
            item["created_at"][:19],
            item["description"] or "",
        )
    console.print(table)


@tokens_app.command("revoke")
def revoke_token(
    prefix: Annotated[str, typer.Argument(help="ft_<8 hex digits>, as listed")],
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
) -> None:
    """Revoke a token: refused at once (by every API process within TOKEN_CACHE_S)."""
    revoked = api(url, token).call("DELETE", f"/admin/tokens/{prefix}")
    console.print(f"{revoked['prefix']} of {revoked['principal']} {revoked['state']}")


@projects_app.command("create")
def create_project(
    name: str,
    max_gpus: Annotated[int | None, typer.Option(help="the most GPUs its jobs hold at once")] = None,
    max_queued_jobs: Annotated[int | None, typer.Option(help="the most of its jobs queued at once")] = None,
    max_checkpoint_gib: Annotated[float | None, typer.Option(help="what its checkpoints may take")] = None,
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
) -> None:
    """Make a project, with quotas (none: no limit)."""
    body: dict[str, Any] = {"name": name, "max_gpus": max_gpus, "max_queued_jobs": max_queued_jobs}
    if max_checkpoint_gib is not None:
        body["max_checkpoint_bytes"] = int(max_checkpoint_gib * GIB)
    made = api(url, token).call("POST", "/admin/projects", json=body)
    console.print(f"project {made['name']} made")


@projects_app.command("set")
def set_quotas(
    name: str,
    max_gpus: Annotated[int | None, typer.Option(help="-1 lifts it")] = None,
    max_queued_jobs: Annotated[int | None, typer.Option(help="-1 lifts it")] = None,
    max_checkpoint_gib: Annotated[float | None, typer.Option(help="-1 lifts it")] = None,
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
) -> None:
    """Change a project's quotas (those given; -1 lifts one)."""
    body: dict[str, Any] = {}
    for field, value in (("max_gpus", max_gpus), ("max_queued_jobs", max_queued_jobs)):
        if value is not None:
            body[field] = None if value < 0 else value
    if max_checkpoint_gib is not None:
        body["max_checkpoint_bytes"] = None if max_checkpoint_gib < 0 else int(max_checkpoint_gib * GIB)
    api(url, token).call("PATCH", f"/admin/projects/{name}", json=body)
    list_projects(url=url, token=token)


@projects_app.command("list")
def list_projects(url: UrlOption = "http://127.0.0.1:8000", token: TokenOption = None) -> None:
    """Every project, its quotas and what it uses of them."""
    table = Table("project", "GPUs", "queued jobs", "checkpoints")
    for item in api(url, token).call("GET", "/admin/projects")["items"]:
        usage = item["usage"]
        table.add_row(
            item["name"],
            f"{usage['gpus']} / {item['max_gpus'] if item['max_gpus'] is not None else '-'}",
            f"{usage['queued_jobs']} / {item['max_queued_jobs'] if item['max_queued_jobs'] is not None else '-'}",
            f"{_size(usage['checkpoint_bytes'])} / {_size(item['max_checkpoint_bytes'])}",
        )
    console.print(table)


@admin.command("audit")
def show_audit(
    limit: int = 50,
    principal: Annotated[str | None, typer.Option(help="only this principal's requests")] = None,
    project: Annotated[str | None, typer.Option(help="only this project's")] = None,
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
) -> None:
    """The newest requests that could change state: who, what, when, from where, and the answer."""
    params = {k: v for k, v in {"limit": limit, "principal": principal, "project": project}.items() if v}
    table = Table("at", "principal", "project", "request", "status", "from", "made")
    for item in api(url, token).call("GET", "/audit", params=params)["items"]:
        table.add_row(
            item["at"][:19],
            item["principal"] or "-",
            item["project"] or "-",
            f"{item['method']} {item['path']}",
            str(item["status_code"] or "-"),
            item["client"] or "-",
            item["target"] or "",
        )
    console.print(table)
