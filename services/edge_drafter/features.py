"""Per-token draft features that the rejection predictor reads (WISP §Mechanism 1).

Computed from the draft's raw softmax (temperature 1) so that a predictor trained on one
sampling temperature reads the same features at another.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FEATURE_NAMES = ("confidence", "entropy", "margin", "std")


@dataclass(slots=True, frozen=True)
class TokenFeatures:
    confidence: float  # top-1 probability
    entropy: float  # nats
    margin: float  # top-1 minus top-2 probability
    std: float  # standard deviation of the probability vector

    def as_list(self) -> list[float]:
        return [self.confidence, self.entropy, self.margin, self.std]


def token_features(logits: torch.Tensor) -> list[TokenFeatures]:
    """logits [B, V] -> one TokenFeatures per row."""
    probs = torch.softmax(logits.float(), dim=-1)  # [B, V]
    top2 = probs.topk(min(2, probs.shape[-1]), dim=-1).values  # [B, 2]
    second = top2[:, 1] if top2.shape[-1] > 1 else torch.zeros_like(top2[:, 0])
    # xlogy keeps 0·log 0 = 0 for tokens the softmax underflows to zero.
    entropy = -torch.special.xlogy(probs, probs).sum(-1)  # [B]
    std = probs.std(dim=-1, unbiased=False)  # [B]
    rows = torch.stack([top2[:, 0], entropy, top2[:, 0] - second, std], dim=-1).tolist()
    return [TokenFeatures(*row) for row in rows]
