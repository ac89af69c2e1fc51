"""Prompts of a requested length for the load generator, cut from the held-out corpus.

Traces give prompt *lengths*, not texts (../shared/traces/README.md), so the replayer makes a
prompt of each length from text the shipped pair never saw in training
(``models/eval_prompts.json``, the same texts tests and benchmarks use): every held-out text,
code then prose, tokenized once with the target's tokenizer and joined by a blank line into one
ring of token ids. A request's prompt is a window of that ring:

* its start is ``(offset + index * stride) mod L`` — ``offset`` drawn from the seed, ``stride``
  the integer coprime to the ring length ``L`` nearest ``L / golden ratio``. Deterministic for
  (seed, index); the first ``L`` requests all start at different positions, and consecutive
  requests start far apart, so different requests get different text (a verifier's prefix
  cache, if any, cannot turn a replay into repeated prompts);
* a window longer than the ring wraps around (the corpus is a few thousand tokens; trace
  contexts reach several thousand more).
"""

from __future__ import annotations

import math
import random
import sys
from typing import TYPE_CHECKING, Any

from common.models.loading import held_out_prompts

if TYPE_CHECKING:
    from loadgen.workload import RequestSpec

__all__ = ["PromptBuilder"]

_GOLDEN = (1 + math.sqrt(5)) / 2
_SEPARATOR = "\n\n"  # between texts, and at the seam where the ring wraps


class PromptBuilder:
    """Token ids for a workload's requests; ``tokenizer`` is the target's (a transformers
    tokenizer: only ``encode(text, add_special_tokens=False)`` is used)."""

    def __init__(self, tokenizer: Any, *, seed: int = 0):
        self.tokenizer = tokenizer
        self.seed = seed
        texts = held_out_prompts(tokenizer, per_domain=None, max_tokens=sys.maxsize)
        separator = tokenizer.encode(_SEPARATOR, add_special_tokens=False)
        corpus: list[int] = []
        for domain in ("code", "prose"):
            for ids in texts[domain]:
                corpus += ids + separator
        if not corpus:
            raise ValueError("the held-out corpus (models/eval_prompts.json) is empty")
        self._corpus = corpus
        n = len(corpus)
        stride = max(1, round(n / _GOLDEN))
        while math.gcd(stride, n) != 1:
            stride += 1
        self._stride = stride % n if n > 1 else 0
        self._offset = random.Random(f"wisp-prompts:{seed}").randrange(n)

    @property
    def corpus_tokens(self) -> int:
        """Length of the ring of token ids the prompts are cut from."""
        return len(self._corpus)

    def start(self, index: int) -> int:
        """Where request `index`'s window begins in the ring."""
        if index < 0:
            raise ValueError(f"request index must be >= 0, got {index}")
        return (self._offset + index * self._stride) % len(self._corpus)

    def build(self, n_tokens: int, index: int) -> list[int]:
        """Exactly `n_tokens` ids for request `index` (wrapping around the ring if needed)."""
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        corpus, pos = self._corpus, self.start(index)
        out: list[int] = []
        while len(out) < n_tokens:
            take = min(n_tokens - len(out), len(corpus) - pos)
            out += corpus[pos:pos + take]
            pos = 0
        return out

    def ids_for(self, spec: RequestSpec) -> list[int]:
        """The prompt of `spec`: its own text if it has one, else :meth:`build`.

        A text is tokenized and cut to its *last* ``spec.prompt_tokens`` tokens (the end is
        what the model continues, as in ``held_out_prompts``; this is how :func:`cap_lengths`
        shortens it); a shorter text is never padded — padding would change what is asked —
        so for a text ``prompt_tokens`` is an upper bound (see ``read_jsonl``)."""
        if spec.prompt_text is None:
            return self.build(spec.prompt_tokens, spec.index)
        ids = self.tokenizer.encode(spec.prompt_text, add_special_tokens=False)
        ids = ids[-spec.prompt_tokens:]
        if not ids:
            raise ValueError(f"request {spec.index}: its prompt text has no tokens")
        return list(ids)
