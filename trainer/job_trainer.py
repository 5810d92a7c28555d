"""What every job's trainer has beyond TRL's, whatever its method: a mixin put before TRL's
trainer class (SFTTrainer, DPOTrainer, ... or Unsloth's patched ones) by `job_trainer_class`.

- Checkpoints that appear only when complete: each is written under a staging name, fsynced
  and renamed (worker/checkpoints.publish), so a crash mid-save never leaves a folder that a
  resume would pick and fail on. Before writing, the free space is checked against the
  checkpoint's size, so a full disk fails the job as `disk_full` with the figures instead of
  filling the disk that also holds the job database.
- Sharded saves: transformers 5 writes a model as one safetensors file of up to 50 GB unless
  told otherwise; a few GB per shard keeps downloads, hashes and Range requests file-sized.
- A token count that costs no GPU sync: the Trainer's own count (include_num_input_tokens_seen)
  calls .item() on every micro-batch, which stalls the CPU until the GPU catches up and cost
  a fifth of the throughput of a small model on an H100. Here the count stays a device
  tensor (or a shape-derived int) and is read once per logging step. Each method says which
  tensors of its batches hold the trained tokens (`batch_tokens`).
- With a shared store (STORAGE_URL, core/shared_store.py), each published checkpoint is copied
  there and committed by its manifest before the Trainer goes on, so any host can resume from it
  and the API serve it; a store that stays unreachable fails the job as `storage_unavailable`."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from core.checkpoint_files import publish, staging_path
from core.checkpoint_store import FINAL_NAME, newest_complete
from core.contract import ErrorCode
from core.diskspace import disk_space, gib, is_disk_full_error
from core.folders import folder_files
from core.shared_store import SharedStore, StorageUnavailable
from trainer.distributed import barrier
from trainer.failpoints import failpoint
from trainer.failures import JobFailure, storage_failure

# Scheduler, RNG and trainer state beside the weights and optimizer state.
CHECKPOINT_EXTRA_BYTES = 1024**2
# A save that fails with less than this free failed for lack of space, whatever its message says.
FULL_BELOW_BYTES = 1024**2


def batch_tokens(inputs: Any) -> Any:
    """Tokens in a micro-batch of input_ids: the attention mask's ones (a device tensor, not read
    here), or every position of a padding-free batch (Unsloth's default carries no mask)."""
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if mask is not None:
        return mask.sum()
    ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
    return ids.numel() if ids is not None else 0


class JobTrainerMixin:
    """Put before a TRL trainer class: `class JobDPOTrainer(JobTrainerMixin, DPOTrainer)`."""

    # Set by the Trainer; declared for the type checker, which does not see the TRL class.
    args: Any
    state: Any
    model: Any
    optimizer: Any
    lr_scheduler: Any
    accelerator: Any
    processing_class: Any
    is_fsdp_enabled: bool
    save_model: Any

    def __init__(
        self,
        *args: Any,
        max_shard_size: str = "4GB",
        on_phase: Callable[[str], None] | None = None,
        min_free_bytes: int = 0,
        store: SharedStore | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.store = store
        self.max_shard_size = max_shard_size
        self.on_phase = on_phase
        self.min_free_bytes = min_free_bytes
        self.last_publish_seconds = 0.0  # fsync and rename of the newest checkpoint
        self._tokens: Any = 0
        self.paused_seconds = 0.0  # time spent evaluating and saving checkpoints, which tokens/s leaves out
        self._staging_root: str | None = None  # while a checkpoint is written: where it goes
        self.checkpoints_dir = Path(str(self.args.output_dir))
        self.job_dir = self.checkpoints_dir.parent

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        # The job record shows "evaluating" while the validation set runs (minutes on a big one).
        if self.on_phase:
            self.on_phase("evaluating")
        started = time.monotonic()
        try:
            return super().evaluate(*args, **kwargs)  # type: ignore[misc,no-any-return]
        finally:
            self.paused_seconds += time.monotonic() - started
            if self.on_phase:
                self.on_phase("training")

    def batch_tokens(self, inputs: Any) -> Any:
        """The tokens a micro-batch trains on (a method whose batches hold other tensors says so)."""
        return batch_tokens(inputs)

    def training_step(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        failpoint("training_step", job_dir=self.job_dir, step=self.state.global_step)  # inert outside fault tests
        self._tokens = self._tokens + self.batch_tokens(inputs)
        return super().training_step(model, inputs, *args, **kwargs)  # type: ignore[misc]

    def count_tokens(self, tokens: Any) -> None:
        """For a method that counts its tokens elsewhere than in training_step (GRPO: once generated)."""
        self._tokens = self._tokens + tokens

    def tokens_trained(self) -> float:
        return float(self._tokens)

    # ---- durable checkpoints ------------------------------------------------------------------

    def _get_output_dir(self, trial: Any) -> str:
        # The Trainer writes checkpoint-N under this folder: a staging folder while we save.
        return self._staging_root or super()._get_output_dir(trial)  # type: ignore[misc]

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        started = time.monotonic()
        try:
            self._save_checkpoint_staged(model, trial)
        finally:
            self.paused_seconds += time.monotonic() - started

    def _save_checkpoint_staged(self, model: Any, trial: Any) -> None:
        run_dir = Path(super()._get_output_dir(trial))  # type: ignore[misc]
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final = run_dir / name
        needed = self.checkpoint_bytes(run_dir)
        root = staging_path(final)
        # With several ranks, each writes its part (its RNG state; with FSDP its optimizer shard)
        # into the staging folder, and rank 0 alone prepares it and, once all have written,
        # publishes it.
        main = self.args.should_save
        if main:
            self.check_space(name, needed)
            shutil.rmtree(root, ignore_errors=True)
        barrier()
        self._staging_root = str(root)
        seconds = 0.0
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]  # writes root/checkpoint-N
            barrier()
            if main:
                seconds = publish(root / name, final)
        except Exception as exc:
            raise self.save_failed(name, needed, root, exc) from exc
        finally:
            self._staging_root = None
        if main:
            shutil.rmtree(root, ignore_errors=True)
        best = self.state.best_model_checkpoint
        if best and best.startswith(str(root)):
            self.state.best_model_checkpoint = str(run_dir / Path(best).name)
        failpoint("checkpoint_published", job_dir=self.job_dir, step=self.state.global_step)
        if main:
            seconds += self.publish_to_store(final, self.state.global_step)
        self.last_publish_seconds = seconds
        if self.args.should_save:
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
            if self.store is not None and self.args.save_total_limit:
                self.in_store(lambda store: store.keep_newest(self.job_id, self.args.save_total_limit))

    @property
    def job_id(self) -> int:
        return int(self.job_dir.name)

    def publish_to_store(self, folder: Path, step: int) -> float:
        """Copy a published checkpoint to the shared store and commit it (rank 0); the seconds spent."""
        if self.store is None:
            return 0.0
        started = time.monotonic()
        self.in_store(lambda store: store.publish_checkpoint(self.job_id, folder, step))
        return time.monotonic() - started

    def in_store(self, operation: Callable[[SharedStore], object]) -> None:
        assert self.store is not None
        try:
            operation(self.store)
        except StorageUnavailable as exc:
            raise storage_failure(
                exc,
                "The checkpoint is complete in this host's DATA_DIR but not committed to the shared store, so no "
                "other host could resume from it",
            ) from exc

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # The model's weights are on disk, its optimizer state not yet: a checkpoint half written.
        failpoint("checkpoint_writing", job_dir=self.job_dir, step=self.state.global_step)
        super()._save_optimizer_and_scheduler(output_dir)  # type: ignore[misc]

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # transformers maps a DDP rank's optimizer state onto args.device, which CPU ranks name
        # "cpu:0": torch.load cannot restore that location. CPU ranks load it onto "cpu".
        if checkpoint is not None and self.args.world_size > 1 and self.args.device.type == "cpu":
            import torch
            from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

            assert self.optimizer is not None and self.lr_scheduler is not None
            folder = Path(checkpoint)
            if (folder / OPTIMIZER_NAME).is_file() and (folder / SCHEDULER_NAME).is_file():
                state = torch.load(folder / OPTIMIZER_NAME, map_location="cpu", weights_only=True)
                self.optimizer.load_state_dict(state)
                self.lr_scheduler.load_state_dict(torch.load(folder / SCHEDULER_NAME, weights_only=True))
            return
        super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]

    def save_final(self, final: Path) -> float:
        """The trained model, weights only, as `final`: staged, then published like a checkpoint."""
        needed = self.weights_bytes()
        staging = staging_path(final)
        main = self.args.should_save
        if main:
            self.check_space(FINAL_NAME, needed)
            shutil.rmtree(staging, ignore_errors=True)
        try:
            self.save_model(str(staging))  # every rank: FSDP gathers the full weights for rank 0
            barrier()
            seconds = publish(staging, final) if main else 0.0
        except Exception as exc:
            raise self.save_failed(FINAL_NAME, needed, staging, exc) from exc
        return seconds + (self.publish_to_store(final, self.state.global_step) if main else 0.0)

    def weights_bytes(self) -> int:
        assert self.model is not None
        # Sharded (FSDP) parameters count their local shard: their full size is the shard's times
        # the ranks, which every parameter's shard is a 1/world share of.
        local = int(sum(p.numel() * p.element_size() for p in self.model.parameters()))
        return local * self.args.world_size if self.is_fsdp_enabled else local

    def checkpoint_bytes(self, run_dir: Path) -> int:
        """What the next checkpoint will take: the last one's size when there is one, else the
        weights plus the optimizer's state tensors as they are now."""
        last, _skipped = newest_complete(run_dir)
        if last is not None:
            return sum(size for _path, size in folder_files(last))
        optimizer_state = getattr(self.optimizer, "state", {}) if self.optimizer is not None else {}
        states: int = sum(
            t.numel() * t.element_size()
            for per_param in optimizer_state.values()
            for t in per_param.values()
            if hasattr(t, "element_size")
        )
        return self.weights_bytes() + states + CHECKPOINT_EXTRA_BYTES

    def check_space(self, name: str, needed: int) -> None:
        space = disk_space(self.checkpoints_dir)
        if space.free_bytes - needed < self.min_free_bytes:
            raise JobFailure(
                ErrorCode.disk_full,
                f"Not enough disk space to save {name}: it needs about {gib(needed)} and there is "
                f"{space.describe()}, of which {gib(self.min_free_bytes)} stays free for the job database and logs "
                "(MIN_FREE_DISK_BYTES); nothing was written. Free space on that disk (or lower save_total_limit, "
                "raise save_steps), then resubmit the job.",
            )

    def save_failed(self, name: str, needed: int, staging: Path, exc: Exception) -> Exception:
        """Remove what was written of a failed save (which also gives the disk its space back),
        and say whether a full disk was the cause."""
        full = disk_space(self.checkpoints_dir).free_bytes < max(self.min_free_bytes, FULL_BELOW_BYTES)
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, JobFailure) or not (full or is_disk_full_error(exc)):
            return exc
        space = disk_space(self.checkpoints_dir)
        detail = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        return JobFailure(
            ErrorCode.disk_full,
            f"The disk filled up while saving {name}, which needs about {gib(needed)} ({detail}). The unfinished "
            f"folder was removed; there is now {space.describe()}. Free space on that disk (or lower "
            "save_total_limit, raise save_steps), then resubmit the job.",
        )

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        output_dir = str(output_dir or self.args.output_dir)
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        model.save_pretrained(output_dir, state_dict=state_dict, max_shard_size=self.max_shard_size)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)


_classes: dict[tuple[type, type | None], type] = {}


def job_trainer_class(base: type, extra: type | None = None) -> type:
    """`base` (a TRL trainer class, or Unsloth's patch of one) with JobTrainerMixin before it, and
    a method's own mixin `extra` before that; made once per base. `trl_base` names `base`."""
    key = (base, extra)
    if key not in _classes:
        bases = (extra, JobTrainerMixin, base) if extra is not None else (JobTrainerMixin, base)
        _classes[key] = type(f"Job{base.__name__}", bases, {"trl_base": base})
    return _classes[key]
