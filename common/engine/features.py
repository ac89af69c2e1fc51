"""Per-token draft features that draft-length policies (and WISP's rejection predictor) read.

Computed from the draft's raw softmax (temperature 1) so that a predictor trained on one
sampling temperature reads the same features at another. Columns are
`common.protocol.DRAFT_FEATURES`, the same on the edge, on the wire and in verdict events.
"""

from __future__ import annotations

import torch

from common.protocol import DRAFT_FEATURES

__all__ = ["DRAFT_FEATURES", "NUM_FEATURES", "draft_features"]

NUM_FEATURES = len(DRAFT_FEATURES)


def draft_features(logits: torch.Tensor, positions: torch.Tensor,
                   cum_before: torch.Tensor | None = None,
                   prev_accept: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V], positions [B] (index of each token within its draft), cum_before [B]
    (product of the confidences of the draft's earlier tokens; default 1), prev_accept [B] (the
    session's accepted / drafted in its last round that drafted; default 1) -> [B, F] float32:
    confidence (top-1 probability), entropy (nats), margin (top-1 minus top-2), std of the
    probability vector, position, cumulative confidence (cum_before x confidence), prev_accept.

    The last two are what a single token's distribution cannot tell: how likely the draft has
    survived this far, and how well the draft has tracked the target in this session lately."""
    probs = torch.softmax(logits.float(), dim=-1)  # [B, V]
    top2 = probs.topk(min(2, probs.shape[-1]), dim=-1).values  # [B, 2]
    second = top2[:, 1] if top2.shape[-1] > 1 else torch.zeros_like(top2[:, 0])
    # xlogy keeps 0·log 0 = 0 for tokens the softmax underflows to zero.
    entropy = -torch.special.xlogy(probs, probs).sum(-1)  # [B]
    std = probs.std(dim=-1, unbiased=False)  # [B]
    ones = torch.ones_like(entropy)
    cum_before = ones if cum_before is None else cum_before.to(probs.dtype)
    prev_accept = ones if prev_accept is None else prev_accept.to(probs.dtype)
    return torch.stack([top2[:, 0], entropy, top2[:, 0] - second, std,
                        positions.to(probs.dtype), cum_before * top2[:, 0], prev_accept], dim=-1)
