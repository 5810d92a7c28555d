"""Group relative policy optimization: TRL's GRPOTrainer (Unsloth's patched one on the unsloth
backend) on prompts. Completions are generated with the model's own `generate` (no vLLM), scored by
the spec's grader (core/graders.py), and each scored against the other completions of its prompt.
beta above 0 adds the KL term to the reference model, which TRL then loads beside the policy."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from core.config import get_settings
from core.contract import ErrorCode
from core.graders import MultiGrader, RewardModuleGrader, item_fields
from trainer.failures import JobFailure
from trainer.methods.base import Measured, TrainerContext, TrainingMethod
from trainer.methods.dpo import reference_kwargs


def output_text(completion: Any) -> str:
    """A completion's text: TRL gives a chat completion as a list of messages, the assistant's last."""
    if isinstance(completion, list):
        return str(completion[-1].get("content") or "") if completion else ""
    return str(completion)


class GraderReward:
    """A grader as TRL's reward function: one float per completion. A multi grader's parts are
    logged too, as `graders/<multi>/<part>` (their mean over the step's completions)."""

    def __init__(self, grader: Any, columns: list[str], modules: Mapping[str, Callable[..., Any]]) -> None:
        self.grader = grader
        self.columns = columns
        self.modules = modules  # a multi's reward_module parts, by name: the operator's functions
        self.__name__ = grader.name  # TRL names the reward's metrics after it: rewards/<name>/mean

    def __call__(self, *, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        items = [
            {column: kwargs[column][i] for column in self.columns if column in kwargs} for i in range(len(prompts))
        ]
        texts = [output_text(c) for c in completions]
        if not isinstance(self.grader, MultiGrader):
            return [self.grader.score(text, item) for text, item in zip(texts, items, strict=True)]
        scores: dict[str, list[float]] = {}
        for name, part in self.grader.graders.items():
            if name in self.modules:
                found = self.modules[name](prompts=prompts, completions=completions, **kwargs)
                scores[name] = [float(value) if value is not None else 0.0 for value in found]
            else:
                scores[name] = [part.score(text, item) for text, item in zip(texts, items, strict=True)]
        log_metric: Callable[[str, float], None] | None = kwargs.get("log_metric")
        if log_metric is not None and texts:
            for name, values in scores.items():
                log_metric(f"graders/{self.grader.name}/{name}", sum(values) / len(values))
        return [self.grader.combine({name: scores[name][i] for name in scores}) for i in range(len(texts))]


def module_reward(grader: RewardModuleGrader, allowed: list[str]) -> Callable[..., Any]:
    """An operator's reward function: only from a module named in REWARD_MODULES (checked again
    here: the setting may have changed since the job was queued)."""
    if grader.module not in allowed:
        raise JobFailure(
            ErrorCode.dataset_invalid,
            f"the grader names the reward module {grader.module!r}, which this worker's REWARD_MODULES does not allow "
            f"({', '.join(allowed) or 'none'})",
            action="Ask the operator to allow it, or use a built-in grader; then resubmit the job.",
        )
    try:
        function = getattr(importlib.import_module(grader.module), grader.function)
    except (ImportError, AttributeError) as exc:
        raise JobFailure(
            ErrorCode.dataset_invalid,
            f"the reward module {grader.module!r} could not be used: {type(exc).__name__}: {exc}",
            action="Ask the operator to install it on the workers; then resubmit the job.",
        ) from exc

    def reward(**kwargs: Any) -> Any:
        return function(**kwargs)

    reward.__name__ = grader.name
    return reward


def reward_functions(grader: Any) -> list[Callable[..., Any]]:
    allowed = get_settings().reward_modules
    if isinstance(grader, RewardModuleGrader):
        return [module_reward(grader, allowed)]
    modules: dict[str, Callable[..., Any]] = {}
    if isinstance(grader, MultiGrader):
        modules = {
            name: module_reward(part, allowed)
            for name, part in grader.graders.items()
            if isinstance(part, RewardModuleGrader)
        }
    return [GraderReward(grader, sorted(item_fields(grader)), modules)]


class GeneratedTokensMixin:
    """GRPO's micro-batches are generated inside the trainer (`_prepare_inputs`, which the training
    step calls): the tokens trained are their prompts' and completions' (attention masks, device
    tensors read once per log). Counted only within a training step, not in evaluation's, whatever
    mode generation left the model in."""

    _in_training_step = False

    def batch_tokens(self, inputs: Any) -> Any:
        return 0  # counted once generated, below

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self._in_training_step = True
        try:
            return super().training_step(*args, **kwargs)  # type: ignore[misc]
        finally:
            self._in_training_step = False

    def _prepare_inputs(self, generation_batch: Any) -> Any:
        inputs = super()._prepare_inputs(generation_batch)  # type: ignore[misc]
        if self._in_training_step and isinstance(inputs, Mapping) and "completion_mask" in inputs:
            self.count_tokens(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum())  # type: ignore[attr-defined]
        return inputs


def _prompt_counts(batch: dict[str, list[Any]], *, tokenizer: Any) -> dict[str, list[int]]:
    prompts = batch["prompt"]
    if isinstance(prompts[0], list):
        ids = tokenizer.apply_chat_template(prompts, tokenize=True, return_dict=True, add_generation_prompt=True)
        return {"prompt_tokens": [len(i) for i in ids["input_ids"]]}
    return {"prompt_tokens": [len(i) for i in tokenizer(prompts)["input_ids"]]}


class GRPO(TrainingMethod):
    name = "grpo"

    def required_columns(self) -> dict[str, str]:
        assert self.spec.grader is not None
        return {name: f"the grader reads as {{{{item.{name}}}}}" for name in sorted(item_fields(self.spec.grader))}

    def prepare(self, dataset: Any, row_format: str) -> Any:
        if row_format == "prompt_messages":
            dataset = dataset.rename_column("messages", "prompt")
        return dataset.select_columns(["prompt", *self.required_columns()])

    def measure(
        self, dataset: Any, *, row_format: str, tokenizer: Any, template: str | None, what: str
    ) -> tuple[Any, Measured]:
        """A prompt's tokens; a prompt longer than max_seq_length - max_completion_length is left out
        (TRL would generate past max_seq_length from it). What the completions add is known once
        they are generated: the step logs' completions/mean_length and tokens/s."""
        import numpy as np

        hp = self.hp
        assert hp.max_completion_length is not None and hp.num_generations is not None
        counted = dataset.map(
            _prompt_counts,
            batched=True,
            remove_columns=dataset.column_names,
            fn_kwargs={"tokenizer": tokenizer},
            desc=f"Counting tokens of {what}",
        )
        prompt = np.asarray(counted["prompt_tokens"], dtype=np.int64)
        keep = prompt <= hp.max_seq_length - hp.max_completion_length
        if not keep.all():
            dataset = dataset.select(np.flatnonzero(keep).tolist())
        kept = prompt[keep]
        truncated = np.concatenate([np.zeros(len(kept), dtype=bool), np.ones(int((~keep).sum()), dtype=bool)])
        return dataset, Measured(kept, None, None, truncated, len(kept) * hp.num_generations)

    def sequences_prepared(self, train_dataset: Any) -> int:
        assert self.hp.num_generations is not None
        return len(train_dataset) * self.hp.num_generations

    def config(self, common: dict[str, Any], context: TrainerContext) -> Any:
        from trl import GRPOConfig

        return GRPOConfig(
            **common,
            **self.options(),
            use_vllm=False,  # the model's own generate: no second copy of the weights, no vLLM to install
            log_completions=False,
            **reference_kwargs(self.name, self.hp, context),
        )

    def trainer_base(self) -> type:
        from trl import GRPOTrainer

        return GRPOTrainer

    def trainer_mixin(self) -> type | None:
        return GeneratedTokensMixin

    def trainer_kwargs(self, context: TrainerContext) -> dict[str, Any]:
        return {"reward_funcs": reward_functions(self.spec.grader)}
