"""Draft-length policies side by side on held-out prompts, in one process, one run.

    .venv/bin/python tools/bench_policies.py [--max-new-tokens 64] [--quick]

For held-out code and held-out prose (models/eval_prompts.json: text none of the models or the
predictor was trained on), every policy generates greedily from the same prompts through the
in-process engine (the drafter and verifier cores, the same round loop as the services), all of
a domain's prompts in one lockstep batch. Per policy: acceptance length (accepted drafts per
round), wasted tokens, wasted drafting time (WDT) and drafting time per committed token,
rounds per request, the predictor's latency per call, and the ratios of WDT and rounds to
fixed:k_max. `predictor-code` is a predictor trained on code only (cross-domain on prose).
Every policy's tokens are compared with fixed:k_max's: greedy output must not change.

Times are this machine's (CPU, tiny pair): drafting time per token is the batched draft step's
wall time, the predictor's call included. `cost` is the expected round cost per committed token
under the predictor's cost model (draft step, round trip, verify in ms, from its metadata),
from the counted draft steps. "predictor µs/call" is measured in place (right after each draft
forward); a last table times the predictor alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from common.engine.inprocess import GenerationRequest, InProcessEngine
from common.engine.policies import PolicyCatalog
from common.engine.predictor.runtime import OnnxPredictor, PredictorSlot
from common.logs import configure_logging
from common.models.loading import DEFAULT_PREDICTOR, held_out_prompts, load_pair
from common.protocol import DRAFT_FEATURES


def policy_specs(k_max: int, cross: bool, tau: float) -> list[str]:
    specs = [f"fixed:{k_max}", "fixed:4", f"confidence:{tau:.3f}", "predictor", "ucb"]
    return specs + (["predictor-code"] if cross else [])


def confidence_tau(predictor: str) -> float:
    """τ of the confidence rule as `wisp predictor train` chose it by the same cost (its
    report's score is 1 - confidence), 0.1 without a report."""
    report = Path(predictor).with_name("report.json")
    if not report.exists():
        return 0.1
    return 1.0 - json.loads(report.read_text())["comparison"]["confidence"]["threshold"]


def run_policy(engine: InProcessEngine, prompts: list[list[int]], policy, max_new: int):
    start = time.perf_counter()
    results = engine.generate_many([GenerationRequest(p, max_new, policy=policy)
                                    for p in prompts])
    return results, time.perf_counter() - start


def summarize(results, cost: dict) -> dict:
    rounds = [r for res in results for r in res.rounds]
    committed = sum(r.committed for r in rounds) or 1
    drafted = sum(r.drafted for r in rounds)
    accepted = sum(r.accepted for r in rounds)
    wdt_ms = sum(r.wasted_draft_ms for r in rounds)
    draft_ms = sum(r.draft_ms for r in rounds)
    model_cost = (drafted * cost["draft_step_ms"]
                  + len(rounds) * (cost["rtt_ms"] + cost["verify_ms"])) / committed
    return {
        "acceptance_len": accepted / len(rounds), "committed_per_round": committed / len(rounds),
        "wasted_per_tok": (drafted - accepted) / committed, "wdt_ms_per_tok": wdt_ms / committed,
        "draft_ms_per_tok": draft_ms / committed, "rounds_per_req": len(rounds) / len(results),
        "model_cost_ms": model_cost, "tokens": [res.token_ids for res in results],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--k-max", type=int, default=8)
    ap.add_argument("--predictor", default=DEFAULT_PREDICTOR)
    ap.add_argument("--cross-predictor", default=None,
                    help="predictor trained on code only (default: beside --predictor)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per policy; medians reported")
    ap.add_argument("--quick", action="store_true", help="8 prompts a domain, one run")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args()
    configure_logging("warning")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    draft, target = load_pair(device="cpu", dtype="float32")
    prompts = held_out_prompts(target.tokenizer, 8 if args.quick else None)
    repeats = 1 if args.quick else args.repeats
    slot = PredictorSlot(OnnxPredictor.load(args.predictor))
    cross_path = Path(args.cross_predictor or Path(args.predictor).with_name(
        "predictor_code_only.onnx"))
    cross_slot = PredictorSlot(OnnxPredictor.load(cross_path)) if cross_path.exists() else None
    cost = slot.current.metadata.get("cost_model") or {"draft_step_ms": 25.0, "rtt_ms": 60.0,
                                                       "verify_ms": 20.0}
    engine = InProcessEngine.from_models(draft, target, args.k_max)
    print(f"# policies: {platform.node()} ({platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, CPU), tiny pair, greedy, {args.max_new_tokens} new "
          f"tokens, k_max {args.k_max}, prompts {[len(p) for p in prompts.values()]} "
          f"(code, prose), median of {repeats} runs; predictor {slot.current.version} "
          f"(threshold {slot.current.threshold:.3f}); cost model {cost}\n")
    table: dict[str, dict[str, dict]] = {}
    for domain, ps in prompts.items():
        rows: dict[str, dict] = {}
        for spec in policy_specs(args.k_max, cross_slot is not None,
                                 confidence_tau(args.predictor)):
            runs = []
            for _ in range(repeats):
                # A fresh catalog a run: the bandit and the latency counters start anew.
                use = cross_slot if spec == "predictor-code" else slot
                policy = PolicyCatalog.standard(("sled",), predictor=use).get(
                    "predictor" if spec == "predictor-code" else spec)
                if use.current is not None:
                    use.current.latency.__init__()
                results, wall = run_policy(engine, ps, policy, args.max_new_tokens)
                s = summarize(results, cost)
                s["wall_s"] = wall
                s["predictor_us"] = (use.current.latency.summary()["p50_us"]
                                     if spec.startswith("predictor") else None)
                runs.append(s)
            merged = {k: statistics.median(r[k] for r in runs) for k in runs[0]
                      if k != "tokens" and runs[0][k] is not None}
            merged["tokens"] = runs[0]["tokens"]
            merged["predictor_us"] = runs[0]["predictor_us"] and statistics.median(
                r["predictor_us"] for r in runs)
            rows[spec] = merged
        table[domain] = rows
        base = rows[f"fixed:{args.k_max}"]
        print(f"## held-out {domain} ({len(ps)} prompts)\n")
        print("| policy | accepted/round | wasted/tok | WDT ms/tok | draft ms/tok | "
              "rounds/req | cost ms/tok | predictor µs/call | WDT vs fixed | draft vs fixed | "
              "rounds vs fixed | same tokens |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for spec, r in rows.items():
            pus = f"{r['predictor_us']:.1f}" if r.get("predictor_us") else "-"
            same = "yes" if r["tokens"] == base["tokens"] else "NO"
            print(f"| {spec} | {r['acceptance_len']:.2f} | {r['wasted_per_tok']:.3f} | "
                  f"{r['wdt_ms_per_tok']:.3f} | {r['draft_ms_per_tok']:.3f} | "
                  f"{r['rounds_per_req']:.1f} | {r['model_cost_ms']:.1f} | {pus} | "
                  f"{r['wdt_ms_per_tok'] / base['wdt_ms_per_tok']:.2f} | "
                  f"{r['draft_ms_per_tok'] / base['draft_ms_per_tok']:.2f} | "
                  f"{r['rounds_per_req'] / base['rounds_per_req']:.2f} | {same} |")
        print()
    print("## predictor alone (warm, no draft forward in between)\n")
    print("| rows per call | p50 µs | p99 µs |")
    print("|---|---|---|")
    model = slot.current
    for batch in (1, 8, 64):
        x = np.random.default_rng(0).random((batch, len(DRAFT_FEATURES)), np.float32)
        model.latency.__init__()
        for _ in range(2000):
            model.predict(x)
        lat = model.latency.summary()
        print(f"| {batch} | {lat['p50_us']:.1f} | {lat['p99_us']:.1f} |")
    print()
    if args.json:
        for rows in table.values():
            for r in rows.values():
                r.pop("tokens")
        args.json.write_text(json.dumps(table, indent=1))
    same_all = all(r["tokens"] == rows[f"fixed:{args.k_max}"]["tokens"]
                   for rows in table.values() for r in rows.values() if "tokens" in r)
    return 0 if same_all else 1


if __name__ == "__main__":
    raise SystemExit(main())
