"""`wisp predictor ...`: the rejection predictor's training data and model.

    wisp predictor collect --split train     draft against the target, write (features, label)
    wisp predictor collect --split heldout
    wisp predictor train                     fit, compare, choose a threshold, export to ONNX

Reproducing the shipped predictor (models/predictor/) is these three commands with their
defaults; docs/predictor.md explains the choices and the report.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_DATA = Path(".wisp/predictor")


def add_predictor_parser(sub) -> None:
    pred = sub.add_parser("predictor", help="rejection predictor: collect data, train, export")
    psub = pred.add_subparsers(dest="predictor_command", required=True)
    col = psub.add_parser("collect", help="draft against the target, write (features, label)")
    col.add_argument("--split", choices=["train", "heldout"], default="train")
    col.add_argument("--out", type=Path, default=None,
                     help=f"pairs file (default {DEFAULT_DATA}/<split>.npz)")
    col.add_argument("--limit", type=int, default=0, help="at most this many prompts a domain")
    col.add_argument("--max-new-tokens", type=int, default=64)
    col.add_argument("--k-max", type=int, default=8, help="tokens drafted every round")
    col.add_argument("--temperatures", default="0,0.8",
                     help="comma-separated; 0 = greedy labels (default 0,0.8)")
    col.add_argument("--seed", type=int, default=0)
    col.add_argument("--draft", default=None, help="draft model folder (default: shipped)")
    col.add_argument("--target", default=None, help="target model folder (default: shipped)")
    col.add_argument("--device", default="cpu")
    tr = psub.add_parser("train", help="fit and compare predictors, export the chosen to ONNX")
    tr.add_argument("--train", type=Path, default=DEFAULT_DATA / "train.npz")
    tr.add_argument("--heldout", type=Path, default=DEFAULT_DATA / "heldout.npz")
    tr.add_argument("--out", type=Path, default=None,
                    help="output folder (default: the shipped models/predictor)")
    tr.add_argument("--draft-step-ms", type=float, default=25.0,
                    help="cost model: one draft step on the edge")
    tr.add_argument("--rtt-ms", type=float, default=60.0, help="cost model: round trip")
    tr.add_argument("--verify-ms", type=float, default=20.0, help="cost model: one verify")
    tr.add_argument("--max-rounds-ratio", type=float, default=1.4,
                    help="at most this many times fixed k_max's rounds per committed token, on "
                         "greedy and on sampled rounds (0: no cap)")
    tr.add_argument("--epochs", type=int, default=300)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--version", default=None, help="version name (default: kind + digest)")


def cmd_predictor(args: argparse.Namespace) -> int:
    if args.predictor_command == "collect":
        return _collect(args)
    return _train(args)


def _collect(args: argparse.Namespace) -> int:
    from common.engine.inprocess import build_local_stack
    from common.engine.predictor.collect import collect, load_prompts
    from common.models.loading import DEFAULT_MODELS_DIR

    prompts = load_prompts(args.split, DEFAULT_MODELS_DIR)
    if args.limit:
        prompts = {dom: texts[:args.limit] for dom, texts in prompts.items()}
    temps = tuple(float(t) for t in args.temperatures.split(",") if t.strip())
    if not temps or any(t < 0 for t in temps):
        raise ValueError(f"--temperatures needs values >= 0, got {args.temperatures!r}")
    stack = build_local_stack(args.draft, args.target, args.device, None, args.k_max)
    pairs = collect(stack.engine, stack.tokenizer, prompts, temps, args.max_new_tokens,
                    seed=args.seed)
    out = args.out or DEFAULT_DATA / f"{args.split}.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    pairs.save(out)
    print(json.dumps({"out": str(out), "rows": len(pairs),
                      "rounds": int(len(pairs.round_starts()) - 1),
                      "accepted_frac": round(float(pairs.accepted.mean()), 4)
                      if len(pairs) else None}))
    return 0


def _train(args: argparse.Namespace) -> int:
    from common.engine.predictor.cost import CostModel
    from common.engine.predictor.model import TrainSettings
    from common.engine.predictor.pairs import PairSet
    from common.engine.predictor.release import train_release
    from common.models.loading import DEFAULT_PREDICTOR

    for path, split in ((args.train, "train"), (args.heldout, "heldout")):
        if not path.exists():
            raise ValueError(f"{path} does not exist: run `wisp predictor collect --split "
                             f"{split}` first")
    cost = CostModel(args.draft_step_ms, args.rtt_ms, args.verify_ms, args.max_rounds_ratio)
    out = args.out or Path(DEFAULT_PREDICTOR).parent
    report = train_release(PairSet.load(args.train), PairSet.load(args.heldout), cost, out,
                           TrainSettings(epochs=args.epochs, seed=args.seed), args.version)
    summary = {kind: {"threshold": c["threshold"],
                      "heldout_vs_fixed": c["heldout"]["all"]["vs_fixed_k_max"]}
               for kind, c in report["comparison"].items()}
    print(json.dumps({"out": str(out), "chosen": report["chosen"],
                      "version": report["version"], "comparison": summary}, indent=1))
    return 0
