"""A model's vocabulary as peers compare it (torch-free: the scheduler and the SDK use it).

Two processes agree on a vocabulary when their `VocabInfo` are equal: the same model vocabulary
size and the same digest of (tokenizer token table, EOS id). The rule is the one
`common.models.loading.check_same_vocabulary` applies to a loaded pair, in a form that crosses
the wire: an edge's draft model and a verifier's target model are never loaded side by side.
"""

from __future__ import annotations

import hashlib
import json

from common.protocol import VocabInfo


def eos_token_id(config, tokenizer=None) -> int | None:
    """The model config's EOS id (the first, if it lists several), else the tokenizer's."""
    eos = config.eos_token_id
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    return eos


def vocab_info(vocab_size: int, tokenizer=None, eos_token_id: int | None = None) -> VocabInfo:
    """`tokenizer`: a transformers tokenizer (or None for a model without one: then the digest
    covers the size and the EOS id only)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps([vocab_size, eos_token_id]).encode())
    if tokenizer is not None:
        table = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        h.update(json.dumps(table, ensure_ascii=False).encode())
    return VocabInfo(size=vocab_size, digest=h.hexdigest())
