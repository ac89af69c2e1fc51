"""`loadgen`: replay a workload against a wisp stack and report it (DESIGN.md §7 metrics).

    loadgen replay --trace FILE --mode MODE [--max-requests N] [--json OUT] [--markdown OUT]
                   [--nats-url URL | --state-dir .wisp] [--rate-scale X] [--output-tokens N]
                   [--slo-class NAME] [--warmup-s S] [--seed N]

`replay` sends one workload (an Azure trace CSV or a JSONL file) in one mode through the real
SDK to the stack `wisp up` started (found through `<state-dir>/stack.json`) or to `--nats-url`,
then writes the JSON result and a Markdown summary and prints the summary. Prompts of the
requested lengths are cut from the held-out corpus; lengths are capped to what the target can
take, and the result says how many were.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="loadgen", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    rp = sub.add_parser("replay", help="one workload, one mode, against a running stack")
    rp.add_argument("--trace", required=True, type=Path, help="Azure trace CSV or JSONL")
    rp.add_argument("--mode", required=True,
                    choices=["wisp", "sled", "ucb", "centralized", "colocated"])
    rp.add_argument("--max-requests", type=int, default=None)
    rp.add_argument("--start", type=int, default=0, help="first trace row to replay")
    rp.add_argument("--rate-scale", type=float, default=1.0,
                    help="multiply the request rate (2: arrivals twice as dense)")
    rp.add_argument("--time-compression", type=float, default=1.0,
                    help="divide the trace's timeline (60: an hour of trace in a minute)")
    rp.add_argument("--output-tokens", type=int, default=None,
                    help="force every request's output length")
    rp.add_argument("--slo-class", default="standard",
                    help="SLO class of requests that name none ('none': no SLO)")
    rp.add_argument("--warmup-s", type=float, default=0.0,
                    help="leave requests sent in the first S seconds out of the metrics")
    rp.add_argument("--seed", type=int, default=0, help="prompt text selection")
    rp.add_argument("--nats-url", default=None)
    rp.add_argument("--state-dir", default=".wisp", help="where `wisp up` wrote stack.json")
    rp.add_argument("--target", default=None, help="target model folder (tokenizer, limits)")
    rp.add_argument("--timeout-s", type=float, default=300.0, help="per request")
    rp.add_argument("--json", dest="json_out", type=Path, default=None)
    rp.add_argument("--markdown", type=Path, default=None)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _replay(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2


def _nats_url(args) -> str:
    if args.nats_url:
        return args.nats_url
    from services.stack.launcher import find_stack

    stack = find_stack(args.state_dir)
    if stack is None:
        raise RuntimeError(f"no running stack found in {args.state_dir}/stack.json: start one "
                           "with `wisp up` or pass --nats-url")
    return stack["nats_url"]


def _replay(args) -> int:
    from transformers import AutoConfig, AutoTokenizer

    from common.models.loading import DEFAULT_TARGET
    from loadgen.report import markdown, summarize, write_json
    from loadgen.runner import ReplayConfig, replay
    from loadgen.workload import (
        DEFAULT_SLO_CLASSES,
        PromptBuilder,
        cap_lengths,
        force_output,
        read_workload,
        rescale,
    )

    url = _nats_url(args)
    target = args.target or DEFAULT_TARGET
    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
    context = int(getattr(AutoConfig.from_pretrained(target, local_files_only=True),
                          "max_position_embeddings", 2048))
    specs = read_workload(args.trace, start=args.start, max_requests=args.max_requests) \
        if args.trace.suffix == ".csv" else read_workload(args.trace,
                                                          max_requests=args.max_requests)
    specs = force_output(rescale(specs, rate_scale=args.rate_scale,
                                 time_compression=args.time_compression), args.output_tokens)
    # The verifier's default prompt limit is half the context; a round's draft needs room too.
    asked = {s.index: (s.prompt_tokens, s.output_tokens) for s in specs}
    specs, num_capped = cap_lengths(specs, max_prompt_tokens=context // 2,
                                    max_output_tokens=context // 2, max_context=context - 17)
    capped = {s.index for s in specs if (s.prompt_tokens, s.output_tokens) != asked[s.index]}
    default = None if args.slo_class == "none" else args.slo_class
    if default is not None and default not in DEFAULT_SLO_CLASSES:
        raise ValueError(f"unknown SLO class {default!r}; known: {sorted(DEFAULT_SLO_CLASSES)}")
    config = ReplayConfig(mode=args.mode, slo_classes=DEFAULT_SLO_CLASSES,
                          default_slo_class=default, request_timeout_s=args.timeout_s)
    outcome = asyncio.run(replay(url, specs, PromptBuilder(tokenizer, seed=args.seed), config,
                                 capped=capped))
    offered = len(specs) / specs[-1].arrival_s if len(specs) > 1 and specs[-1].arrival_s else None
    # Rates are over the measured window: the run less its warm-up.
    result = summarize(outcome.records, duration_s=max(0.0, outcome.duration_s - args.warmup_s),
                       offered_rps=offered, warmup_s=args.warmup_s)
    result.update({"mode": args.mode, "trace": str(args.trace), "capped_in_workload": num_capped,
                   "stopped_early": outcome.stopped_early,
                   "config": {k: (str(v) if isinstance(v, Path) else v)
                              for k, v in vars(args).items()}})
    text = markdown(result, title=f"loadgen replay: {args.trace.name}, mode {args.mode}")
    print(text)
    if args.json_out:
        write_json(result, args.json_out)
    if args.markdown:
        args.markdown.write_text(text)
    return 0 if outcome.stopped_early is None else 1


if __name__ == "__main__":
    sys.exit(main())
