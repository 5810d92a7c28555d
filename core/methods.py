"""What each training method is, in facts every process may read (no torch, no TRL): the rows it
trains on, the hyperparameters of its own (TRL's names and defaults), the step-log metrics it
writes, and the numbers the planner and the data report need. The trainer's side of each method
(its TRL trainer and config) is trainer/methods/<name>.py; docs/methods.md describes them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from core.rows import PAIRED_FORMATS

Method = Literal["sft", "dpo", "orpo", "kto", "grpo"]
METHOD_NAMES: tuple[Method, ...] = ("sft", "dpo", "orpo", "kto", "grpo")

# Hyperparameters of one method or a few (the rest apply to every method). Their defaults are the
# method's TRL defaults, filled into the stored spec of a job of that method.
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo")
GRPO_SCALE_REWARDS = ("group", "batch", "none")
# SFT's own options, which no preference or reward method has.
SFT_OPTIONS = ("completion_only_loss", "assistant_only_loss", "packing", "padding_free")


@dataclass(frozen=True)
class MethodFacts:
    name: Method
    title: str
    trl_trainer: str  # TRL's class (trl.<name>, or trl.experimental.orpo for ORPO)
    formats: tuple[str, ...]  # the row formats it trains on, in the order they are recognised
    defaults: dict[str, Any]  # its own hyperparameters, with TRL's defaults
    loss_types: tuple[str, ...] = ()
    # The step-log metrics that tell how it goes (the watch page's chart); every numeric figure TRL
    # logs beyond loss, learning rate and grad norm is kept (`method_metrics`), these first.
    headline_metrics: tuple[str, ...] = ()
    # Its planner terms.
    sequences_per_row: int = 1  # sequences a row makes in one forward pass (chosen and rejected: 2)
    reference_model: bool = False  # holds a reference model unless told otherwise (see uses_reference)
    logits_held: bool = False  # materializes the logits for log-probabilities (no fused loss)
    generates: bool = False
    # The smallest micro-batch it can train with (KTO's KL term needs two rows of a batch).
    min_micro_batch: int = 1
    unsloth_patched: bool = True  # Unsloth ships a patched trainer of this TRL class
    options: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", frozenset(self.defaults))


METHODS: dict[str, MethodFacts] = {
    "sft": MethodFacts(
        name="sft",
        title="supervised fine-tuning",
        trl_trainer="SFTTrainer",
        formats=("messages", "prompt_completion", "text"),
        defaults={},
        headline_metrics=("mean_token_accuracy", "entropy"),
    ),
    "dpo": MethodFacts(
        name="dpo",
        title="direct preference optimization",
        trl_trainer="DPOTrainer",
        formats=("preference", "openai_preference", "implicit_preference"),
        defaults={"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "precompute_ref_log_probs": False},
        loss_types=DPO_LOSS_TYPES,
        headline_metrics=("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"),
        sequences_per_row=2,
        reference_model=True,
        logits_held=True,
    ),
    "orpo": MethodFacts(
        name="orpo",
        title="odds ratio preference optimization",
        trl_trainer="ORPOTrainer",
        formats=("preference", "openai_preference", "implicit_preference"),
        defaults={"beta": 0.1},
        headline_metrics=("rewards/margins", "rewards/accuracies", "log_odds_ratio", "nll_loss"),
        sequences_per_row=2,
        logits_held=True,
        unsloth_patched=False,  # trl.experimental: Unsloth patches trl.trainer's trainers only
    ),
    "kto": MethodFacts(
        name="kto",
        title="Kahneman-Tversky optimization",
        trl_trainer="KTOTrainer",
        formats=("unpaired_preference", "preference", "openai_preference", "implicit_preference"),
        defaults={
            "beta": 0.1,
            "loss_type": "kto",
            "desirable_weight": 1.0,
            "undesirable_weight": 1.0,
            "precompute_ref_log_probs": False,
        },
        loss_types=KTO_LOSS_TYPES,
        headline_metrics=("rewards/margins", "kl", "rewards/chosen", "rewards/rejected"),
        sequences_per_row=2,  # each completion and the mismatched one its KL term is computed on
        reference_model=True,
        logits_held=True,
        min_micro_batch=2,
    ),
    "grpo": MethodFacts(
        name="grpo",
        title="group relative policy optimization",
        trl_trainer="GRPOTrainer",
        formats=("prompt_only", "prompt_messages"),
        defaults={
            "beta": 0.0,
            "loss_type": "dapo",
            "num_generations": 8,
            "max_completion_length": 512,
            "steps_per_generation": None,  # null: gradient_accumulation_steps, as in TRL
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "epsilon": 0.2,
            "num_iterations": 1,
            "scale_rewards": "group",
            "mask_truncated_completions": False,
        },
        loss_types=GRPO_LOSS_TYPES,
        headline_metrics=("reward", "reward_std", "kl", "completions/mean_length"),
        logits_held=True,
        generates=True,
    ),
}
# Every method-only hyperparameter, with the methods it applies to.
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {}
for _facts in METHODS.values():
    for _option in _facts.options:
        METHOD_OPTIONS.setdefault(_option, ())
        METHOD_OPTIONS[_option] += (_facts.name,)
for _option in SFT_OPTIONS:
    METHOD_OPTIONS[_option] = ("sft",)


def facts(method: str) -> MethodFacts:
    return METHODS[method]


def methods_of_option(option: str) -> str:
    """'dpo, orpo and kto': the methods a hyperparameter applies to, in words."""
    names = METHOD_OPTIONS.get(option, ())
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def uses_reference(method: str, hp: Any) -> bool:
    """Whether the job holds a reference model on the GPU while it trains: DPO and KTO unless the
    reference log-probabilities are computed once before training; GRPO when beta is not 0."""
    if method in ("dpo", "kto"):
        return not getattr(hp, "precompute_ref_log_probs", False)
    if method == "grpo":
        return bool(getattr(hp, "beta", 0.0))
    return False


def generation_batch(hp: Any) -> int:
    """GRPO: completions generated at once on each GPU (per_device_train_batch_size x
    steps_per_generation), TRL's generation_batch_size divided among the GPUs."""
    steps = getattr(hp, "steps_per_generation", None) or hp.gradient_accumulation_steps
    return int(hp.micro_batch * steps)


def training_sequences(method: str, rows: int, hp: Any, row_format: str | None = None) -> int:
    """The sequences one epoch over `rows` good rows trains on, which the optimizer steps count: a
    pair given to KTO is two unpaired rows, a GRPO prompt is num_generations completions."""
    if method == "grpo":
        return rows * int(getattr(hp, "num_generations", None) or 1)
    if method == "kto" and row_format in PAIRED_FORMATS:
        return rows * 2
    return rows
