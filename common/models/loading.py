"""Load draft and target models from a local folder (or, when asked, a model hub id).

Offline by default: nothing is fetched from a network unless `allow_download=True`. fp32 on
CPU (exactness is checked there), bf16 on CUDA. Draft and target must share one tokenizer;
a mismatch is refused with an error that names both models (docs/architecture.md, "Tokens").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch

from common.models.vocab import eos_token_id, vocab_info
from common.protocol import VocabInfo

log = structlog.get_logger(__name__)

# The tiny pair trained by tools/train_tiny_models.py ships in the repository.
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODELS_DIR = Path(os.environ.get("WISP_MODELS_DIR", REPO_ROOT / "models"))
DEFAULT_TARGET = str(DEFAULT_MODELS_DIR / "tiny-target")
DEFAULT_DRAFT = str(DEFAULT_MODELS_DIR / "tiny-draft")
# The rejection predictor trained for the shipped pair (`wisp predictor train`).
DEFAULT_PREDICTOR = str(DEFAULT_MODELS_DIR / "predictor" / "predictor.onnx")


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says which and why."""


class VocabularyMismatch(ValueError):
    """Draft and target do not share one vocabulary."""


@dataclass(slots=True)
class LoadedModel:
    name: str
    model: torch.nn.Module  # a transformers PreTrainedModel in eval mode
    tokenizer: object  # a transformers PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def eos_token_id(self) -> int | None:
        return eos_token_id(self.model.config, self.tokenizer)

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @property
    def vocab_info(self) -> VocabInfo:
        """The vocabulary as peers compare it (hashes the token table: call it once)."""
        return vocab_info(self.vocab_size, self.tokenizer, self.eos_token_id)

    @property
    def longest_token_bytes(self) -> int:
        """UTF-8 bytes of the longest entry of the token table: no token covers more bytes of
        text (byte-level BPE spells a byte as one character of one or two bytes; SentencePiece
        a space as '▁'), so a text of N times this many bytes has more than N tokens."""
        if self.tokenizer is None:
            return 1
        return max(len(token.encode()) for token in self.tokenizer.get_vocab())


def select_device(preference: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; 'cpu', 'cuda', 'cuda:1' are taken as given."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {preference!r} requested but CUDA is not available")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def parse_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name in (None, "", "auto"):
        return default_dtype(device)
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ModelLoadError(f"unknown dtype {name!r}; choose one of {sorted(table)}")
    return table[name]


def load_model(
    name_or_path: str,
    device: torch.device | str = "auto",
    dtype: torch.dtype | str | None = None,
    allow_download: bool = False,
) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # progress bars would interleave with JSON log lines

    device = select_device(device) if isinstance(device, str) else device
    dtype = parse_dtype(dtype, device) if dtype is None or isinstance(dtype, str) else dtype
    local = Path(name_or_path)
    if not local.exists() and not allow_download:
        raise ModelLoadError(
            f"model {name_or_path!r} is not a local folder and downloads are off "
            "(pass allow_download / --allow-download to fetch it from a model hub)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=not allow_download)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype, local_files_only=not allow_download
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {exc}") from exc
    model.to(device).eval()
    log.info("model_loaded", model=name_or_path, type=model.config.model_type,
             params=sum(p.numel() for p in model.parameters()), device=str(device),
             dtype=str(dtype).removeprefix("torch."))
    return LoadedModel(name_or_path, model, tokenizer, device, dtype)


def check_same_vocabulary(draft: LoadedModel, target: LoadedModel) -> None:
    """Refuse a pair whose token ids do not mean the same strings."""
    problems = []
    if draft.vocab_size != target.vocab_size:
        problems.append(f"model vocab_size {draft.vocab_size} vs {target.vocab_size}")
    draft_vocab, target_vocab = draft.tokenizer.get_vocab(), target.tokenizer.get_vocab()
    if draft_vocab != target_vocab:
        differing = len(set(draft_vocab.items()) ^ set(target_vocab.items()))
        problems.append(f"tokenizer vocabularies differ ({len(draft_vocab)} vs "
                        f"{len(target_vocab)} entries, {differing} differing entries)")
    if draft.eos_token_id != target.eos_token_id:
        problems.append(f"eos token {draft.eos_token_id} vs {target.eos_token_id}")
    if problems:
        raise VocabularyMismatch(
            f"draft model {draft.name!r} and target model {target.name!r} do not share a "
            f"vocabulary: {'; '.join(problems)}"
        )


def load_pair(
    draft: str = DEFAULT_DRAFT,
    target: str = DEFAULT_TARGET,
    device: torch.device | str = "auto",
    dtype: torch.dtype | str | None = None,
    allow_download: bool = False,
) -> tuple[LoadedModel, LoadedModel]:
    """Load (draft, target) and check they share a vocabulary."""
    target_model = load_model(target, device, dtype, allow_download)
    draft_model = load_model(draft, device, dtype, allow_download)
    check_same_vocabulary(draft_model, target_model)
    return draft_model, target_model


def held_out_prompts(tokenizer, per_domain: int | None = None,
                     max_tokens: int = 128) -> dict[str, list[list[int]]]:
    """Token ids of the shipped pair's held-out prompts (never seen in training), by domain
    ('code', 'prose'): the first `per_domain` of each (all if None), each cut to its last
    `max_tokens` tokens. Tests and benchmarks share them (models/eval_prompts.json)."""
    data = json.loads((DEFAULT_MODELS_DIR / "eval_prompts.json").read_text())
    return {domain: [tokenizer.encode(text, add_special_tokens=False)[-max_tokens:]
                     for text in data[domain][:per_domain]]
            for domain in ("code", "prose")}
