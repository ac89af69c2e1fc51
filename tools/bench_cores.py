"""Benchmark the foundation cores in one process, side by side, and print markdown tables.

    .venv/bin/python tools/bench_cores.py [--device cpu] [--quick]

1. The shipped pair's greedy acceptance on held-out code and prose (fixed k).
2. Verifier step time (one batched target forward + acceptance) vs batch size and draft length.
3. In-process tokens/s: target-only greedy vs speculative decoding, same prompts, same run,
   with a check that both produce the same tokens.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from common.engine.inprocess import GenerationRequest, InProcessEngine
from common.engine.policies import FixedK
from common.engine.verifier import VerifierCore
from common.logs import configure_logging
from common.models.loading import held_out_prompts, load_pair
from common.models.runner import ForwardItem
from common.models.runner_factory import make_runner
from common.protocol import SessionSpec, VerifyRequest


def engine(draft, target, k_max: int, speculative: bool = True) -> InProcessEngine:
    return InProcessEngine.from_models(draft if speculative else None, target, k_max)


def bench_acceptance(draft, target, prompts, max_new: int, ks: list[int]) -> list[str]:
    rows = ["| domain | k | prompts | acceptance rate | accepted/round | tokens/round |",
            "|---|---|---|---|---|---|"]
    for domain, ps in prompts.items():
        for k in ks:
            results = engine(draft, target, k).generate_many(
                [GenerationRequest(p, max_new, policy=FixedK(k)) for p in ps])
            drafted = sum(r.num_drafted for r in results)
            accepted = sum(r.num_accepted for r in results)
            rounds = sum(r.num_rounds for r in results)
            tokens = sum(len(r.token_ids) for r in results)
            rows.append(f"| {domain} | {k} | {len(ps)} | {accepted / drafted:.3f} | "
                        f"{accepted / rounds:.2f} | {tokens / rounds:.2f} |")
    return rows


def time_ms(fn, reps: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def verify_request(sid: str, round_no: int, base_len: int, draft: list[int]) -> VerifyRequest:
    return VerifyRequest(sid=sid, round=round_no, base_len=base_len, draft_ids=draft,
                         budget_ms=1e3, draft_ms=0.0, device_id="bench")


def verify_and_roll_back(core: VerifierCore, sids: list[str], k: int, round_no: int,
                         gen: torch.Generator) -> None:
    """One verify round of random k-token drafts for every session, then undone, so each
    repetition sees the same cached lengths."""
    vocab = core.runner.vocab_size
    items = [verify_request(sid, round_no, len(core.sessions[sid].committed),
                            torch.randint(0, vocab, (k,), generator=gen).tolist())
             for sid in sids]
    for sid, out in zip(sids, core.verify_batch(items), strict=True):
        committed = core.sessions[sid].committed
        del committed[len(committed) - len(out.result.new_tokens):]
        core.runner.truncate(sid, len(committed) - 1)


def bench_verifier_step(target, batch_sizes, draft_lens, context: int, reps: int) -> list[str]:
    """Warm sessions with `context` committed tokens; each step verifies a k-token draft and
    is then rolled back, so every repetition sees the same cached lengths."""
    rows = ["| batch | k | median step ms | ms per request | verified tokens/s |",
            "|---|---|---|---|---|"]
    gen = torch.Generator().manual_seed(0)
    vocab = target.vocab_size
    for b in batch_sizes:
        core = VerifierCore(make_runner(target.model), target.eos_token_id)
        sids = [f"s{i}" for i in range(b)]
        for sid in sids:
            prompt = torch.randint(0, vocab, (context,), generator=gen).tolist()
            core.open_session(SessionSpec(sid=sid, mode="sled", max_new_tokens=64), prompt)
            core.verify_batch([verify_request(sid, 0, context, [])])  # prefill, now warm
        rounds = iter(range(1, 10**9))  # shared by every k: rounds only move forward
        for k in draft_lens:
            ms = time_ms(lambda k=k, core=core, sids=sids, rounds=rounds: verify_and_roll_back(
                core, sids, k, next(rounds), gen), reps)
            rows.append(f"| {b} | {k} | {ms:.2f} | {ms / b:.2f} | {b * (k + 1) / ms * 1e3:.0f} |")
    return rows


def bench_step_cost(draft, target, context: int, reps: int) -> list[str]:
    """One warm decode step (1 new token after `context` cached) of each model alone: why
    speculation does or does not pay off in one process on this machine."""
    rows = ["| model | per-token FLOPs | median ms per 1-token step | vs target |",
            "|---|---|---|---|"]
    gen = torch.Generator().manual_seed(2)
    results = {}
    for name, m in (("target", target), ("draft", draft)):
        runner = make_runner(m.model)
        prompt = torch.randint(0, m.vocab_size, (context,), generator=gen).tolist()
        runner.forward([ForwardItem("s", prompt)])

        def step(runner=runner, length=context):
            runner.forward([ForwardItem("s", [1], num_logits=1)])
            runner.truncate("s", length)

        flops = 2 * sum(p.numel() for n, p in m.model.named_parameters()
                        if p.dim() == 2 and "embed" not in n)
        if m.model.config.tie_word_embeddings:
            flops += 2 * m.model.get_input_embeddings().weight.numel()
        results[name] = (flops, time_ms(step, reps))
    for name, (flops, ms) in results.items():
        rows.append(f"| {name} | {flops:,} | {ms:.2f} | {ms / results['target'][1]:.2f}x |")
    return rows


def bench_throughput(draft, target, prompts, max_new: int, ks: list[int],
                     concurrency: list[int]) -> list[str]:
    rows = ["| mode | concurrent | tokens | wall s | tokens/s | vs target-only | same tokens |",
            "|---|---|---|---|---|---|---|"]
    # Interleave the domains so every concurrency level sees both.
    all_prompts = [p for pair in zip(prompts["code"], prompts["prose"], strict=True) for p in pair]
    for c in concurrency:
        ps = all_prompts[:c] if c > 1 else all_prompts[:4]
        modes = [("target-only", 0)] + [(f"speculative k={k}", k) for k in ks]
        baseline_tps, baseline_tokens = None, None
        for name, k in modes:
            eng = engine(draft, target, max(k, 1), speculative=k > 0)
            reqs = [GenerationRequest(p, max_new, policy=FixedK(k) if k else None) for p in ps]
            start = time.perf_counter()
            # c == 1: one request at a time (single stream); else all together.
            results = ([eng.generate(r) for r in reqs] if c == 1 else eng.generate_many(reqs))
            wall = time.perf_counter() - start
            tokens = [r.token_ids for r in results]
            n = sum(len(t) for t in tokens)
            tps = n / wall
            if baseline_tps is None:
                baseline_tps, baseline_tokens = tps, tokens
            rows.append(f"| {name} | {c} | {n} | {wall:.2f} | {tps:.1f} | "
                        f"{tps / baseline_tps:.2f}x | {'yes' if tokens == baseline_tokens else 'NO'} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--quick", action="store_true", help="fewer prompts and repetitions")
    args = ap.parse_args()
    configure_logging("warning")
    quick = args.quick
    draft, target = load_pair(device=args.device, dtype=args.dtype)
    n_prompts = 6 if quick else 24
    prompts = held_out_prompts(target.tokenizer, n_prompts)
    max_new = 32 if quick else 64
    print("## Configuration\n")
    print(f"- machine: {platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {target.device}, "
          f"dtype {str(target.dtype).removeprefix('torch.')}")
    print(f"- target: {target.name} ({sum(p.numel() for p in target.model.parameters()):,} "
          f"params); draft: {draft.name} ({sum(p.numel() for p in draft.model.parameters()):,} "
          f"params)")
    print(f"- prompts: {n_prompts} held-out per domain (last <=128 tokens), {max_new} new "
          f"tokens, greedy\n")
    sections = [
        ("Acceptance (greedy, fixed k)",
         lambda: bench_acceptance(draft, target, prompts, max_new, [1, 4, 8])),
        ("Verifier step time (warm sessions, 128 cached tokens each; median)",
         lambda: bench_verifier_step(target, [1, 4, 16] if quick else [1, 4, 16, 32],
                                     [0, 1, 4, 8], 128, 3 if quick else 10)),
        ("Cost of one decode step (warm, 128 cached tokens; median)",
         lambda: bench_step_cost(draft, target, 128, 20 if quick else 100)),
        ("In-process generation: target-only vs speculative",
         lambda: bench_throughput(draft, target, prompts, max_new, [4, 8],
                                  [1, 8] if quick else [1, 8, 24])),
    ]
    for title, fn in sections:
        start = time.perf_counter()
        rows = fn()
        print(f"## {title}\n")
        print("\n".join(rows))
        print(f"\n({time.perf_counter() - start:.1f} s)\n", flush=True)


if __name__ == "__main__":
    main()
