"""Collect (features, label) pairs: draft against the target on a prompt split, k_max tokens
every round, and record each round's feature rows with its verdict.

Rounds run through the in-process engine (the same drafter and verifier cores, round loop and
features as the services), so the rows are what a live edge would send. Greedy rounds label
greedy acceptance; rounds at a temperature label acceptance by speculative sampling at it
(the verifier's own rule, seeded).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from common.engine.inprocess import GenerationRequest, InProcessEngine
from common.engine.policies import FixedK, RoundFeedback
from common.engine.predictor.pairs import PairSet
from common.protocol import SamplingParams

__all__ = ["collect", "load_prompts"]


class _Recorder(FixedK):
    """k_max tokens a round, and every verdict kept: (feature rows [k][F], num_accepted)."""

    def __init__(self) -> None:
        super().__init__(None)
        self.rounds: list[tuple[list[list[float]], int]] = []

    def observe(self, feedback: RoundFeedback) -> None:
        if feedback.num_drafted:
            self.rounds.append((feedback.features.tolist(), feedback.num_accepted))


def load_prompts(split: str, root: Path) -> dict[str, list[str]]:
    """{"code": [...], "prose": [...]} of a split: "train" (models/predictor/prompts.json,
    cut from the pair's training text) or "heldout" (models/eval_prompts.json)."""
    files = {"train": root / "predictor" / "prompts.json", "heldout": root / "eval_prompts.json"}
    if split not in files:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(files)}")
    data = json.loads(files[split].read_text())
    return {"code": list(data["code"]), "prose": list(data["prose"])}


def collect(engine: InProcessEngine, tokenizer, prompts: dict[str, list[str]],
            temperatures: tuple[float, ...] = (0.0, 0.8), max_new_tokens: int = 64,
            batch: int = 16, seed: int = 0,
            progress: Callable[[str], None] | None = None) -> PairSet:
    """Pairs from every prompt of every domain at every temperature; `batch` sessions share
    each engine step."""
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    sets: list[PairSet] = []
    next_round = 0
    start = time.perf_counter()
    for domain, texts in prompts.items():
        ids = [tokenizer.encode(t) for t in texts]
        for temperature in temperatures:
            params = SamplingParams(temperature=temperature)
            for lo in range(0, len(ids), batch):
                recorder = _Recorder()
                chunk = ids[lo:lo + batch]
                engine.generate_many([
                    GenerationRequest(p, max_new_tokens, params,
                                      seed=seed * 1_000_003 + lo + i if temperature else None,
                                      policy=recorder)
                    for i, p in enumerate(chunk)])
                part = PairSet.from_rounds(recorder.rounds, domain, temperature, next_round)
                next_round += len(recorder.rounds)
                sets.append(part)
                say(f"[collect] {domain} T={temperature:g}: prompts {lo + len(chunk)}"
                    f"/{len(ids)}, rows {sum(len(s) for s in sets)}, "
                    f"{time.perf_counter() - start:.0f}s")
    return PairSet.concat(sets)
