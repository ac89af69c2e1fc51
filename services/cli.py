"""The `wisp` command.

    wisp generate --local "PROMPT"   draft + verify in this process, print text and round stats
"""

from __future__ import annotations

import argparse
import json
import sys

from common.errors import WispError
from common.logs import configure_logging


def _add_generation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--k-max", type=int, default=8, help="most draft tokens per round")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (text, token_ids, stats) on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wisp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="warning")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text")
    _add_generation_flags(gen)
    gen.add_argument("--local", action="store_true",
                     help="run draft and target in this process (no services needed)")
    gen.add_argument("--policy", default=None,
                     help="draft-length policy, e.g. 'fixed' or 'fixed:4' (default fixed:k_max)")
    gen.add_argument("--target-only", action="store_true",
                     help="no draft: the target decodes autoregressively")
    gen.add_argument("--draft", default=None, help="draft model folder or hub id")
    gen.add_argument("--target", default=None, help="target model folder or hub id")
    gen.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    gen.add_argument("--dtype", default=None, help="float32 | bfloat16 (default by device)")
    gen.add_argument("--allow-download", action="store_true",
                     help="allow fetching models from a hub (off by default)")
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    if not args.local:
        print("wisp: only --local generation is available in this build: the networked "
              "services (wisp up) are not part of it yet", file=sys.stderr)
        return 2
    from common.sampling import SamplingParams
    from services.edge_drafter.policies import policy_factory
    from services.inprocess import GenerationRequest, build_local_stack

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    stack = build_local_stack(args.draft, args.target, args.device, args.dtype, args.k_max,
                              target_only=args.target_only, allow_download=args.allow_download)
    policy = policy_factory(args.policy or "fixed", args.k_max)() if not args.target_only else None
    prompt_ids = stack.tokenizer.encode(args.prompt, add_special_tokens=False)
    result = stack.engine.generate(GenerationRequest(
        prompt_ids, args.max_new_tokens, params, args.seed, policy))
    text = stack.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    stats = result.stats() | {"mode": "target-only" if args.target_only else "speculative",
                              "k_max": args.k_max, "prompt_tokens": len(prompt_ids),
                              "tokens_per_round_hist": _histogram(result)}
    if args.json:
        print(json.dumps({"text": text, "token_ids": result.token_ids, "stats": stats}))
    else:
        print(args.prompt + text)
        print("\n--- " + ", ".join(f"{k}={v}" for k, v in stats.items()
                                   if k != "tokens_per_round_hist"), file=sys.stderr)
        print(f"--- committed tokens per round: {stats['tokens_per_round_hist']}",
              file=sys.stderr)
    return 0


def _histogram(result) -> dict[int, int]:
    hist: dict[int, int] = {}
    for r in result.rounds:
        hist[r.num_committed] = hist.get(r.num_committed, 0) + 1
    return dict(sorted(hist.items()))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        if args.command == "generate":
            return cmd_generate(args)
    except (WispError, ValueError, RuntimeError) as exc:
        print(f"wisp: error: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
