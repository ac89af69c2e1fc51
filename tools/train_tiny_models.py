#!/usr/bin/env python
"""Train the shipped tiny Llama target/draft pair on text this machine already has.

Corpus: the running interpreter's standard library. Its ``*.py`` sources are the *code* domain;
the language reference shipped in ``pydoc_data/topics.py`` (plus long docstrings of the
training files) is the *prose* domain. A deterministic slice of both is held out for the
held-out losses, the acceptance measurement and ``models/eval_prompts.json``.

Pipeline: byte-level BPE tokenizer -> target (CE) -> draft (distilled from the target with KL +
CE on the same batches) -> held-out losses -> greedy speculative acceptance (k=4) -> save both
models in Hugging Face format plus docs. Everything is seeded and runs with deterministic torch
algorithms, so two runs with the same seed on the same machine give identical weights.

    .venv/bin/python tools/train_tiny_models.py            # full run (~20 min on 2 CPU cores)
    .venv/bin/python tools/train_tiny_models.py --quick    # smoke test, writes tools/.cache/
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import random
import re
import sys
import sysconfig
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# tokenizers trains with a rayon pool; pin it so the run does not oversubscribe the 2 cores.
os.environ.setdefault("RAYON_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

REPO = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO / "tools/.cache"  # gitignored
EOT = "<|endoftext|>"
VOCAB_SIZE = 4096
MAX_POSITIONS = 2048
# Directories of the stdlib that are not representative library code (test suites, the IDE,
# third-party packages, codec tables generated from Unicode data) or that hold the prose corpus.
EXCLUDED_DIRS = {
    "test",
    "tests",
    "idlelib",
    "site-packages",
    "lib2to3",
    "encodings",
    "__phello__",
    "__pycache__",
    "lib-dynload",
    "pydoc_data",
}
CODE_HOLDOUT_MOD = 10  # every 10th code file (sorted by relative path) is held out
PROSE_HOLDOUT_MOD = 3  # every 3rd topic: fewer would not give >= 24 held-out prompts
MIN_DOCSTRING_CHARS = 200
PROMPT_MIN_CHARS, PROMPT_TARGET_CHARS, PROMPT_MAX_CHARS = 200, 260, 600
CODE_START_RE = re.compile(r"^(?:async def|def|class) ", re.MULTILINE)


@dataclass(frozen=True)
class ModelSpec:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


TARGET_SPEC = ModelSpec(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=704)
DRAFT_SPEC = ModelSpec(hidden=128, layers=2, heads=2, kv_heads=1, intermediate=352)


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch: int
    seq_len: int
    lr: float
    warmup: int
    code_frac: float = 0.65  # share of each batch drawn from code; the rest is prose
    min_lr_frac: float = 0.1
    weight_decay: float = 0.1
    kl_weight: float = 0.0  # > 0 only for the distilled draft
    # bf16 autocast for the forward passes (weights, grads and optimizer stay fp32): ~1.4x
    # faster on a CPU with avx512_bf16; --fp32 turns it off for CPUs without it.
    bf16: bool = True


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    code_train: list[tuple[str, str]]  # (relative path, text)
    code_heldout: list[tuple[str, str]]
    prose_train: list[tuple[str, str]]  # (topic or "docstring:path", text)
    prose_heldout: list[tuple[str, str]]
    stdlib: str
    fingerprint: str


def _code_files(stdlib: Path) -> list[Path]:
    files = []
    for path in stdlib.rglob("*.py"):
        rel = path.relative_to(stdlib)
        parts = rel.parts[:-1]
        if any(p in EXCLUDED_DIRS or p.startswith("config-") for p in parts):
            continue
        files.append(path)
    # Sorting by relative path makes the split independent of filesystem order.
    return sorted(files, key=lambda p: p.relative_to(stdlib).as_posix())


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def _docstrings(source: str) -> list[str]:
    """Long module/class/function docstrings of one file, dedented."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                docs.append(doc)
    return docs


def load_corpus(limit_files: int | None = None) -> Corpus:
    from pydoc_data.topics import topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = _code_files(stdlib)
    if limit_files:
        files = files[:: max(1, len(files) // limit_files)]
    fp = hashlib.sha256()
    code_train, code_heldout = [], []
    for i, path in enumerate(files):
        rel = path.relative_to(stdlib).as_posix()
        text = path.read_text(encoding="utf-8", errors="replace")
        fp.update(rel.encode() + b"\0" + hashlib.sha256(text.encode()).digest())
        (code_heldout if i % CODE_HOLDOUT_MOD == 0 else code_train).append((rel, text))

    keys = sorted(topics)
    held_keys = [k for i, k in enumerate(keys) if i % PROSE_HOLDOUT_MOD == 0]
    # Topics nest (e.g. "compound" contains "if", "while", ...), so a held-out topic's
    # paragraphs are removed from every training topic; otherwise they would leak.
    held_paras = {p for k in held_keys for p in _paragraphs(topics[k])}
    prose_train, prose_heldout = [], []
    for k in keys:
        fp.update(k.encode() + b"\0" + hashlib.sha256(topics[k].encode()).digest())
        if k in held_keys:
            prose_heldout.append((k, topics[k]))
            continue
        kept = [p for p in _paragraphs(topics[k]) if p not in held_paras]
        if kept:
            prose_train.append((k, "\n\n".join(kept)))
    for rel, text in code_train:
        prose_train.extend((f"docstring:{rel}", d) for d in _docstrings(text))
    return Corpus(
        code_train, code_heldout, prose_train, prose_heldout, str(stdlib), fp.hexdigest()[:16]
    )


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],  # id 0: bos = eos = pad
        # The full byte alphabet guarantees every input is encodable (lossless round trip).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def check_roundtrip(tok, texts: list[str]) -> None:
    for text in texts:
        ids = tok.encode(text)
        ids = ids.ids if hasattr(ids, "ids") else ids
        if tok.decode(ids) != text:
            raise AssertionError(f"tokenizer does not round-trip: {text[:80]!r}")


def save_tokenizer(tok: Tokenizer, folder: Path, max_len: int) -> None:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        model_max_length=max_len,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(folder)
    # transformers 5 writes its own "TokenizersBackend" class name, which 4.x cannot resolve;
    # the generic fast class loads the same tokenizer.json in both.
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("backend", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    special = {"bos_token": EOT, "eos_token": EOT, "pad_token": EOT}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Data streams
# --------------------------------------------------------------------------------------------


def token_stream(tok: Tokenizer, docs: list[tuple[str, str]], eot_id: int) -> torch.Tensor:
    """All documents concatenated, each followed by <|endoftext|> (as GPT-style pretraining)."""
    ids: list[int] = []
    for enc in tok.encode_batch([text for _, text in docs]):
        ids.extend(enc.ids)
        ids.append(eot_id)
    return torch.tensor(ids, dtype=torch.long)


class BatchSampler:
    """Random fixed-length windows; a fixed number of rows per batch from each domain."""

    def __init__(self, code: torch.Tensor, prose: torch.Tensor, cfg: TrainSettings, seed: int):
        self.streams = (code, prose)
        self.n_code = round(cfg.batch * cfg.code_frac)
        self.batch, self.seq_len = cfg.batch, cfg.seq_len
        self.rng = random.Random(seed)

    def next(self) -> torch.Tensor:
        rows = []
        for r in range(self.batch):
            stream = self.streams[0 if r < self.n_code else 1]
            start = self.rng.randrange(len(stream) - self.seq_len - 1)
            rows.append(stream[start : start + self.seq_len + 1])
        return torch.stack(rows)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def build_model(spec: ModelSpec, vocab_size: int, eot_id: int, max_pos: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        intermediate_size=spec.intermediate,
        max_position_embeddings=max_pos,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pad_token_id=eot_id,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id
    )
    return model


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are yielded once


def per_token_flops(model: torch.nn.Module) -> int:
    """2 x (weights of every matmul, lm_head included; the embedding lookup is not a matmul).

    Attention-score FLOPs (which grow with context) are left out, as is customary for these
    back-of-the-envelope counts; they are small at these context lengths.
    """
    mats = sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)
    )
    return 2 * mats


def lr_at(step: int, cfg: TrainSettings) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * cosine)


def make_optimizer(model: torch.nn.Module, cfg: TrainSettings) -> torch.optim.AdamW:
    # No weight decay on norms (1-D params): decaying RMSNorm gains only hurts.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def step_loss(model, batch: torch.Tensor, cfg: TrainSettings, teacher=None) -> torch.Tensor:
    inputs, labels = batch[:, :-1], batch[:, 1:]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
        logits = model(input_ids=inputs).logits
    logp = F.log_softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)
    ce = F.nll_loss(logp, labels.reshape(-1))
    if teacher is None or cfg.kl_weight == 0:
        return ce
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            t_logits = teacher(input_ids=inputs).logits
        t_prob = F.softmax(t_logits.float().reshape(-1, logits.shape[-1]), dim=-1)
        neg_entropy = torch.special.xlogy(t_prob, t_prob).sum(-1).mean()
    # Forward KL(target || draft) per token pulls the draft's argmax towards the target's,
    # which is what greedy verification accepts. KL = soft CE - H(target); H has no gradient,
    # so this reuses the draft log-probs of the CE term instead of a second log-softmax
    # (the vocab-wide softmaxes are a large share of a draft step on CPU).
    kl = neg_entropy - (t_prob * logp).sum(-1).mean()
    return cfg.kl_weight * kl + (1 - cfg.kl_weight) * ce


def train(
    name: str, model, sampler: BatchSampler, cfg: TrainSettings, log_every: int, teacher=None
) -> list[dict]:
    opt = make_optimizer(model, cfg)
    model.train()
    curve: list[dict] = []
    t0 = t_last = time.perf_counter()
    loss_sum, loss_n = 0.0, 0
    tokens_per_step = cfg.batch * cfg.seq_len
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = step_loss(model, sampler.next(), cfg, teacher)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_sum += loss.item()
        loss_n += 1
        done = step + 1
        if done % log_every == 0 or done == cfg.steps or step == 0:
            now = time.perf_counter()
            row = {
                "step": done,
                "loss": round(loss_sum / loss_n, 4),
                "lr": lr_at(step, cfg),
                "tok_s": round(loss_n * tokens_per_step / (now - t_last)),
                "elapsed_s": round(now - t0, 1),
            }
            eta = (now - t0) / done * (cfg.steps - done)
            print(
                f"[{name}] step {done:5d}/{cfg.steps}  loss {row['loss']:.4f}  "
                f"lr {row['lr']:.2e}  {row['tok_s']:6d} tok/s  elapsed {row['elapsed_s']:7.1f}s"
                f"  eta {eta:6.0f}s",
                flush=True,
            )
            curve.append(row)
            loss_sum, loss_n, t_last = 0.0, 0, now
    model.eval()
    return curve


@torch.no_grad()
def heldout_loss(model, stream: torch.Tensor, seq_len: int, max_windows: int) -> float:
    """Mean next-token CE (nats/token) over evenly spaced windows covering the held-out stream."""
    n = max(1, min(max_windows, (len(stream) - 1) // seq_len))
    span = len(stream) - seq_len - 1
    starts = [i * span // max(1, n - 1) for i in range(n)]
    total, count = 0.0, 0
    for i in range(0, n, 8):
        batch = torch.stack([stream[s : s + seq_len + 1] for s in starts[i : i + 8]])
        logits = model(input_ids=batch[:, :-1]).logits.float()
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += batch[:, 1:].numel()
    return total / count


# --------------------------------------------------------------------------------------------
# Held-out prompts and acceptance
# --------------------------------------------------------------------------------------------


def _cut_prompt(text: str) -> str | None:
    """Whole lines from the start of `text` until ~PROMPT_TARGET_CHARS (never past the max)."""
    out = ""
    for line in text.splitlines(keepends=True):
        if len(out) + len(line) > PROMPT_MAX_CHARS:
            break
        out += line
        if len(out) >= PROMPT_TARGET_CHARS and line.endswith("\n"):
            break
    # Drop the final newline: BPE merges a newline with the next line's indentation, so a
    # prompt ending in a bare "\n" would be tokenized unlike anything seen in training.
    out = out.rstrip("\n")
    return out if len(out) >= PROMPT_MIN_CHARS else None


def make_prompts(corpus: Corpus, limit: int) -> dict[str, list[str]]:
    seen = "\0".join(t for _, t in corpus.code_train + corpus.prose_train)
    out: dict[str, list[str]] = {"code": [], "prose": []}
    for _, text in corpus.code_heldout:
        # A file's head is mostly license/docstring prose; start at its first top-level
        # definition so the code prompts measure code.
        m = CODE_START_RE.search(text)
        prompt = _cut_prompt(text[m.start() :]) if m else None
        if prompt and prompt not in seen and len(out["code"]) < limit:
            out["code"].append(prompt)
    for _, text in corpus.prose_heldout:
        prompt = _cut_prompt(text)
        body = prompt.split("\n", 2)[-1] if prompt else ""
        if prompt and body[:150] not in seen and len(out["prose"]) < limit:
            out["prose"].append(prompt)
    return out


@torch.no_grad()
def _greedy_next(model, ids: list[int], n_logits: int = 1) -> list[int]:
    logits = model(input_ids=torch.tensor([ids]), logits_to_keep=n_logits).logits[0]
    return logits.argmax(-1).tolist()


def speculative_greedy(target, draft, prompt: list[int], k: int, max_new: int) -> dict:
    """Greedy speculative decoding with full recompute; returns counts and the output."""
    seq = list(prompt)
    accepted = drafted = rounds = 0
    while len(seq) - len(prompt) < max_new:
        proposal: list[int] = []
        for _ in range(k):
            proposal.append(_greedy_next(draft, seq + proposal)[0])
        # Target logits at the last k+1 positions: the check of each draft token plus the
        # bonus/correction token after the accepted prefix.
        verdict = _greedy_next(target, seq + proposal, k + 1)
        n = 0
        while n < k and proposal[n] == verdict[n]:
            n += 1
        seq += proposal[:n] + [verdict[n]]
        accepted, drafted, rounds = accepted + n, drafted + k, rounds + 1
    return {
        "accepted": accepted,
        "drafted": drafted,
        "rounds": rounds,
        "output": seq[len(prompt) : len(prompt) + max_new],
    }


def measure_acceptance(
    target, draft, tok, prompts: dict[str, list[str]], k: int, max_new: int, n_check: int
) -> dict[str, dict]:
    table = {}
    for domain, texts in prompts.items():
        acc = dft = rounds = 0
        match = 0
        t0 = time.perf_counter()
        for i, text in enumerate(texts):
            ids = tok.encode(text).ids
            res = speculative_greedy(target, draft, ids, k, max_new)
            acc, dft, rounds = acc + res["accepted"], dft + res["drafted"], rounds + res["rounds"]
            if i < n_check:  # sanity: lossless, i.e. identical to plain greedy target decoding
                seq = list(ids)
                for _ in range(max_new):
                    seq.append(_greedy_next(target, seq)[0])
                match += seq[len(ids) :] == res["output"]
        table[domain] = {
            "prompts": len(texts),
            "k": k,
            "new_tokens": max_new,
            "acceptance_rate": round(acc / dft, 4),
            "mean_accepted_per_round": round(acc / rounds, 3),
            "mean_tokens_per_round": round((acc + rounds) / rounds, 3),
            "greedy_match": f"{match}/{min(n_check, len(texts))}",
            "seconds": round(time.perf_counter() - t0, 1),
        }
    return table


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


def render_models_md(rep: dict) -> str:
    t, d = rep["models"]["target"], rep["models"]["draft"]
    rows = [
        ("hidden size", "hidden"),
        ("layers", "layers"),
        ("attention heads", "heads"),
        ("KV heads (GQA)", "kv_heads"),
        ("MLP intermediate", "intermediate"),
    ]
    arch = "\n".join(f"| {label} | {t['spec'][key]} | {d['spec'][key]} |" for label, key in rows)
    acc_rows = "\n".join(
        f"| {dom} | {a['prompts']} | {a['acceptance_rate'] * 100:.1f}% | "
        f"{a['mean_accepted_per_round']:.2f} | {a['mean_tokens_per_round']:.2f} | "
        f"{a['greedy_match']} |"
        for dom, a in rep["acceptance"].items()
    )

    def curve(m: dict) -> str:
        c = m["curve"]
        return f"{c[0]['loss']:.3f} (step {c[0]['step']}) -> {c[-1]['loss']:.3f} (step {c[-1]['step']})"

    precision = (
        "training forward passes under bf16 autocast (`--fp32` turns it off) with fp32 master "
        "weights, gradients and AdamW state"
        if rep["train"]["target"]["bf16"]
        else "fp32 training"
    )

    def ppl(x: float) -> str:
        return f"{x:.3f} (ppl {math.exp(x):.1f})"

    return f"""# Shipped tiny models

> All numbers below were **measured on a 2-core CPU with tiny models** (no GPU). They show
> that the pair works and that the draft is aligned with the target; they say nothing about
> production-size models or GPU throughput.

`models/tiny-target/` and `models/tiny-draft/` are a small Llama-architecture target/draft pair
trained from scratch by `tools/train_tiny_models.py` on text every Python install already
has: the CPython {rep["python"]} standard library sources (*code* domain) and the language
reference in `pydoc_data/topics.py` plus long docstrings (*prose* domain). They share one
byte-level BPE tokenizer, so a draft token id means the same thing to the target.

## Architecture

| | target | draft |
|---|---|---|
{arch}
| vocab (shared tokenizer) | {rep["tokenizer"]["vocab_size"]} | {rep["tokenizer"]["vocab_size"]} |
| max positions | {rep["max_positions"]} | {rep["max_positions"]} |
| tied input/output embeddings | yes | yes |
| parameters | {t["params"]:,} | {d["params"]:,} |
| per-token FLOPs (2 x matmul weights incl. lm_head) | {t["flops_per_token"]:,} | {
        d["flops_per_token"]:,} |
| size on disk (folder, {rep["dtype"]}) | {t["disk_mb"]:.1f} MB | {d["disk_mb"]:.1f} MB |

Draft/target per-token compute ratio: **{rep["flops_ratio"]:.3f}** (requirement: <= 0.25).
Attention-score FLOPs (context-dependent) are not counted. Weights are stored in
**{rep["dtype"]}** safetensors; `<|endoftext|>` (id {rep["tokenizer"]["eot_id"]}) is bos, eos
and pad. Positions up to {rep["max_positions"]} are accepted (RoPE), but training used
{rep["train"]["target"]["seq_len"]}-token windows, so quality drops on longer contexts.

Load offline with `AutoTokenizer.from_pretrained("models/tiny-target")` and
`AutoModelForCausalLM.from_pretrained("models/tiny-target")` (same for `tiny-draft`).

## Training

```
{rep["command"]}
```

- Data split: stdlib `*.py` files under `{rep["stdlib"]}` (excluding test suites, `idlelib`,
  `lib2to3`, `encodings`, `site-packages`), sorted by relative path; every
  {CODE_HOLDOUT_MOD}th file is held out ({rep["data"]["code_files_heldout"]} held out,
  {rep["data"]["code_files_train"]} trained on). Topics of `pydoc_data.topics` sorted by name,
  every {PROSE_HOLDOUT_MOD}rd held out ({rep["data"]["topics_heldout"]}); held-out paragraphs are
  also removed from the training topics that nest them. Stdlib fingerprint
  `{rep["fingerprint"]}`.
- Training tokens: code {rep["data"]["code_train_tokens"]:,}, prose
  {rep["data"]["prose_train_tokens"]:,}; each batch is {rep["train"]["target"]["code_frac"]:.0%}
  code windows.
- Target: next-token cross-entropy, {rep["train"]["target"]["steps"]} steps x
  {rep["train"]["target"]["batch"]} x {rep["train"]["target"]["seq_len"]} tokens, AdamW
  (lr {rep["train"]["target"]["lr"]}, warmup + cosine). Loss {curve(t)}.
- Draft: distilled from the trained target on the same kind of batches,
  loss = {rep["train"]["draft"]["kl_weight"]} x `KL(target||draft)` +
  {1 - rep["train"]["draft"]["kl_weight"]:.1f} x CE, {rep["train"]["draft"]["steps"]} steps x
  {rep["train"]["draft"]["batch"]} x {rep["train"]["draft"]["seq_len"]} tokens
  (lr {rep["train"]["draft"]["lr"]}). Loss {curve(d)}.
- Wall time on this machine (2 CPU cores, shared): tokenizer {rep["timing"]["tokenizer_s"]:.0f} s,
  target {rep["timing"]["target_s"]:.0f} s, draft {rep["timing"]["draft_s"]:.0f} s, evaluation
  {rep["timing"]["eval_s"]:.0f} s, total {rep["timing"]["total_s"] / 60:.1f} min. Other jobs
  shared the CPU during the run, so these times are upper bounds.
- Precision: {precision}; saved weights and all evaluation are fp32.
- Deterministic: seeded sampling, `torch.use_deterministic_algorithms(True)`, 2 threads,
  subnormals flushed; the same seed on the same machine reproduces the same weights (checked
  with two `--quick` runs). `--reuse-target` reloads a bit-identical target from
  `tools/.cache/` when only the draft changes.

Held-out cross-entropy (nats/token, {rep["heldout_windows"]} evenly spaced
{rep["train"]["target"]["seq_len"]}-token windows per domain):

| model | code | prose |
|---|---|---|
| target | {ppl(t["heldout"]["code"])} | {ppl(t["heldout"]["prose"])} |
| draft | {ppl(d["heldout"]["code"])} | {ppl(d["heldout"]["prose"])} |

## Greedy speculative acceptance

Greedy speculative decoding with k = {rep["acceptance"]["code"]["k"]} draft tokens per round,
{rep["acceptance"]["code"]["new_tokens"]} new tokens per prompt, on the held-out prompts of
`models/eval_prompts.json`. Acceptance rate = accepted draft tokens / drafted tokens; tokens
per round counts the target's bonus/correction token too. "Lossless" compares the output with
plain greedy decoding of the target on the first prompts.

| domain | prompts | acceptance | accepted / round | tokens / round | lossless |
|---|---|---|---|---|---|
{acc_rows}

## Evaluation prompts

`models/eval_prompts.json` holds held-out prompts for tests and benchmarks: `code` (from the
first top-level `def`/`class` of each held-out file) and `prose` (start of each held-out topic),
{PROMPT_MIN_CHARS}-{PROMPT_MAX_CHARS} characters cut at a line boundary, each checked not to
occur in the training text.

## License

Trained on CPython standard-library sources and documentation, which are distributed under
the Python Software Foundation License; the weights are derived from that text.
"""


def render_models_readme(rep: dict) -> str:
    t, d = rep["models"]["target"], rep["models"]["draft"]
    return f"""# Tiny model pair

- `tiny-target/`: Llama, {t["spec"]["layers"]} layers, hidden {t["spec"]["hidden"]},
  {t["params"] / 1e6:.2f}M parameters.
- `tiny-draft/`: Llama, {d["spec"]["layers"]} layers, hidden {d["spec"]["hidden"]},
  {d["params"] / 1e6:.2f}M parameters, distilled from the target
  ({rep["flops_ratio"]:.3f}x its per-token FLOPs).
- Shared byte-level BPE tokenizer, vocab {rep["tokenizer"]["vocab_size"]},
  `<|endoftext|>` = id {rep["tokenizer"]["eot_id"]} (bos/eos/pad). Weights: {rep["dtype"]}.
- `eval_prompts.json`: held-out code/prose prompts; `training_report.json`: measured numbers.

Trained from scratch on a 2-core CPU on the CPython {rep["python"]} standard library (code) and
its `pydoc_data` language reference (prose). Reproduce with:

    {rep["command"]}

Details and measured numbers: `docs/models.md`.

License: trained on CPython standard-library sources and documentation (Python Software
Foundation License).
"""


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps-target", type=int, default=None)
    ap.add_argument("--steps-draft", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: models/, or tools/.cache/quick-models/)",
    )
    ap.add_argument(
        "--docs",
        type=Path,
        default=None,
        help="where to write models.md (default: docs/models.md; <out>/models.md with --quick)",
    )
    ap.add_argument("--quick", action="store_true", help="a few steps on a corpus subset")
    ap.add_argument("--fp32", action="store_true", help="train without bf16 autocast")
    ap.add_argument(
        "--reuse-target",
        action="store_true",
        help="load the target from tools/.cache/ if this exact configuration was trained before",
    )
    ap.add_argument(
        "--render-only",
        action="store_true",
        help="only rewrite the READMEs from <out>/training_report.json (no training)",
    )
    return ap.parse_args()


def settings(args) -> tuple[TrainSettings, TrainSettings]:
    target = TrainSettings(
        steps=args.steps_target or (8 if args.quick else 1500),
        batch=8,
        seq_len=256,
        lr=2e-3,
        warmup=4 if args.quick else 100,
        bf16=not args.fp32,
    )
    draft = TrainSettings(
        steps=args.steps_draft or (8 if args.quick else 1000),
        batch=8,
        seq_len=256,
        lr=3e-3,
        warmup=4 if args.quick else 100,
        kl_weight=0.8,
        bf16=not args.fp32,
    )
    return target, draft


def set_determinism(seed: int) -> None:
    torch.set_num_threads(2)
    # A trained teacher's softmax underflows into fp32 subnormals, which are many times slower
    # on x86; flushing them to zero changes nothing measurable and keeps the run deterministic.
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def build_tokenizer(corpus: Corpus, vocab_size: int) -> Tokenizer:
    texts = [t for _, t in corpus.code_train + corpus.prose_train]
    tok = train_tokenizer(texts, vocab_size)
    check_roundtrip(tok, [t for _, t in corpus.code_heldout[:20] + corpus.prose_heldout[:10]])
    return tok


def save_pair(out: Path, tok: Tokenizer, target, draft, max_pos: int) -> None:
    for name, model in (("tiny-target", target), ("tiny-draft", draft)):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
        save_tokenizer(tok, folder, max_pos)


def verify_saved(out: Path, sample: str) -> None:
    """Reload both folders the way consumers will and check tokenizer round trip."""
    for name in ("tiny-target", "tiny-draft"):
        folder = out / name
        hf_tok = AutoTokenizer.from_pretrained(folder)
        check_roundtrip(hf_tok, [sample])
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.eos_token_id == hf_tok.eos_token_id == hf_tok.pad_token_id


def prepare_data(args) -> tuple[Corpus, Tokenizer, dict[str, torch.Tensor]]:
    corpus = load_corpus(limit_files=40 if args.quick else None)
    print(
        f"corpus: {len(corpus.code_train)} code files (+{len(corpus.code_heldout)} held out), "
        f"{len(corpus.prose_train)} prose docs (+{len(corpus.prose_heldout)} held-out topics), "
        f"stdlib {corpus.stdlib} fingerprint {corpus.fingerprint}",
        flush=True,
    )
    tok = build_tokenizer(corpus, VOCAB_SIZE)
    eot_id = tok.token_to_id(EOT)
    streams = {
        f"{dom}_{split}": token_stream(tok, getattr(corpus, f"{dom}_{split}"), eot_id)
        for dom in ("code", "prose")
        for split in ("train", "heldout")
    }
    print(
        f"tokenizer: vocab {tok.get_vocab_size()}, {EOT} id {eot_id}, round trip ok; tokens "
        + ", ".join(f"{k} {len(v):,}" for k, v in streams.items()),
        flush=True,
    )
    return corpus, tok, streams


def train_target(args, target, tcfg, streams, cache_key: str) -> tuple[list[dict], float]:
    """Train the target, or with --reuse-target load the identical result of an earlier run.

    Training is deterministic, so a cached target with the same key is bit-identical to a
    fresh one; reuse only saves time while iterating on the draft.
    """
    cache = CACHE_DIR / f"target-{cache_key}.pt"
    if args.reuse_target and cache.exists():
        saved = torch.load(cache, weights_only=True)
        target.load_state_dict(saved["state_dict"])
        print(f"reused target from {cache} (trained in {saved['seconds']:.0f}s)", flush=True)
        return saved["curve"], saved["seconds"]
    t0 = time.perf_counter()
    sampler = BatchSampler(streams["code_train"], streams["prose_train"], tcfg, args.seed)
    curve = train("target", target, sampler, tcfg, 2 if args.quick else 50)
    seconds = time.perf_counter() - t0
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": target.state_dict(), "curve": curve, "seconds": seconds}, cache)
    return curve, seconds


def evaluate(args, target, draft, tok, corpus, streams, seq_len: int) -> dict:
    n_prompts, max_new, n_check = (3, 16, 1) if args.quick else (30, 64, 5)
    windows = 8 if args.quick else 64
    heldout = {
        name: {
            dom: round(heldout_loss(m, streams[f"{dom}_heldout"], seq_len, windows), 4)
            for dom in ("code", "prose")
        }
        for name, m in (("target", target), ("draft", draft))
    }
    for name, losses in heldout.items():
        print(
            f"held-out loss {name}: code {losses['code']:.4f}  prose {losses['prose']:.4f}",
            flush=True,
        )
    prompts = make_prompts(corpus, limit=40)
    eval_prompts = {dom: p[:n_prompts] for dom, p in prompts.items()}
    acceptance = measure_acceptance(target, draft, tok, eval_prompts, 4, max_new, n_check)
    print_acceptance(acceptance)
    return {
        "heldout": heldout,
        "heldout_windows": windows,
        "prompts": prompts,
        "acceptance": acceptance,
    }


def main() -> int:
    args = parse_args()
    out = args.out or (REPO / "tools/.cache/quick-models" if args.quick else REPO / "models")
    docs = args.docs or (out / "models.md" if args.quick else REPO / "docs/models.md")
    if args.render_only:
        write_reports(out, docs, json.loads((out / "training_report.json").read_text()))
        return 0
    t_start = time.perf_counter()
    set_determinism(args.seed)
    tcfg, dcfg = settings(args)
    corpus, tok, streams = prepare_data(args)
    t_tok = time.perf_counter() - t_start

    eot_id, vocab = tok.token_to_id(EOT), tok.get_vocab_size()
    # Both are initialized before any training so the draft's init does not depend on whether
    # the target was trained or reused.
    target = build_model(TARGET_SPEC, vocab, eot_id, MAX_POSITIONS)
    draft = build_model(DRAFT_SPEC, vocab, eot_id, MAX_POSITIONS)
    flops = {"target": per_token_flops(target), "draft": per_token_flops(draft)}
    print(
        f"target: {count_params(target):,} params, {flops['target']:,} FLOPs/token; draft: "
        f"{count_params(draft):,} params, {flops['draft']:,} FLOPs/token; ratio "
        f"{flops['draft'] / flops['target']:.3f}",
        flush=True,
    )
    assert TARGET_SPEC.layers >= 4 and flops["draft"] / flops["target"] <= 0.25

    key_src = [
        asdict(TARGET_SPEC),
        asdict(tcfg),
        args.seed,
        corpus.fingerprint,
        tok.to_str(),
        torch.__version__,
    ]
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    curves, timing = {}, {"tokenizer_s": t_tok}
    curves["target"], timing["target_s"] = train_target(args, target, tcfg, streams, key)
    target.requires_grad_(False)
    t0 = time.perf_counter()
    sampler = BatchSampler(streams["code_train"], streams["prose_train"], dcfg, args.seed + 1)
    curves["draft"] = train("draft", draft, sampler, dcfg, 2 if args.quick else 50, target)
    timing["draft_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ev = evaluate(args, target, draft, tok, corpus, streams, tcfg.seq_len)
    timing["eval_s"] = time.perf_counter() - t0

    save_pair(out, tok, target, draft, MAX_POSITIONS)
    verify_saved(out, corpus.code_heldout[0][1][:2000])
    write_prompts(out, ev["prompts"], corpus)
    timing["total_s"] = time.perf_counter() - t_start
    rep = build_report(
        args, corpus, tok, streams, (tcfg, dcfg), (target, draft), flops, curves, ev, timing, out
    )
    write_reports(out, docs, rep)
    print(
        f"wrote {out} ({folder_mb(out):.1f} MB) and {docs}; total {timing['total_s'] / 60:.1f} min",
        flush=True,
    )
    return 0


def build_report(args, corpus, tok, streams, cfgs, pair, flops, curves, ev, timing, out) -> dict:
    models_rep = {}
    for name, spec, model in zip(("target", "draft"), (TARGET_SPEC, DRAFT_SPEC), pair, strict=True):
        models_rep[name] = {
            "spec": asdict(spec),
            "params": count_params(model),
            "flops_per_token": flops[name],
            "disk_mb": round(folder_mb(out / f"tiny-{name}"), 2),
            "heldout": ev["heldout"][name],
            "curve": curves[name],
        }
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "stdlib": corpus.stdlib,
        "fingerprint": corpus.fingerprint,
        "seed": args.seed,
        "dtype": "float32",
        "command": " ".join(["python tools/train_tiny_models.py", *sys.argv[1:]]),
        "max_positions": MAX_POSITIONS,
        "heldout_windows": ev["heldout_windows"],
        "tokenizer": {"vocab_size": tok.get_vocab_size(), "eot_id": tok.token_to_id(EOT)},
        "data": {
            "code_files_train": len(corpus.code_train),
            "code_files_heldout": len(corpus.code_heldout),
            "topics_heldout": len(corpus.prose_heldout),
            "code_train_tokens": len(streams["code_train"]),
            "prose_train_tokens": len(streams["prose_train"]),
        },
        "train": {"target": asdict(cfgs[0]), "draft": asdict(cfgs[1])},
        "models": models_rep,
        "flops_ratio": round(flops["draft"] / flops["target"], 4),
        "acceptance": ev["acceptance"],
        "timing": timing,
    }


def print_acceptance(table: dict[str, dict]) -> None:
    print("\ndomain  prompts  acceptance  accepted/round  tokens/round  lossless  seconds")
    for dom, a in table.items():
        print(
            f"{dom:6s}  {a['prompts']:7d}  {a['acceptance_rate'] * 100:9.1f}%  "
            f"{a['mean_accepted_per_round']:14.2f}  {a['mean_tokens_per_round']:12.2f}  "
            f"{a['greedy_match']:>8s}  {a['seconds']:7.1f}",
            flush=True,
        )


def write_prompts(out: Path, prompts: dict[str, list[str]], corpus: Corpus) -> None:
    data = {
        "source": (
            f"Held out of training by tools/train_tiny_models.py. code: files of the CPython "
            f"{sys.version.split()[0]} stdlib at {corpus.stdlib} (excluding test suites, idlelib, "
            f"lib2to3, encodings, site-packages) sorted by relative path, index % "
            f"{CODE_HOLDOUT_MOD} == 0; each prompt starts at the file's first top-level "
            f"def/class. prose: pydoc_data.topics sorted by name, index % {PROSE_HOLDOUT_MOD} "
            f"== 0; each prompt is the topic's start. {PROMPT_MIN_CHARS}-{PROMPT_MAX_CHARS} "
            f"chars cut at a line boundary, checked absent from the training text."
        ),
        "python": sys.version.split()[0],
        "stdlib": corpus.stdlib,
        "stdlib_fingerprint": corpus.fingerprint,
        "code": prompts["code"],
        "prose": prompts["prose"],
    }
    (out / "eval_prompts.json").write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def reflow_markdown(text: str, width: int = 96) -> str:
    """Re-wrap prose paragraphs, bullets and quotes; tables, code and headings pass through.

    The templates interpolate values of unknown length, so their hand wrapping goes ragged.
    """
    out: list[str] = []
    para: list[str] = []
    prefix = ""

    def flush() -> None:
        if para:
            indent = "  " if prefix == "- " else prefix
            out.append(
                textwrap.fill(
                    " ".join(para),
                    width,
                    initial_indent=prefix,
                    subsequent_indent=indent,
                    break_on_hyphens=False,
                    break_long_words=False,
                )
            )
            para.clear()

    in_code = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            flush()
            in_code = not in_code
            out.append(line)
        elif in_code or not stripped or stripped[0] in "|#" or line.startswith("    "):
            flush()
            out.append(line)
        elif stripped.startswith(("- ", "> ")) and not para or stripped.startswith("- "):
            flush()
            prefix = stripped[:2]
            para.append(stripped[2:])
        else:
            if not para:
                prefix = ""
            para.append(stripped[2:] if prefix == "> " and stripped.startswith(">") else stripped)
    flush()
    return "\n".join(out) + "\n"


def write_reports(out: Path, docs: Path, rep: dict) -> None:
    (out / "training_report.json").write_text(json.dumps(rep, indent=1) + "\n")
    (out / "README.md").write_text(reflow_markdown(render_models_readme(rep)))
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(reflow_markdown(render_models_md(rep)))


if __name__ == "__main__":
    sys.exit(main())
