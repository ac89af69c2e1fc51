"""The `wisp` command.

    wisp up [--demo PROMPT]           run the whole stack here (embedded NATS + Redis by default)
    wisp generate "PROMPT"            generate through a running stack (the SDK over NATS)
    wisp generate --local "PROMPT"    draft + verify in this process, no services
    wisp predictor collect|train      the rejection predictor's data and model (WISP)
    wisp calibrate [--json]           fit the verifier's latency estimator on this machine
    wisp bench scheduler [--json]     time the batch policies' selection over a synthetic queue
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
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
    gen.add_argument("--mode", default="sled",
                     help="serving mode: sled, wisp, ucb (edge), centralized, colocated "
                          "(server); with --local it picks the default policy (default sled)")
    gen.add_argument("--nats-url", default=None,
                     help="NATS of a running stack (default: the one `wisp up` started)")
    gen.add_argument("--state-dir", default=".wisp", help="where `wisp up` keeps its state")
    gen.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for tokens")
    gen.add_argument("--local", action="store_true",
                     help="run draft and target in this process (no services needed)")
    gen.add_argument("--policy", default=None,
                     help="draft-length policy: fixed[:k], predictor[:threshold], "
                          "confidence:τ, ucb[:args] (default: the mode's)")
    gen.add_argument("--predictor", default=None,
                     help="with --local: rejection predictor ONNX file (default: shipped)")
    gen.add_argument("--target-only", action="store_true",
                     help="no draft: the target decodes autoregressively")
    gen.add_argument("--draft", default=None, help="draft model folder or hub id")
    gen.add_argument("--target", default=None, help="target model folder or hub id")
    gen.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    gen.add_argument("--dtype", default=None, help="float32 | bfloat16 (default by device)")
    gen.add_argument("--allow-download", action="store_true",
                     help="allow fetching models from a hub (off by default)")
    from services.stack.launcher import add_up_arguments  # no torch at import

    up = sub.add_parser("up", help="run NATS, Redis and every service on this machine")
    add_up_arguments(up)
    up.add_argument("--demo", default=None, metavar="PROMPT",
                    help="once ready, generate PROMPT in every mode (wisp, ucb, sled, centralized, "
                         "colocated)")
    up.add_argument("--max-new-tokens", type=int, default=48, help="for --demo")
    up.add_argument("--exit-after-demo", action="store_true",
                    help="stop the stack after the demo instead of serving until Ctrl-C")
    from services.cli_bench import add_bench_parser
    from services.cli_calibrate import add_calibrate_parser
    from services.cli_predictor import add_predictor_parser

    add_predictor_parser(sub)
    add_calibrate_parser(sub)
    add_bench_parser(sub)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    if not args.local:
        return cmd_generate_remote(args)
    from common.engine.inprocess import GenerationRequest, build_local_stack
    from common.protocol import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    target_only = args.target_only or args.mode == "centralized"
    policy = slot = None
    if not target_only:
        policy, slot = _local_policy(args.mode, args.policy, args.predictor)
    stack = build_local_stack(args.draft, args.target, args.device, args.dtype, args.k_max,
                              target_only=target_only, allow_download=args.allow_download)
    prompt_ids = stack.tokenizer.encode(args.prompt, add_special_tokens=False)
    result = stack.engine.generate(GenerationRequest(
        prompt_ids, args.max_new_tokens, params, args.seed, policy))
    text = stack.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    stats = result.stats() | {
        "mode": "target-only" if target_only else args.mode,
        "policy": policy.spec if policy else None, "k_max": args.k_max,
        "prompt_tokens": len(prompt_ids), "tokens_per_round_hist": _histogram(result)}
    if slot is not None and slot.current is not None:
        stats["predictor_version"] = slot.current.version
        stats["predictor_latency_us"] = {k: round(v, 2) for k, v in
                                         slot.current.latency.summary().items()}
    if args.json:
        print(json.dumps({"text": text, "token_ids": result.token_ids, "stats": stats}))
    else:
        print(args.prompt + text)
        print("\n--- " + ", ".join(f"{k}={v}" for k, v in stats.items()
                                   if k != "tokens_per_round_hist"), file=sys.stderr)
        print(f"--- committed tokens per round: {stats['tokens_per_round_hist']}",
              file=sys.stderr)
    return 0


def _local_policy(mode: str, spec: str | None, predictor: str | None):
    """The policy a --local generation of `mode` drafts with, and the predictor slot behind
    it (None when the policy needs none); an unserved mode or bad spec is a ValueError."""
    from common.engine.policies import PolicyCatalog
    from common.engine.predictor.runtime import PredictorSlot
    from common.models.loading import DEFAULT_PREDICTOR

    slot = PredictorSlot()
    wants_model = (spec or "").startswith("predictor") or (spec is None and mode == "wisp")
    if wants_model:
        # A model that cannot serve is a warning, and the policy drafts k_max (fixed k), as
        # an edge-drafter does: the output is the same, only the drafting differs.
        slot.install_file(predictor or DEFAULT_PREDICTOR)
    catalog = PolicyCatalog.standard(("sled", "wisp", "ucb", "colocated"), predictor=slot)
    try:
        policy = catalog.for_session(mode, spec)
    except WispError as err:
        raise ValueError(err.message) from None
    return policy, (slot if wants_model else None)


def _stack_nats_url(args) -> str:
    from services.stack.launcher import stack_nats_url

    return stack_nats_url(args.nats_url, args.state_dir, ", or use --local")


def cmd_generate_remote(args: argparse.Namespace) -> int:
    out = asyncio.run(_remote_generate(
        _stack_nats_url(args), args.prompt, args.mode, args.max_new_tokens, args.timeout,
        stream=not args.json, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, k_max=args.k_max, policy=args.policy))
    if args.json:
        print(json.dumps({"text": out["text"], "token_ids": out["token_ids"],
                          "stats": out["stats"]}))
    return 0


async def _remote_generate(nats_url: str, prompt: str, mode: str, max_new_tokens: int,
                           timeout: float, stream: bool, **params) -> dict:
    from common.client import Client

    ids: list[int] = []
    text = []
    async with Client(nats_url, timeout_s=timeout) as client:
        gen = client.generate(prompt, max_new_tokens=max_new_tokens, mode=mode, **params)
        if stream:
            print(prompt, end="", flush=True)
        async for tok in gen:
            ids.extend(tok.token_ids)
            text.append(tok.text)
            if stream:
                print(tok.text, end="", flush=True)
        done = gen.done
    t, s = done.timings, done.stats
    stats = {"mode": mode, "sid": done.sid, "num_tokens": done.num_tokens,
             "finish_reason": done.finish_reason, "rounds": s.rounds, "drafted": s.drafted,
             "accepted": s.accepted, "wasted": s.drafted - s.accepted,
             "wasted_draft_ms": round(s.wasted_draft_ms, 3),
             "acceptance_rate": round(s.accepted / s.drafted, 4) if s.drafted else None,
             "ttft_ms": round(t.ttft_ms, 2), "tpot_ms": round(t.tpot_ms, 2),
             "e2e_ms": round(t.e2e_ms, 2)}
    if stream:
        print("\n--- " + ", ".join(f"{k}={v}" for k, v in stats.items()), file=sys.stderr)
    return {"text": "".join(text), "token_ids": ids, "stats": stats}


def cmd_up(args: argparse.Namespace) -> int:
    from services.stack.launcher import StopSignals, launch_stack, open_stack, stop_stack

    # From here on SIGINT/SIGTERM never kill `wisp up` outright: the first one interrupts
    # starting or serving, then every child is stopped and reaped; another one only makes
    # that stop fast (see StopSignals). Should `wisp up` die anyway, its children get
    # SIGTERM from the kernel (services/stack/children.py).
    signals = StopSignals().install()
    stack = open_stack(args, signals)  # one stack per state dir; nothing runs yet
    code, interrupted_start = 0, None
    try:
        with signals.interruptible():
            launch_stack(stack, args)
            code = _serve(stack, args)
    except KeyboardInterrupt:
        # While serving, the documented way to stop (exit 0); while starting, a failure.
        if not stack.ready:
            interrupted_start = signal.Signals(
                signals.received[0] if signals.received else signal.SIGINT)
            code = 128 + interrupted_start
    finally:
        stop_stack(stack)
    if interrupted_start is not None:
        print(f"wisp: interrupted by {interrupted_start.name} while starting",
              file=sys.stderr)
    return code


def _serve(stack, args: argparse.Namespace) -> int:
    metrics = next(s for s in stack.services if s.name == "metrics")
    predictor = next(s for s in stack.services if s.name == "predictor")
    print(f"""
wisp is up.
  NATS        {stack.nats_url}
  Redis       {stack.redis_url}
  dashboard   {metrics.url}/
  metrics     {metrics.url}/metrics   summary {metrics.url}/summary
  predictor   {predictor.url}/metrics   status {predictor.url}/status
  logs        {stack.state_dir}/logs/
Try:  wisp generate "def fibonacci(n):" --mode wisp   (or ucb, sled, centralized, colocated)
""", file=sys.stderr, flush=True)
    if args.demo:
        outputs = {}
        for mode in ("wisp", "ucb", "sled", "centralized", "colocated"):
            print(f"\n=== mode {mode}", file=sys.stderr, flush=True)
            outputs[mode] = asyncio.run(_remote_generate(
                stack.nats_url, args.demo, mode, args.max_new_tokens, 120.0, stream=True))
        same = len({tuple(o["token_ids"]) for o in outputs.values()}) == 1
        print(f"\nall {len(outputs)} modes produced {'the same' if same else 'DIFFERENT'} tokens "
              "(greedy: each must equal the target's own greedy output)", file=sys.stderr)
        if not same:
            return 1
    if not args.exit_after_demo:
        print("serving; Ctrl-C to stop", file=sys.stderr, flush=True)
        while True:
            signal.pause()
    return 0


def _histogram(result) -> dict[int, int]:
    hist: dict[int, int] = {}
    for r in result.rounds:
        hist[r.committed] = hist.get(r.committed, 0) + 1
    return dict(sorted(hist.items()))


def main(argv: list[str] | None = None) -> int:
    from common.client import WispClientError  # no torch: cheap to import here

    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "up":
            return cmd_up(args)
        if args.command == "calibrate":
            from services.cli_calibrate import cmd_calibrate

            return cmd_calibrate(args)
        if args.command == "bench":
            from services.cli_bench import cmd_bench

            return cmd_bench(args)
        if args.command == "predictor":
            from services.cli_predictor import cmd_predictor

            return cmd_predictor(args)
    except (WispError, WispClientError, ValueError, RuntimeError) as exc:
        print(f"wisp: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside `wisp up`'s own handling: no traceback
        print("wisp: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
