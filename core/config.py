"""Settings for every process (api, worker, trainer), read once from the environment and `.env`."""

from __future__ import annotations

from functools import cached_property, lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core.rows import MAX_ROW_BYTES_DEFAULT

# Settings the trainer has no use for, some of them secrets: never in its environment (it runs user
# data and third-party code). It writes the job database, never Redis.
NOT_FOR_THE_TRAINER = frozenset(
    {"api_tokens", "webhook_secret", "webhook_allowed_hosts", "redis_url", "trainer_env_passthrough"}
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # --- storage -------------------------------------------------------------------------
    data_dir: Path = Path("data")
    # Empty means "a SQLite file under DATA_DIR"; any SQLAlchemy URL works (postgresql+psycopg://...).
    database_url: str = ""
    # Local model and dataset paths are accepted only under these roots (comma-separated).
    allowed_local_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    # Space kept free under DATA_DIR for the job database and logs: a checkpoint that would eat
    # into it is not started (the job fails as disk_full with the figures), and /healthz reports
    # "degraded" below it.
    min_free_disk_bytes: int = Field(default=1024**3, ge=0)
    # A file of this size held under DATA_DIR and deleted when the job database cannot be written
    # for lack of space, so that a job's final status still lands on a full disk.
    disk_reserve_bytes: int = Field(default=64 * 1024**2, ge=0)
    # Checkpoints' files are hashed again this often (CHECKPOINT_VERIFY_INTERVAL_S; 0: only on
    # request and when a file is seen changed) by the API's verifier, which looks for due work
    # every CHECKPOINT_VERIFY_POLL_S (a requested verification starts within it).
    checkpoint_verify_interval_s: float = Field(default=7 * 24 * 3600.0, ge=0)
    checkpoint_verify_poll_s: float = Field(default=10.0, gt=0)
    # Storage that every host and the API share (docs/cluster.md): a folder every host mounts at
    # the same path, or an S3-compatible bucket (s3://bucket/prefix; credentials and endpoint from
    # the AWS_* variables, AWS_ENDPOINT_URL for MinIO or Ceph). Checkpoints and uploads are
    # published there, resumed and served from there. Empty: DATA_DIR alone (one host).
    storage_url: str = ""
    # A store that fails is tried this many times, the waits doubling from STORAGE_RETRY_WAIT_S;
    # a checkpoint it still cannot take fails the job as storage_unavailable.
    storage_retries: int = Field(default=5, ge=1)
    storage_retry_wait_s: float = Field(default=2.0, ge=0)

    # --- queue ---------------------------------------------------------------------------
    redis_url: str = "redis://127.0.0.1:6379/0"
    queue_name: str = "finetune"
    # A worker that stops heartbeating for this long has lost its job.
    heartbeat_interval_s: float = Field(default=10.0, gt=0)
    stale_after_s: float = Field(default=90.0, gt=0)
    # A job whose worker died is started again (resuming from its last checkpoint) this many times.
    max_attempts: int = Field(default=2, ge=1)
    reconcile_interval_s: float = Field(default=30.0, gt=0)
    # A queued job younger than this may sit between its commit and its enqueue: the reconciler
    # leaves it alone.
    enqueue_grace_s: float = Field(default=30.0, ge=0)

    # --- a Ray cluster (docs/cluster.md) ----------------------------------------------------
    # The Ray head (host:port): the worker hands each job's ranks to Ray Train, which places them
    # on any node with the resources and restarts them after a node is lost. Empty: ranks are the
    # worker's own children on its host (the default; Ray is then never imported).
    ray_address: str = ""
    # Ray's restarts of a job's ranks after a rank or a node is lost (FailureConfig), each resuming
    # from the newest checkpoint published to STORAGE_URL.
    ray_max_failures: int = Field(default=2, ge=0)
    # CPUs a rank asks Ray for, beside its GPU (dataloader, tokenizer, the trainer itself).
    ray_cpus_per_rank: float = Field(default=1.0, gt=0)
    # How a job's ranks are placed (Ray's placement group strategies): PACK keeps them on as few
    # nodes as fit (NCCL within a host is fastest), SPREAD across nodes where it can, STRICT_SPREAD
    # one rank a node, STRICT_PACK all on one node.
    ray_placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # How often a worker asks Ray which nodes are alive, so that the API refuses (422) a job with
    # more ranks than the whole cluster could place (core/ray_capacity.py). 0: never, for a cluster
    # that autoscales (it is larger on demand than what it has now).
    ray_capacity_interval_s: float = Field(default=60.0, ge=0)

    # --- trainer -------------------------------------------------------------------------
    # transformers 5 writes one safetensors file of up to 50 GB unless told otherwise; a few
    # GB per shard keeps downloads and Range requests file-sized.
    max_shard_size: str = "4GB"
    # How long a running job may take to end after a cancel before its trainer is killed. A cancel
    # keeps nothing, so the trainer stops at its next micro-batch (at the next step with several
    # GPUs); past this, killing it is as good and frees the GPU.
    cancel_grace_s: float = Field(default=10.0, gt=0)
    # A running job that takes no training step (nor micro-batch) for this long although its
    # trainer lives is reported: a `stalled` event, `progress.stalled_since`, and a gauge in /metrics.
    stall_after_s: float = Field(default=900.0, gt=0)
    # How long a worker asked to stop (SIGTERM) waits for its trainer to save a checkpoint and end
    # before it kills it. Keep it below the stop_grace_period of compose.yaml (docker compose down).
    stop_grace_s: float = Field(default=240.0, gt=0)
    # Start each job's trainer process before the job comes, its imports done (about 30 s of a
    # job's start on a GPU: Unsloth, torch, TRL). Unset: on where the worker sees a GPU.
    trainer_standby: bool | None = None
    # Start the next job's standby while a job runs (once the job has taken the current one and
    # ended its first step, if the card has 2 GiB free for the idle standby's CUDA context), so a
    # job queued behind it finds its imports done. Off: the next one starts when the job ends.
    trainer_standby_during_job: bool = True
    # When the worker is idle, its standby loads the model of the worker's last job (the same
    # model, backend and max_seq_length) and keeps it on the GPU, so a job that asks for it again
    # skips loading it (about 6 s of an 8B job's start); a job for another model frees it first.
    # The idle card then holds that model's weights. Unset: on where the worker sees a GPU.
    trainer_standby_preload: bool | None = None
    # On a host without GPUs: the socket of a trainer fork server (`python -m trainer --forkserver
    # SOCKET`, started with the trainers' environment), which has imported torch, transformers
    # and TRL once and forks each job's trainer from itself (each rank's, Ray's ranks on this host
    # included), so a job starts training in about a second. Unset, or not answering: each job
    # starts a trainer process of its own.
    trainer_forkserver: str | None = None
    # Sample each trainer's Python stack from its job's start to the end of its first step and write
    # startup-stacks.folded (a flame graph's input) and startup-profile.json into the job's folder
    # (trainer/stack_sampler.py): where a slow start goes, function by function.
    startup_profile: bool = False
    # A job whose planned checkpoints do not fit the free disk waits; the disk is looked at again
    # this often.
    disk_wait_poll_s: float = Field(default=30.0, gt=0)
    # The GPUs a worker may lease to its jobs (comma-separated indices as nvidia-smi numbers them,
    # e.g. "0,1,2,3"; `python -m worker --gpus` wins). Unset: CUDA_VISIBLE_DEVICES, else every GPU
    # NVML sees; none on a CPU host. Workers with the same GPU_HOST_ID share one inventory.
    worker_gpus: str | None = None
    # The name under which a host's workers share their GPU inventory (default: the host name).
    gpu_host_id: str | None = None
    # A job waiting for GPUs looks at the leases again this often.
    gpu_wait_poll_s: float = Field(default=2.0, gt=0)
    # torch.compile (Unsloth's compiled blocks) in a DDP job of several GPUs: "whole" compiles each
    # graph whole (torch._dynamo.config.optimize_ddp off; DDP's buckets sync after backward), "split"
    # is torch's default (graphs split at DDP's buckets to overlap communication), "off" runs eager.
    # docs/scheduling.md has what each measured.
    ddp_compile: Literal["whole", "split", "off"] = "whole"
    # The trainer gets only the variables it needs of the worker's environment (worker/tasks.py,
    # TRAINER_ENV_KEPT: system basics, Python, Hugging Face, torch, CUDA, proxies...); these
    # comma-separated names or shell patterns (WANDB_*,AWS_PROFILE) are passed on as well.
    trainer_env_passthrough: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # --- the Hugging Face Hub --------------------------------------------------------------
    # At submit, a spec's Hub ids (model, chat_template_from, Hub datasets) must be in this host's
    # Hugging Face cache or the Hub must answer; otherwise the job could only fail once it starts,
    # so it is a 422. Off for an API that sees neither the Hub nor its workers' cache as they do.
    hub_check_at_submit: bool = True
    # Whether the Hub answers is asked once per this many seconds (HF_ENDPOINT, one HEAD request),
    # and a submit waits at most this long for the answer.
    hub_probe_interval_s: float = Field(default=60.0, ge=0)
    hub_probe_timeout_s: float = Field(default=2.0, gt=0, le=30)

    # --- datasets ------------------------------------------------------------------------
    # Malformed rows are skipped (and reported) up to this share of a dataset; more refuses the job.
    max_bad_row_fraction: float = Field(default=0.01, ge=0, le=1)
    # The most a dataset row may take, in bytes: a larger row is malformed (named, with its size),
    # at upload, at submit and in the trainer, and never read whole or tokenized. The default is
    # twice what the longest max_seq_length takes in English text (core/rows.py).
    max_row_bytes: int = Field(default=MAX_ROW_BYTES_DEFAULT, ge=1)

    # --- methods ---------------------------------------------------------------------------
    # Installed Python modules (comma-separated) whose reward functions a GRPO job's `reward_module`
    # grader may name. None by default: the server never runs Python of a job's own, and a grader
    # runs only the built-in checks (core/graders.py).
    reward_modules: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # --- planning --------------------------------------------------------------------------
    # The GPU memory jobs are planned for; unset: the smallest GPU a live worker reported.
    gpu_memory_bytes: int | None = Field(default=None, gt=0)
    # The FLOPs a second one GPU trains at, for the planner's run-time estimate, which the GPU line
    # backfills by: an H100 trained an 8B model at 8,000 tokens/s (5e14 at 8 FLOPs per parameter and
    # token; docs/benchmarks.md); the default errs slow, so that an estimate errs long.
    gpu_train_flops: float = Field(default=4e14, gt=0)

    # --- speed -----------------------------------------------------------------------------
    # precision fp8: compile the regions around the float8 layers (fp8_compile_region: torchao's casts
    # and scales fused into few kernels); false runs them eagerly, as separate kernels
    # (docs/benchmarks.md, "Faster than the recipe").
    fp8_compile: bool = True
    # What one compiled region is: each decoder layer ("decoder_layer": torchao's casts fused with the
    # norms and activations around the matmuls; 1.38x the bare recipe through the service on an H100
    # with an "auto" micro-batch, docs/benchmarks.md) or each float8 Linear layer ("linear": 1.12x).
    # A model whose decoder layers are not found falls back to "linear".
    fp8_compile_region: Literal["linear", "decoder_layer"] = "decoder_layer"

    # --- api -----------------------------------------------------------------------------
    # Threads for the API's blocking work (database reads and writes, routes that are not
    # async). The database pool holds one connection per thread (and three for the background
    # loops), so no request ever waits for a connection; with PostgreSQL keep API processes x
    # (API_THREADS + 3) under the server's max_connections.
    api_threads: int = Field(default=40, ge=1, le=1000)
    # GET /jobs/{id} and GET /jobs serve a queued or running job's record as read at most this
    # long ago (a poller sees a step within this delay); finished jobs never change and are
    # served from memory. `Cache-Control: no-cache` on a request reads the database.
    record_max_age_s: float = Field(default=0.5, ge=0)
    # A finished job's record changes only when it is deleted (DELETE /jobs/{id}): another API
    # process learns of a deletion within this many seconds.
    finished_record_max_age_s: float = Field(default=5.0, ge=0)
    # Job records (and pages of finished jobs' logs and events) kept in memory per API process.
    record_cache_size: int = Field(default=5000, ge=0)
    # Bearer tokens accepted by the API, as admins of the default project (a one-person box). With
    # none of these and no token ever made (`finetune admin tokens create`), the API is open.
    api_tokens: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)

    # --- who may do what (docs/security.md) --------------------------------------------------
    # Each API process keeps the tokens in memory, read again this often: a revoked or expired token
    # is refused by every API process within this time (by the one that revoked it at once).
    token_cache_s: float = Field(default=5.0, ge=0)
    # Requests a minute each token may make, all API processes together (Redis counts them); a
    # token's own limit wins. 0: no limit. A token over it gets 429 with Retry-After.
    rate_limit_per_minute: int = Field(default=0, ge=0)
    # How long the audit (GET /audit) keeps each entry; 0: forever.
    audit_retention_days: float = Field(default=90.0, ge=0)
    # The highest `priority` a member may give a job (admins: up to 100); anyone may go down to -100.
    member_max_priority: int = Field(default=10, ge=-100, le=100)
    # Webhooks (a job spec's `webhooks`): the hosts they may be sent to (comma-separated; none by
    # default, so no job can make this server call an address its operator did not allow), and
    # the secret their signatures are made with (Standard Webhooks: `whsec_` and base64).
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # The hosts of MLflow tracking servers jobs may report to (a spec's integrations; comma-separated,
    # none by default: a trainer calls no address its operator did not allow).
    tracker_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    webhook_secret: SecretStr | None = None
    # A sender claims a delivery before it POSTs it; a claim this old whose delivery is still
    # `sending` was left by a sender that died mid-send (a killed API), and another sender takes
    # it back and sends it again. Keep it well above the 5 s a POST may take.
    webhook_claim_lease_s: float = Field(default=60.0, gt=0)
    # How long an Idempotency-Key of a create (POST /jobs, /files and their /v1 twins) is kept:
    # the same key and body sent again within it answer with the job or file the first one made.
    idempotency_keys_kept_s: float = Field(default=24 * 3600.0, gt=0)
    page_size_max: int = 500
    # The largest dataset file POST /files accepts.
    max_upload_bytes: int = Field(default=10 * 1024**3, gt=0)
    # The largest JSON request body (a job spec is a few KB): a larger one is a 413, refused from
    # its Content-Length before it is read, or as it streams in when it declares none.
    max_json_body_bytes: int = Field(default=1024**2, gt=0)

    @field_validator("allowed_local_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return [Path(p.strip()) for p in value.split(",") if p.strip()]
        return value

    @field_validator(
        "api_tokens",
        "webhook_allowed_hosts",
        "tracker_allowed_hosts",
        "trainer_env_passthrough",
        "reward_modules",
        mode="before",
    )
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()]
        return value

    @cached_property  # resolving the path costs a realpath; pollers' requests ask for it
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'jobs.db').resolve()}"

    def job_dir(self, job_id: int) -> Path:
        return self.data_dir.resolve() / "jobs" / str(job_id)

    def checkpoints_dir(self, job_id: int) -> Path:
        return self.job_dir(job_id) / "checkpoints"

    def files_dir(self) -> Path:
        return self.data_dir.resolve() / "files"

    def resolved_local_roots(self) -> list[Path]:
        return [root.expanduser().resolve() for root in self.allowed_local_roots]

    def as_environment(self) -> dict[str, str]:
        """These settings as environment variables, paths made absolute, for the trainer, which
        runs in another working directory and must not read a different `.env`; without those in
        NOT_FOR_THE_TRAINER."""
        env = {
            "DATA_DIR": str(self.data_dir.resolve()),
            "DATABASE_URL": self.sqlalchemy_url,
            "ALLOWED_LOCAL_ROOTS": ",".join(str(root) for root in self.resolved_local_roots()),
        }
        for name, value in self.model_dump(exclude=set(NOT_FOR_THE_TRAINER)).items():
            if name.upper() not in env and value is not None:
                env[name.upper()] = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        return env


@lru_cache
def get_settings() -> Settings:
    return Settings()
