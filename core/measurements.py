"""The planner learns: each succeeded job's measured NVML peak and tokens/s are kept beside what the
planner said for it (a PlannerMeasurement row), and POST /jobs/estimate corrects its arithmetic with
the closest measured jobs of the same shape (docs/planner.md, "Learning from finished jobs").

Comparable: the same model shape (parameter count, hidden size, layers, intermediate size,
vocabulary), method, optimizer, precision, GPU count and strategy, on a card of the same memory
(within CARD_MEMORY_TOLERANCE, or both unknown, as on a CPU host). Closest: the smallest distance

    |ln(tokens per micro-batch / theirs)| + |ln(max_seq_length / theirs)|
    + ACCUMULATION_DISTANCE when one accumulates gradients (accumulation > 1) and the other does not

(activations grow with the tokens of a micro-batch; attention's cost with the sequence; accumulating
costs 2-3 GiB of its own on the 8B shape), up to MAX_DISTANCE. Of several jobs at one point the newest
counts. Then, with the NEAREST closest points:

- memory: the plan plus the error the plan made at those points (measured peak - planned peak):
  that error at one point; with two points of different tokens per micro-batch, the error as a
  straight line through them in the tokens per micro-batch.
- tokens/s: each point's measured tokens/s scaled by the FLOPs per token of the two sequence
  lengths (attention's share grows with the sequence); with two points of different tokens per
  micro-batch, interpolated between them in ln(tokens), never beyond what either measured."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, col, select

from core.models import Job, PlannerMeasurement
from core.planner import (
    GIB,
    SAFETY_SHARE,
    MemoryPlan,
    ModelShape,
    PlanError,
    Verdict,
    plan_memory,
    read_config,
    shape_from_config,
    tokens_to_train,
)
from core.spec import Hyperparameters, JobSpec

logger = logging.getLogger(__name__)

CARD_MEMORY_TOLERANCE = 0.02  # an "80 GiB" request and an H100's 79.6 GiB as NVML counts them
ACCUMULATION_DISTANCE = 0.5
MAX_DISTANCE = math.log(8)  # up to 8 times the tokens of a micro-batch away (or as far in mixed terms)
NEAREST = 2
# Comparable rows read at most (the newest): enough for every point a shape is likely to have.
MAX_ROWS = 200


def precision_of(spec: JobSpec) -> str:
    """The precision the spec asks for, with fp8's recipe (fp8-rowwise and fp8-tensorwise differ in
    speed). "auto" stays "auto" (with its recipe when one was named): what it chooses depends on
    the card, and the card is part of what makes a measurement comparable."""
    if spec.fp8_recipe is None:  # bf16, or auto with fp8's default recipe
        return spec.precision
    return f"{spec.precision}-{spec.fp8_recipe}"


def shape_key(shape: ModelShape) -> str:
    return (
        f"{shape.parameters}:{shape.hidden_size}:{shape.num_hidden_layers}:{shape.intermediate_size}:{shape.vocab_size}"
    )


def planned_tokens_per_second(shape: ModelShape, gpus: int, gpu_train_flops: float) -> float:
    """The planner's tokens/s for a job (core/planner.estimate_seconds's arithmetic)."""
    from core.planner import TRAIN_FLOPS_PER_TOKEN_PER_PARAMETER

    return gpu_train_flops * gpus / (TRAIN_FLOPS_PER_TOKEN_PER_PARAMETER * shape.parameters)


def flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """Training FLOPs per token: 6 per parameter plus attention's score and value products, which
    grow with the sequence (12 x layers x hidden x sequence; bench/common.py)."""
    return 6.0 * shape.parameters + 12.0 * shape.num_hidden_layers * shape.hidden_size * seq_len


def record_finished_job(
    session: Session, job: Job, *, gpu_train_flops: float, gpu_memory_bytes: int | None = None
) -> PlannerMeasurement | None:
    """Keep what a succeeded job measured beside its plan. None when there is nothing to learn
    from: no tokens/s and no peak (a job that never logged a step after its first), or a model
    whose config cannot be read here any more."""
    spec = JobSpec.model_validate(job.spec)
    metrics, vram, placement = job.metrics or {}, job.vram or {}, job.placement or {}
    tokens_per_second = metrics.get("tokens_per_second_mean")
    peak = vram.get("device_used_peak")
    if tokens_per_second is None and peak is None:
        return None
    try:
        shape = shape_from_config(read_config(spec.model, allow_network=False))
    except PlanError as exc:
        logger.info("job %s: nothing learned (%s)", job.id, exc)
        return None
    cards: list[dict[str, Any]] = placement.get("gpus") or []
    card_memory = vram.get("device_total") or (cards[0].get("memory_bytes") if cards else None) or gpu_memory_bytes
    strategy = str(placement.get("strategy") or "single")
    hp = spec.hyperparameters
    plan = plan_memory(
        shape, hp, card_memory, gpus=spec.gpus, strategy=strategy, backend=spec.backend, method=spec.method
    )
    assert job.id is not None
    row = PlannerMeasurement(
        job_id=job.id,
        model=spec.model,
        shape_key=shape_key(shape),
        method=spec.method,
        optim=hp.optim,
        precision=precision_of(spec),
        gpus=spec.gpus,
        strategy=strategy,
        card=str(cards[0].get("name")) if cards else "cpu",
        card_memory_bytes=int(card_memory) if card_memory else None,
        micro_batch=hp.micro_batch,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        max_seq_length=hp.max_seq_length,
        steps=job.step,
        planned_bytes=plan.total_bytes,
        peak_bytes=int(peak) if peak else None,
        planned_tokens_per_second=round(planned_tokens_per_second(shape, spec.gpus, gpu_train_flops), 3),
        tokens_per_second=float(tokens_per_second) if tokens_per_second is not None else None,
    )
    session.add(row)
    session.flush()  # its id, for the event
    return row


def measured_message(row: PlannerMeasurement) -> str:
    """The `measured` event: what the job measured beside what was planned for it."""
    parts = []
    if row.peak_bytes is not None and row.planned_bytes:
        error = 100 * (row.planned_bytes - row.peak_bytes) / row.peak_bytes
        parts.append(
            f"peak GPU memory {row.peak_bytes / GIB:.1f} GiB (NVML) against {row.planned_bytes / GIB:.1f} GiB planned "
            f"({error:+.1f}%)"
        )
    if row.tokens_per_second is not None and row.card == "cpu":  # GPU_TRAIN_FLOPS is a GPU's figure
        parts.append(f"{row.tokens_per_second:,.0f} tokens/s")
    elif row.tokens_per_second is not None and row.planned_tokens_per_second:
        parts.append(
            f"{row.tokens_per_second:,.0f} tokens/s against {row.planned_tokens_per_second:,.0f} planned "
            f"(x{row.tokens_per_second / row.planned_tokens_per_second:.2f})"
        )
    return (
        "; ".join(parts)
        + f"; at micro-batch {row.micro_batch} x {row.gradient_accumulation_steps}, sequence {row.max_seq_length}, "
        f"on {row.card}: POST /jobs/estimate now uses it for jobs of this shape (measurement {row.id})"
    )


@dataclass(frozen=True)
class Used:
    row: PlannerMeasurement
    distance: float


@dataclass(frozen=True)
class Learned:
    """The estimate corrected by measurements (None where none of them measured it)."""

    total_bytes: int | None
    verdict: Verdict | None
    tokens_per_second: float | None
    seconds: float | None
    used: list[Used]


def distance(hp: Hyperparameters, row: PlannerMeasurement) -> float:
    tokens, theirs = hp.micro_batch * hp.max_seq_length, row.micro_batch * row.max_seq_length
    accumulation = (hp.gradient_accumulation_steps > 1) != (row.gradient_accumulation_steps > 1)
    return (
        abs(math.log(tokens / theirs))
        + abs(math.log(hp.max_seq_length / row.max_seq_length))
        + (ACCUMULATION_DISTANCE if accumulation else 0.0)
    )


def same_card(planned: int | None, measured: int | None) -> bool:
    if planned is None or measured is None:
        return planned is None and measured is None
    return abs(planned - measured) <= CARD_MEMORY_TOLERANCE * planned


def closest(
    session: Session, *, shape: ModelShape, spec: JobSpec, strategy: str, gpu_memory_bytes: int | None
) -> list[Used]:
    """The NEAREST closest measured points comparable with the spec (module docstring)."""
    hp = spec.hyperparameters
    rows = session.exec(
        select(PlannerMeasurement)
        .where(
            PlannerMeasurement.shape_key == shape_key(shape),
            PlannerMeasurement.method == spec.method,
            PlannerMeasurement.optim == hp.optim,
            PlannerMeasurement.precision == precision_of(spec),
            PlannerMeasurement.gpus == spec.gpus,
            PlannerMeasurement.strategy == strategy,
        )
        .order_by(col(PlannerMeasurement.id).desc())
        .limit(MAX_ROWS)
    ).all()
    newest: dict[tuple[int, int, bool], PlannerMeasurement] = {}
    for row in rows:  # newest first: the first of each point stays
        if same_card(gpu_memory_bytes, row.card_memory_bytes):
            newest.setdefault((row.micro_batch, row.max_seq_length, row.gradient_accumulation_steps > 1), row)
    near = sorted(
        (Used(row, distance(hp, row)) for row in newest.values()), key=lambda u: (u.distance, -(u.row.id or 0))
    )
    return [u for u in near if u.distance <= MAX_DISTANCE][:NEAREST]


def _two_points(used: list[Used], has: str) -> tuple[PlannerMeasurement, ...]:
    """The points that measured `has`: one, or two of different tokens per micro-batch."""
    points = [u.row for u in used if getattr(u.row, has) is not None]
    if len(points) >= 2 and points[0].micro_batch * points[0].max_seq_length != (
        points[1].micro_batch * points[1].max_seq_length
    ):
        return (points[0], points[1])
    return tuple(points[:1])


def learned_memory(plan: MemoryPlan, hp: Hyperparameters, used: list[Used]) -> int | None:
    points = [p for p in _two_points(used, "peak_bytes") if p.planned_bytes is not None]
    if not points:
        return None
    errors = [
        (p.micro_batch * p.max_seq_length, float(p.peak_bytes or 0) - float(p.planned_bytes or 0)) for p in points
    ]
    tokens = hp.micro_batch * hp.max_seq_length
    if len(errors) == 1:
        error = errors[0][1]
    else:
        (t1, e1), (t2, e2) = errors
        error = e1 + (e2 - e1) * (tokens - t1) / (t2 - t1)
    return int(plan.total_bytes + error)


def learned_tokens_per_second(shape: ModelShape, hp: Hyperparameters, used: list[Used]) -> float | None:
    points = _two_points(used, "tokens_per_second")
    if not points:
        return None
    seq = hp.max_seq_length
    scaled = [
        (p.micro_batch * p.max_seq_length, float(p.tokens_per_second or 0) * flops_per_token(shape, p.max_seq_length))
        for p in points
    ]
    rates = [(tokens, work / flops_per_token(shape, seq)) for tokens, work in scaled]
    if len(rates) == 1:
        return rates[0][1]
    (t1, r1), (t2, r2) = rates
    share = (math.log(hp.micro_batch * seq) - math.log(t1)) / (math.log(t2) - math.log(t1))
    return r1 + (r2 - r1) * min(max(share, 0.0), 1.0)


def verdict_of(total: int, plan: MemoryPlan) -> Verdict | None:
    if not plan.gpu_memory_bytes:
        return None
    budget = int(plan.gpu_memory_bytes * (1 - SAFETY_SHARE))
    if total <= budget:
        return "fits"
    if plan.optimizer_paged and total - plan.parts["optimizer_states"] <= budget:
        return "fits_with_paging"
    return "does_not_fit"


def learn(
    session: Session,
    *,
    shape: ModelShape,
    spec: JobSpec,
    plan: MemoryPlan,
    rows: int | None = None,
) -> Learned | None:
    """The estimate as the closest measurements correct it; None when none is close enough."""
    used = closest(session, shape=shape, spec=spec, strategy=plan.strategy, gpu_memory_bytes=plan.gpu_memory_bytes)
    if not used:
        return None
    hp = spec.hyperparameters
    total = learned_memory(plan, hp, used)
    rate = learned_tokens_per_second(shape, hp, used)
    tokens = tokens_to_train(hp, gpus=spec.gpus, rows=rows)
    seconds = tokens / rate if tokens is not None and rate else None
    return Learned(
        total_bytes=total,
        verdict=verdict_of(total, plan) if total is not None else None,
        tokens_per_second=round(rate, 1) if rate is not None else None,
        seconds=round(seconds, 1) if seconds is not None else None,
        used=used,
    )
