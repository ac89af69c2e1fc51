"""Pick the best `ModelRunner` for a model: batched paged attention when the architecture is
supported, the generic one-at-a-time HF runner otherwise."""

from __future__ import annotations

import structlog

from common.models.hf_runner import HFRunner
from common.models.paged_llama import unsupported_reason
from common.models.paged_runner import PagedRunner
from common.models.runner import ModelRunner

log = structlog.get_logger()

_PAGED_KWARGS = frozenset({"kv_budget_bytes", "num_blocks", "block_size"})
_HF_KWARGS = frozenset({"max_sequences"})


def make_runner(model, **kw) -> ModelRunner:
    """`PagedRunner(model, **kw)` if it supports the model, else `HFRunner(model, **kw)`.

    Keyword arguments meant for the other runner are dropped, so callers can pass both kinds
    (e.g. `kv_budget_bytes=..., max_sequences=...`) without knowing which one they get.
    """
    unknown = set(kw) - _PAGED_KWARGS - _HF_KWARGS
    if unknown:
        raise TypeError(f"make_runner got unexpected keyword arguments {sorted(unknown)}")
    model_type = getattr(model.config, "model_type", None)
    reason = unsupported_reason(model)
    if reason is None:
        runner = PagedRunner(model, **{k: v for k, v in kw.items() if k in _PAGED_KWARGS})
        log.info(
            "model_runner_selected",
            runner="PagedRunner",
            model_type=model_type,
            num_blocks=runner.blocks.num_blocks,
            block_size=runner.blocks.block_size,
        )
        return runner
    log.info("model_runner_selected", runner="HFRunner", model_type=model_type, reason=reason)
    return HFRunner(model, **{k: v for k, v in kw.items() if k in _HF_KWARGS})
