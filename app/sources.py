"""Where a submitted spec's model and data come from, checked against this host: the one place
(POST /jobs and POST /jobs/estimate) that reads the settings and the filesystem for a spec.

The spec itself (app/schemas.py) checks only shapes: a Hub id, or a local path. Here, at submit,
each local path is resolved and must lie under ALLOWED_LOCAL_ROOTS (or be an upload) and exist;
each `file_id` is resolved to its uploaded file's path; at submit, each Hub id must be in the
Hugging Face cache or the Hub must answer (app/hub.py). The stored spec holds the result, so the
trainer reads it as it is, on its own host, without checking it again."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from sqlmodel import Session

from app import hub
from app.errors import InvalidFields, InvalidSpec
from core.config import Settings, get_settings
from core.graders import reward_modules
from core.models import UploadedFile
from core.shared_store import StorageUnavailable, get_store
from core.spec import LOCAL_PATH_PREFIXES, JobSpec, MlflowIntegration, echo
from core.webhooks import host_allowed


def local_path_problem(value: str, what: str, settings: Settings) -> tuple[str, str | None]:
    """(the resolved path, None), or (value, why it cannot be used) for a local path."""
    roots = settings.resolved_local_roots()
    try:
        resolved = Path(value).expanduser().resolve()
    except RuntimeError:  # "~nosuchuser/...": a home folder this server does not have
        return value, f"{what} {echo(value)} names a home folder that does not exist on the server"
    # Files uploaded with POST /files (DATA_DIR/files) are always allowed, whatever the roots.
    uploaded = resolved.is_relative_to(settings.files_dir())
    if not roots and not uploaded:
        return value, (
            f"{what} {echo(value)} is a local path, but this server accepts no local paths "
            "(the operator sets ALLOWED_LOCAL_ROOTS to allow some)"
        )
    if not uploaded and not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        return value, f"{what} {echo(value)} is outside the allowed local roots ({allowed})"
    try:
        exists = resolved.exists()
    except OSError as exc:  # a name or path longer than the filesystem allows, say
        return value, f"{what} {echo(value)} cannot be looked up on the server ({exc.strerror})"
    if not exists and not (uploaded and in_shared_store(resolved)):
        return value, f"{what} {echo(value)} does not exist on the server"
    return str(resolved), None


def in_shared_store(path: Path) -> bool:
    """An upload taken by another host's API: in the shared store, where the trainer fetches it."""
    store = get_store()
    if store is None:
        return False
    try:
        return bool(store.retrying("look for an upload", lambda: store.fs.exists(store.upload_key(path.name))))
    except StorageUnavailable:
        return False


def hub_id_problem(value: str, what: str, kind: hub.Kind, settings: Settings) -> str | None:
    """Why a job naming this Hub id could only fail (not in the cache, and the Hub cannot be
    reached), or None."""
    gap = hub.cache_gap(value, kind)
    if gap is None:
        return None
    hub_now = hub.reachability(kind, timeout_s=settings.hub_probe_timeout_s, interval_s=settings.hub_probe_interval_s)
    if hub_now.reachable:
        return None
    if kind == "dataset":
        remedy = (
            f"load it once with datasets.load_dataset({value!r}) where the Hub is reachable, with the HF_HOME "
            "the workers use, or upload its rows (POST /files) and give dataset.file_id"
        )
    else:
        remedy = (
            f"download it where the workers read the cache (`hf download {value}`, with the HF_HOME they use), "
            "or name a model folder under ALLOWED_LOCAL_ROOTS"
        )
    return f"{what} {echo(value)} is a Hub id that this server cannot get: {gap}, and {hub_now.why_not}; {remedy}"


def checked_sources(
    job_in: JobSpec,
    *,
    session: Session | None = None,
    check_hub: bool = False,
    project_id: int | None = None,
) -> JobSpec:
    """The spec with its local paths resolved and checked, and (given a session) each file_id's
    source set to the uploaded file's path; the stored spec keeps file_id too. With `check_hub`
    (a submit), each Hub id must be cached or the Hub reachable. Every problem at once, as a 422
    naming each field (InvalidFields); an unknown file id is InvalidSpec, and so is another
    project's file when `project_id` is given (it reads as none)."""
    settings = get_settings()
    problems: list[dict[str, str]] = []
    kinds: dict[str, hub.Kind] = {
        "model": "model",
        "chat_template_from": "tokenizer",
        "dataset.source": "dataset",
        "validation.source": "dataset",
    }

    def checked(value: str | None, field: str, what: str) -> str | None:
        if not value:
            return value
        if not value.startswith(LOCAL_PATH_PREFIXES):
            if check_hub and settings.hub_check_at_submit:
                problem = hub_id_problem(value, what, kinds[field], settings)
                if problem:
                    problems.append({"field": field, "message": problem})
            return value
        resolved, problem = local_path_problem(value, what, settings)
        if problem:
            problems.append({"field": field, "message": problem})
        return resolved

    update: dict[str, object] = {
        "model": checked(job_in.model, "model", "model"),
        "chat_template_from": checked(job_in.chat_template_from, "chat_template_from", "chat_template_from"),
    }
    for field in ("dataset", "validation"):
        part = getattr(job_in, field)
        if part is None:
            continue
        if part.source and part.file_id is not None:
            problems.append({"field": field, "message": f"give either {field}.source or {field}.file_id, not both"})
            continue
        source = checked(part.source, f"{field}.source", f"{field} source")
        if part.file_id is not None and session is not None:
            uploaded = session.get(UploadedFile, part.file_id)
            if uploaded is None or (project_id is not None and uploaded.project_id != project_id):
                raise InvalidSpec(f"{field}.file_id: file {part.file_id} does not exist")
            source = str(settings.data_dir.resolve() / uploaded.path)
        update[field] = part.model_copy(update={"source": source})
    for index, hook in enumerate(job_in.webhooks):
        if not host_allowed(hook.url):
            problems.append(
                {
                    "field": f"webhooks.{index}.url",
                    "message": f"this server does not send webhooks to {echo(hook.url)}: its host is not in the "
                    "operator's WEBHOOK_ALLOWED_HOSTS",
                }
            )
        elif settings.webhook_secret is None:
            problems.append(
                {"field": f"webhooks.{index}.url", "message": "the operator has not set WEBHOOK_SECRET, to sign with"}
            )
    for index, integration in enumerate(job_in.integrations):
        if isinstance(integration, MlflowIntegration):
            try:
                host = (urlsplit(integration.mlflow.tracking_uri).hostname or "").lower()
            except ValueError:  # not a URL (an unclosed IPv6 bracket): allowed nowhere
                host = ""
            if not host or host not in {h.lower() for h in settings.tracker_allowed_hosts}:
                problems.append(
                    {
                        "field": f"integrations.{index}.mlflow.tracking_uri",
                        "message": f"this server does not report to {echo(integration.mlflow.tracking_uri)}: its host "
                        "is not in the operator's TRACKER_ALLOWED_HOSTS",
                    }
                )
    if job_in.grader is not None:
        for grader in reward_modules(job_in.grader):
            if grader.module not in settings.reward_modules:
                allowed = ", ".join(settings.reward_modules) or "none"
                problems.append(
                    {
                        "field": "grader",
                        "message": f"reward module {echo(grader.module)} is not one this server's operator allows "
                        f"(REWARD_MODULES: {allowed}); the server runs no Python of a job's own: use string_check, "
                        "text_similarity, regex, json_schema or multi",
                    }
                )
    if problems:
        raise InvalidFields(problems)
    return job_in.model_copy(update=update)
