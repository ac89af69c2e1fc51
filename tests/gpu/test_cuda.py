"""The parity and exactness checks again on CUDA in fp32 (skipped where CUDA is absent).

Same assertions as tests/unit: the paged forward equals the transformers forward of the same
model on the same device (atol 1e-4), and speculative greedy output through mixed batches
equals the target's own greedy output token for token.
"""

import pytest
import torch

from common.engine.inprocess import GenerationRequest, InProcessEngine
from common.engine.policies import FixedK
from common.models.loading import load_pair
from common.models.paged_runner import PagedRunner
from common.models.reference import hf_greedy
from common.models.runner import ForwardItem
from tests.shipped import held_out_prompts
from tests.unit.tiny_random_models import random_tokens, reference_logits, tiny_llama, tiny_qwen2

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
def test_paged_forward_matches_transformers_on_cuda(build):
    model = build().to("cuda")
    runner = PagedRunner(model, num_blocks=64, block_size=4)
    prompts = {"a": random_tokens(13, 1), "b": random_tokens(5, 2)}
    outs = runner.forward([ForwardItem(s, p) for s, p in prompts.items()])
    for p, out in zip(prompts.values(), outs, strict=True):
        torch.testing.assert_close(out, reference_logits(model, p).cpu(), atol=1e-4, rtol=0)
    more = {"a": random_tokens(3, 3), "c": random_tokens(9, 4)}
    outs = runner.forward([ForwardItem(s, p) for s, p in more.items()])
    full = {"a": prompts["a"] + more["a"], "c": more["c"]}
    for (sid, new), out in zip(more.items(), outs, strict=True):
        want = reference_logits(model, full[sid]).cpu()[-len(new):]
        torch.testing.assert_close(out, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("k_max", [1, 4, 8])
def test_greedy_exactness_on_cuda_fp32(k_max):
    draft, target = load_pair(device="cuda", dtype="float32")
    prompts = held_out_prompts(target.tokenizer, per_domain=12)
    refs = [hf_greedy(target.model, p, 32, target.eos_token_id) for p in prompts]
    engine = InProcessEngine.from_models(draft, target, k_max)
    results = engine.generate_many([GenerationRequest(p, 32, policy=FixedK(k_max), start_step=i)
                                    for i, p in enumerate(prompts)])
    assert [r.token_ids for r in results] == refs
