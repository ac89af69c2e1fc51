"""The checks that need a model's numbers (common.limits), and the edge's prompt bound: a text
prompt that cannot fit is refused before any tokenizer work."""

import asyncio

import pytest

from common.errors import ErrorCode, WispError
from common.limits import check_draft, check_open, max_prompt_bytes, mismatch
from common.protocol import GenerateRequest, ModelLimits, SessionSpec, VerifyRequest, VocabInfo
from common.transport.generation import GenerationServer

VOCAB = VocabInfo(size=100, digest="0123456789abcdef")
LIMITS = ModelLimits(vocab=VOCAB, k_max=8, max_context=64, max_prompt_tokens=32)


def spec(**kw) -> SessionSpec:
    return SessionSpec(**{"sid": "s", "mode": "sled", "max_new_tokens": 16, "k_max": 8, **kw})


@pytest.mark.parametrize("kw,prompt_len,vocab,code", [
    ({}, 10, VocabInfo(size=100, digest="f" * 16), ErrorCode.VOCABULARY_MISMATCH),
    ({"k_max": 9}, 10, VOCAB, ErrorCode.DRAFT_TOO_LONG),
    ({}, 33, VOCAB, ErrorCode.PROMPT_TOO_LONG),
    ({"max_new_tokens": 47}, 10, VOCAB, ErrorCode.SEQUENCE_TOO_LONG),  # 10 + 47 + 8 = 65
])
def test_each_mismatch_names_what_disagrees(kw, prompt_len, vocab, code):
    err = mismatch(spec(**kw), prompt_len, vocab, LIMITS, "verifier v0")
    assert err is not None and err.code == code and "verifier v0" in err.message


def test_a_session_that_fits_exactly_passes():
    assert mismatch(spec(max_new_tokens=46), 10, VOCAB, LIMITS) is None  # 10 + 46 + 8 = 64
    assert mismatch(spec(), 10, None, LIMITS) is None  # vocabulary not known: not compared
    check_open(spec(), list(range(10)), VOCAB, LIMITS)
    with pytest.raises(WispError) as err:
        check_open(spec(), [1, 2, 100], VOCAB, LIMITS)
    assert err.value.code == ErrorCode.OUT_OF_VOCABULARY


def test_drafts_against_k_max_and_vocabulary():
    def req(draft, sparse=None):
        return VerifyRequest(sid="s", round=0, base_len=3, draft_ids=draft, budget_ms=1.0,
                             draft_ms=0.0, device_id="d", draft_sparse_ids=sparse,
                             draft_sparse_probs=None if sparse is None else [[1.0, 0.0]])
    check_draft(req([1, 2]), 2, 100)
    with pytest.raises(WispError) as err:
        check_draft(req([1, 2, 3]), 2, 100)
    assert err.value.code == ErrorCode.DRAFT_TOO_LONG
    with pytest.raises(WispError) as err:
        check_draft(req([1, 100]), 8, 100)
    assert err.value.code == ErrorCode.OUT_OF_VOCABULARY
    with pytest.raises(WispError) as err:
        check_draft(req([1], sparse=[[1, 150]]), 8, 100)
    assert err.value.code == ErrorCode.OUT_OF_VOCABULARY


class RefusingTokenizer:
    def encode(self, text, add_special_tokens=False):
        raise AssertionError("the tokenizer must not see a prompt that cannot fit")


def test_an_oversized_text_prompt_is_refused_before_tokenizing():
    bound = max_prompt_bytes(32, 5)
    assert bound == 160
    server = GenerationServer(nc=None, store=None, tokenizer=RefusingTokenizer(),
                              eos_token_id=None, limits=LIMITS, modes=("sled",),
                              device_id="edge", max_prompt_bytes=bound)
    req = GenerateRequest(max_new_tokens=4, mode="sled", prompt="é" * 81)  # 162 bytes
    with pytest.raises(WispError) as err:
        asyncio.run(server._prompt_ids(req))
    assert err.value.code == ErrorCode.PROMPT_TOO_LONG and "162 bytes" in err.value.message
