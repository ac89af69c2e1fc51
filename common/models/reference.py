"""Target-only greedy decoding with plain `transformers`: the reference that every mode's
greedy output must equal token for token (docs/architecture.md, "Invariants"). Independent of wisp's runners."""

from __future__ import annotations

import torch


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int,
              eos_token_id: int | None = None) -> list[int]:
    """Generated ids (EOS kept, then stop), using the model's own KV cache."""
    device = next(model.parameters()).device
    out = model(torch.tensor([prompt_ids], device=device), use_cache=True)
    generated: list[int] = []
    while True:
        token = int(out.logits[0, -1].argmax())
        generated.append(token)
        if len(generated) >= max_new_tokens or token == eos_token_id:
            return generated
        out = model(torch.tensor([[token]], device=device), past_key_values=out.past_key_values,
                    use_cache=True)
