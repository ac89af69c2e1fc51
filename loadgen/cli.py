"""`loadgen`: replay a workload against a wisp stack and report it (DESIGN.md §7 metrics).

    loadgen replay --trace FILE --mode MODE [--max-requests N] [--json OUT] [--markdown OUT]
                   [--nats-url URL | --state-dir .wisp] [--rate-scale X] [--output-tokens N]
                   [--slo-class NAME] [--warmup-s S] [--seed N]

    loadgen sweep --trace FILE --modes sled,wisp (--rates 0.5,1,2,4 | --concurrency 1,4,16)
                  [--repeats N] [--warmup-s S] [--out-dir DIR] [--nats-url URL | --state-dir D]

`replay` sends one workload (an Azure trace CSV or a JSONL file) in one mode through the real
SDK to the stack `wisp up` started (found through `<state-dir>/stack.json`) or to `--nats-url`,
then writes the JSON result and a Markdown summary and prints the summary. Prompts of the
requested lengths are cut from the held-out corpus; lengths are capped to what the target can
take, and the result says how many were. `capacity` searches each mode's highest load within
SLO (loadgen/capacity_run.py); `sweep` measures every mode at each given load
(loadgen/sweep_run.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

__all__ = ["main"]


MODES = ("centralized", "sled", "colocated", "ucb", "wisp")


def _workload_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, type=Path, help="Azure trace CSV or JSONL")
    p.add_argument("--max-requests", type=int, default=None)
    p.add_argument("--start", type=int, default=0, help="first trace row to replay")
    p.add_argument("--rate-scale", type=float, default=1.0,
                   help="multiply the request rate (2: arrivals twice as dense)")
    p.add_argument("--time-compression", type=float, default=1.0,
                   help="divide the trace's timeline (60: an hour of trace in a minute)")
    p.add_argument("--output-tokens", type=int, default=None,
                   help="force every request's output length")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="cap prompts to this many tokens (default: half the target's context); "
                        "the report counts the capped requests")
    p.add_argument("--slo-class", default="standard",
                   help="SLO class of requests that name none ('none': no SLO)")
    p.add_argument("--seed", type=int, default=0, help="prompt text and device draws")
    p.add_argument("--fleet", default="none",
                   help="emulated edge fleet (loadgen/fleets.toml): mixed, phones, wired, "
                        "jetsons, none; requests that name a device keep it")
    p.add_argument("--fleets-file", type=Path, default=None, help="more fleets (TOML)")
    p.add_argument("--target", default=None, help="target model folder (tokenizer, limits)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per request")
    p.add_argument("--json", dest="json_out", type=Path, default=None)
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar or progress lines on stderr")


def _positive_list(kind: type):
    """An argparse type: comma-separated numbers, each > 0 (`kind`: int or float)."""
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a list of {kind.__name__}s: {text!r}") from None
        if not values or not all(0 < v < float("inf") for v in values):
            raise argparse.ArgumentTypeError(f"expected numbers > 0, got {text!r}")
        return values
    return parse


def _stack_options(p: argparse.ArgumentParser, what: str) -> None:
    """Where a multi-mode command sends its load."""
    p.add_argument("--nats-url", default=None,
                   help=f"{what} this stack for every mode (default: an embedded stack per mode)")
    p.add_argument("--out-dir", type=Path, default=Path("loadgen-results"),
                   help="JSON, Markdown and plots go here")
    p.add_argument("--no-partition", dest="partition", action="store_false",
                   help="do not pin the embedded stack's server side and edges to disjoint "
                        "CPUs")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="loadgen", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    rp = sub.add_parser("replay", help="one workload, one mode, against a running stack")
    _workload_options(rp)
    rp.add_argument("--mode", required=True, choices=MODES)
    rp.add_argument("--warmup-s", type=float, default=0.0,
                    help="leave requests sent in the first S seconds out of the metrics")
    rp.add_argument("--nats-url", default=None)
    rp.add_argument("--state-dir", default=".wisp", help="where `wisp up` wrote stack.json")
    rp.add_argument("--markdown", type=Path, default=None)
    rp.add_argument("--plots", type=Path, default=None,
                    help="write cdf.png (TTFT/TPOT) and over_time.png (batch size, acceptance "
                         "length) to this folder")
    cp = sub.add_parser("capacity", help="per mode, the highest load with SLO attainment >= 90 %%")
    _workload_options(cp)
    cp.add_argument("--modes", default=",".join(MODES))
    cp.add_argument("--repeats", type=int, default=2, help="replays per probed load")
    cp.add_argument("--steps", type=int, default=3, help="bisection steps after bracketing")
    cp.add_argument("--start-load", type=float, default=1.0, help="first rate multiplier")
    cp.add_argument("--max-load", type=float, default=64.0)
    cp.add_argument("--min-load", type=float, default=1 / 64,
                    help="give up below this (a mode that fails even there has no capacity "
                         "under these SLOs and devices)")
    cp.add_argument("--probe-s", type=float, default=None,
                    help="each probe sends the requests that arrive in its first S seconds at "
                         "that load (default: the whole workload, which at high loads shrinks "
                         "to a burst)")
    cp.add_argument("--min-probe-requests", type=int, default=20,
                    help="with --probe-s, at least this many requests per probe")
    _stack_options(cp, "probe")
    sp = sub.add_parser("sweep", help="every mode at each load of a rate or concurrency sweep")
    _workload_options(sp)
    sp.add_argument("--modes", default=",".join(MODES))
    axis = sp.add_mutually_exclusive_group(required=True)
    axis.add_argument("--rates", type=_positive_list(float),
                      help="rate multipliers of the workload, e.g. 0.5,1,2,4 (open loop)")
    axis.add_argument("--concurrency", type=_positive_list(int),
                      help="client counts, e.g. 1,4,16 (closed loop: each client sends the "
                           "next request when its previous one finished; timestamps ignored)")
    sp.add_argument("--warmup-s", type=float, default=0.0,
                    help="leave requests sent in each run's first S seconds out of the metrics")
    sp.add_argument("--repeats", type=int, default=1, help="replays per point")
    _stack_options(sp, "sweep")
    sp.add_argument("--state-dir", default=None,
                    help="sweep the stack `wisp up` runs from here (as --nats-url)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "capacity":
            from loadgen.capacity_run import run_capacity

            return run_capacity(args)
        if args.command == "sweep":
            from loadgen.sweep_run import run_sweep

            return run_sweep(args)
        return _replay(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2


def _nats_url(args) -> str:
    from services.stack.launcher import stack_nats_url

    return stack_nats_url(args.nats_url, args.state_dir)


def _replay(args) -> int:
    from loadgen.job import offered_rps, prepare
    from loadgen.progress import ProgressDisplay
    from loadgen.report import markdown, summarize, write_json
    from loadgen.runner import replay

    url = _nats_url(args)
    job = prepare(args)
    outcome = asyncio.run(replay(url, job.specs, job.prompts, job.config(args.mode),
                                 capped=job.capped,
                                 display=None if args.quiet else ProgressDisplay()))
    # Rates are over the measured window: the run less its warm-up.
    result = summarize(outcome.records, duration_s=max(0.0, outcome.duration_s - args.warmup_s),
                       offered_rps=offered_rps(job.specs), warmup_s=args.warmup_s)
    result.update({"mode": args.mode, "trace": str(args.trace), "fleet": job.fleet,
                   "capped_in_workload": len(job.capped), "stopped_early": outcome.stopped_early,
                   "config": job.config_dict(args)})
    text = markdown(result, title=f"loadgen replay: {args.trace.name}, mode {args.mode}")
    print(text)
    if args.json_out:
        write_json(result, args.json_out)
    if args.markdown:
        args.markdown.write_text(text)
    if args.plots:
        from loadgen.report import RoundSample, plot_cdfs, plot_over_time

        args.plots.mkdir(parents=True, exist_ok=True)
        plot_cdfs({args.mode: outcome.records}, args.plots / "cdf.png")
        plot_over_time([RoundSample.from_event(e) for e in outcome.round_events],
                       args.plots / "over_time.png")
    return 0 if outcome.stopped_early is None else 1


if __name__ == "__main__":
    sys.exit(main())
