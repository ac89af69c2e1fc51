"""Cut the rejection predictor's training prompts from the tiny pair's *training* split.

`wisp predictor collect --split train` drafts on these; `--split heldout` uses
`models/eval_prompts.json` (the pair's held-out prompts), so the predictor is judged on text
that neither it nor the models saw. Same corpus and split as `tools/train_tiny_models.py`
(the CPython standard library and its `pydoc_data` topics); the output records the corpus
fingerprint, and regenerating on another Python gives other prompts. Writes
`models/predictor/prompts.json`:

    python tools/make_predictor_prompts.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_tiny_models import CODE_START_RE, REPO, _cut_prompt, load_corpus  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", type=int, default=240, help="code prompts")
    parser.add_argument("--prose", type=int, default=120, help="prose prompts")
    parser.add_argument("--out", type=Path, default=REPO / "models/predictor/prompts.json")
    args = parser.parse_args()
    corpus = load_corpus()
    held = json.loads((REPO / "models/eval_prompts.json").read_text())
    held_set = set(held["code"]) | set(held["prose"])
    code: list[str] = []
    # A few definitions from every file, spread over the sorted training files.
    per_file = max(1, -(-args.code // len(corpus.code_train)))
    for _, text in corpus.code_train:
        for m in list(CODE_START_RE.finditer(text))[1:1 + per_file]:
            prompt = _cut_prompt(text[m.start():])
            if prompt and prompt not in held_set:
                code.append(prompt)
    prose = [p for _, text in corpus.prose_train
             if (p := _cut_prompt(text)) and p not in held_set]
    code = code[:: max(1, len(code) // args.code)][: args.code]
    prose = prose[:: max(1, len(prose) // args.prose)][: args.prose]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "source": "training split of tools/train_tiny_models.py (CPython stdlib + pydoc_data), "
                  "cut by tools/make_predictor_prompts.py",
        "stdlib_fingerprint": corpus.fingerprint, "code": code, "prose": prose}, indent=1))
    print(f"{args.out}: {len(code)} code and {len(prose)} prose prompts "
          f"(corpus {corpus.fingerprint})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
