"""What the preference methods share (DPO, ORPO, KTO): pairs read in any of their formats and put
in TRL's (`prompt`, `chosen`, `rejected`), and measured as TRL tokenizes them: the prompt with each
answer, each pair being two sequences."""

from __future__ import annotations

from typing import Any

from trainer.methods.base import Measured, TrainingMethod, clipped


def as_pairs(dataset: Any, row_format: str) -> Any:
    """Preference rows of any format as TRL's explicit pairs: OpenAI's input/preferred_output/
    non_preferred_output renamed, an implicit prompt taken from the conversations' shared opening."""
    from trl.data_utils import maybe_extract_prompt

    if row_format == "openai_preference":
        dataset = dataset.map(
            lambda row: {
                "prompt": row["input"]["messages"],
                "chosen": row["preferred_output"],
                "rejected": row["non_preferred_output"],
            },
            remove_columns=dataset.column_names,
            desc="Reading OpenAI's preference rows",
        )
    elif row_format in ("implicit_preference", "preference"):
        dataset = dataset.map(maybe_extract_prompt, desc="Taking the prompt from the conversations")
    return dataset.select_columns(["prompt", "chosen", "rejected"])


def _sequences(tokenizer: Any, prompts: list[Any], answers: list[Any]) -> tuple[list[int], list[int]]:
    """Tokens of each prompt (as the model is prompted) and of each prompt with its answer."""
    if isinstance(prompts[0], list):
        prompt_ids = tokenizer.apply_chat_template(prompts, tokenize=True, return_dict=True, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [p + a for p, a in zip(prompts, answers, strict=True)], tokenize=True, return_dict=True
        )
        return [len(i) for i in prompt_ids["input_ids"]], [len(i) for i in full["input_ids"]]
    eos = tokenizer.eos_token or ""
    answered = [p + (a if not eos or a.endswith(eos) else a + eos) for p, a in zip(prompts, answers, strict=True)]
    return [len(i) for i in tokenizer(prompts)["input_ids"]], [len(i) for i in tokenizer(answered)["input_ids"]]


def _pair_counts(batch: dict[str, list[Any]], *, tokenizer: Any) -> dict[str, list[int]]:
    prompt, chosen = _sequences(tokenizer, batch["prompt"], batch["chosen"])
    _, rejected = _sequences(tokenizer, batch["prompt"], batch["rejected"])
    return {"prompt_tokens": prompt, "chosen_tokens": chosen, "rejected_tokens": rejected}


def _unpaired_counts(batch: dict[str, list[Any]], *, tokenizer: Any) -> dict[str, list[int]]:
    prompt, full = _sequences(tokenizer, batch["prompt"], batch["completion"])
    return {"prompt_tokens": prompt, "completion_tokens": full}


class PreferenceMethod(TrainingMethod):
    """DPO and ORPO: pairs, both answers in one forward pass."""

    def prepare(self, dataset: Any, row_format: str) -> Any:
        return as_pairs(dataset, row_format)

    def measure(
        self, dataset: Any, *, row_format: str, tokenizer: Any, template: str | None, what: str
    ) -> tuple[Any, Measured]:
        """A pair's length is its prompt with the longer answer; it trains on both sequences cut at
        max_seq_length (max_length), and its loss on their answers. A pair whose prompt alone fills
        max_seq_length is left out, as TRL's DPOTrainer leaves it (no answer token would remain)."""
        import numpy as np

        limit = self.hp.max_seq_length
        counted = dataset.map(
            _pair_counts,
            batched=True,
            remove_columns=dataset.column_names,
            fn_kwargs={"tokenizer": tokenizer},
            desc=f"Counting tokens of {what}",
        )
        prompt = np.asarray(counted["prompt_tokens"], dtype=np.int64)
        chosen = np.asarray(counted["chosen_tokens"], dtype=np.int64)
        rejected = np.asarray(counted["rejected_tokens"], dtype=np.int64)
        keep = prompt < limit
        if not keep.all():
            dataset = dataset.select(np.flatnonzero(keep).tolist())
        prompt, chosen, rejected = prompt[keep], chosen[keep], rejected[keep]
        trained = clipped(chosen, limit) + clipped(rejected, limit)
        loss = np.maximum(clipped(chosen, limit) - prompt, 0) + np.maximum(clipped(rejected, limit) - prompt, 0)
        longer = np.maximum(chosen, rejected)
        truncated = np.concatenate([longer > limit, np.ones(int((~keep).sum()), dtype=bool)])
        return dataset, Measured(longer, trained, loss, truncated, len(longer))


class UnpairedMethod(TrainingMethod):
    """KTO: unpaired rows (a completion and its label); pairs given to it count as two rows."""

    def prepare(self, dataset: Any, row_format: str) -> Any:
        from trl.data_utils import unpair_preference_dataset

        if row_format == "unpaired_preference":
            return dataset.select_columns(["prompt", "completion", "label"])
        return unpair_preference_dataset(as_pairs(dataset, row_format))

    def measure(
        self, dataset: Any, *, row_format: str, tokenizer: Any, template: str | None, what: str
    ) -> tuple[Any, Measured]:
        import numpy as np

        limit = self.hp.max_seq_length
        counted = dataset.map(
            _unpaired_counts,
            batched=True,
            remove_columns=dataset.column_names,
            fn_kwargs={"tokenizer": tokenizer},
            desc=f"Counting tokens of {what}",
        )
        prompt = np.asarray(counted["prompt_tokens"], dtype=np.int64)
        full = np.asarray(counted["completion_tokens"], dtype=np.int64)
        trained = clipped(full, limit)
        loss = np.maximum(trained - prompt, 0)
        return dataset, Measured(full, trained, loss, full > limit, len(full))
