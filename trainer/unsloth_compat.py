"""Work-arounds for the pinned Unsloth (2026.10.9) in jobs of several GPUs, each found on the GPU
machine and written down in docs/scheduling.md. Each touches Unsloth's private names, so each
checks that they are there and does nothing when a later Unsloth has moved them."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def warm_packed_attention_probe(model: Any) -> int:
    """Run Unsloth's packed-attention probe for each attention shape of the model now, before training.

    The probe (unsloth/utils/hf_packed_attention.py, `_varlen_in_graph_probe`) runs one real forward
    and backward of the flash varlen kernel, and Unsloth first calls it while dynamo traces a
    compiled decoder block. Under DDP, Unsloth checkpoints those blocks with torch's non-reentrant
    checkpoint, whose saved-tensor hooks also catch the probe's tensors: the probe's backward then
    asks to recompute the block, which waits for dynamo's compile lock, which the tracing thread
    holds while it waits for that backward. Both ranks stop there for good (stack dumps of both
    ranks, 2 x H200, 2026-11-28). Run here, outside any checkpoint, the probe's answer is cached
    and tracing never calls it. Returns how many shapes were probed."""
    try:
        from unsloth.utils import hf_packed_attention as packed

        probe = packed._varlen_in_graph_eager
        sliding_window = packed._sliding_window
        no_window = packed._NO_WINDOW
    except (ImportError, AttributeError) as exc:
        logger.info("no packed-attention probe to warm (%s)", exc)
        return 0
    shapes = {
        shape
        for shape in attention_shapes(model, sliding_window)
        if shape[0] is not None and shape[-1] is not no_window  # on a GPU, with a window varlen takes
    }
    for shape in sorted(shapes, key=str):
        probe(*shape)
    logger.info("warmed Unsloth's packed-attention probe for %d attention shape(s)", len(shapes))
    return len(shapes)


def attention_shapes(model: Any, sliding_window: Any) -> set[tuple[Any, ...]]:
    """The probe's keys for the model's attention layers: (CUDA device index or None, dtype,
    head_dim, query heads, key heads, window), as Unsloth's packed attention passes them."""
    shapes = set()
    for module in model.modules():
        config, head_dim = getattr(module, "config", None), getattr(module, "head_dim", None)
        weight = getattr(getattr(module, "q_proj", None), "weight", None)
        if config is None or not isinstance(head_dim, int) or weight is None:
            continue
        index = weight.device.index if weight.device.type == "cuda" else None
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        window = sliding_window(module, {})
        # The key reaches attention with its own heads, or repeated to the query's (repeat_kv).
        for key_heads in {kv_heads, heads}:
            shapes.add((index, weight.dtype, head_dim, heads, key_heads, window))
    return shapes
