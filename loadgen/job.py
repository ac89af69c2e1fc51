"""A workload ready to send, from the command line's workload options: read, rescaled, output
lengths forced, capped to what the target can take, prompts built from the held-out corpus, and
the replay settings (SLO classes, timeouts). Shared by `loadgen replay` and `loadgen capacity`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadgen.fleet import assign, describe, known_profiles, load_fleets
from loadgen.runner import ReplayConfig
from loadgen.workload import (
    DEFAULT_SLO_CLASSES,
    PromptBuilder,
    RequestSpec,
    cap_lengths,
    force_output,
    read_workload,
    rescale,
)
from services.edge_drafter.profiles import DeviceProfile

__all__ = ["Job", "offered_rps", "prepare"]

DRAFT_ROOM = 17  # positions a round's draft and bonus token need beyond prompt + output


@dataclass(slots=True)
class Job:
    specs: list[RequestSpec]
    capped: set[int]  # indices of requests whose lengths were capped to the model
    prompts: PromptBuilder
    default_slo_class: str | None
    timeout_s: float
    context: int
    fleet: dict[str, Any]  # loadgen.fleet.describe of the fleet the devices were drawn from
    # Every profile a device may name (presets + the fleets file's own): for edges_behind.
    profiles: dict[str, DeviceProfile] = field(default_factory=dict)
    # The fleets file, when given: the edge-drafters need it too (loadgen.fleet.edge_env).
    fleets_file: Path | None = None

    def config(self, mode: str) -> ReplayConfig:
        return ReplayConfig(mode=mode, slo_classes=DEFAULT_SLO_CLASSES,
                            default_slo_class=self.default_slo_class,
                            request_timeout_s=self.timeout_s)

    @staticmethod
    def config_dict(args: Any) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def prepare(args: Any) -> Job:
    from transformers import AutoConfig, AutoTokenizer

    from common.models.loading import DEFAULT_TARGET

    default = None if args.slo_class == "none" else args.slo_class
    if default is not None and default not in DEFAULT_SLO_CLASSES:
        raise ValueError(f"unknown SLO class {default!r}; known: {sorted(DEFAULT_SLO_CLASSES)}")
    target = args.target or DEFAULT_TARGET
    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
    context = int(getattr(AutoConfig.from_pretrained(target, local_files_only=True),
                          "max_position_embeddings", 2048))
    specs = read_workload(args.trace, start=args.start, max_requests=args.max_requests)
    if not specs:
        raise ValueError(f"{args.trace}: no requests to send (start {args.start})")
    specs = force_output(rescale(specs, rate_scale=args.rate_scale,
                                 time_compression=args.time_compression), args.output_tokens)
    # The verifier's default prompt limit is half the context; a round's draft needs room too.
    asked = {s.index: (s.prompt_tokens, s.output_tokens) for s in specs}
    max_prompt = context // 2
    if getattr(args, "max_prompt_tokens", None) is not None:
        if args.max_prompt_tokens < 1:
            raise ValueError(f"--max-prompt-tokens must be >= 1, got {args.max_prompt_tokens}")
        max_prompt = min(max_prompt, args.max_prompt_tokens)
    specs, _ = cap_lengths(specs, max_prompt_tokens=max_prompt,
                           max_output_tokens=context // 2, max_context=context - DRAFT_ROOM)
    capped = {s.index for s in specs if (s.prompt_tokens, s.output_tokens) != asked[s.index]}
    fleets_file = getattr(args, "fleets_file", None)
    profiles = known_profiles(fleets_file)
    fleets = load_fleets(fleets_file, profiles=profiles)
    if args.fleet not in fleets:
        raise ValueError(f"unknown fleet {args.fleet!r}; known: {sorted(fleets)}")
    specs = assign(specs, fleets[args.fleet], args.seed)
    return Job(specs, capped, PromptBuilder(tokenizer, seed=args.seed), default, args.timeout_s,
               context, describe(fleets[args.fleet], profiles=profiles), profiles,
               Path(fleets_file) if fleets_file else None)


def offered_rps(specs: list[RequestSpec], window_s: float | None = None) -> float | None:
    """Requests per second the workload offers (None for one request or a single instant).

    With `window_s` (a probe of `loadgen.workload.window`): its requests over the window, or
    over their arrival span where the floor of requests stretched it; not over the span alone,
    which for a window that caught one burst of a trace reads as a rate the probe never kept
    up for its S seconds."""
    if window_s is not None:
        span = specs[-1].arrival_s - specs[0].arrival_s if specs else 0.0
        return len(specs) / max(window_s, span) if specs else None
    if len(specs) < 2 or specs[-1].arrival_s <= 0:
        return None
    return (len(specs) - 1) / specs[-1].arrival_s
