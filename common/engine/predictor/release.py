"""`wisp predictor train`: fit every scorer, compare them on held-out rows (and across domains),
export the chosen one to ONNX and write the training report beside it.

Output folder (models/predictor/ for the shipped pair):
- predictor.onnx: the model the edges run (metadata: version, threshold, cost model, kind);
- predictor_code_only.onnx: an MLP fitted on code rows only (the cross-domain benchmark);
- predictor.pt: the same model's torch weights (`RejectionModel` state + hidden sizes);
- heldout_sample.npz: held-out rows, on which a test checks that ONNX and torch agree;
- report.json: settings, the comparison, the choice and why.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from common.engine.predictor.cost import CostModel
from common.engine.predictor.model import RejectionModel, TrainSettings, export_onnx
from common.engine.predictor.pairs import PairSet
from common.engine.predictor.train import Candidate, evaluate, fit_candidate

__all__ = ["KINDS", "load_torch", "train_release"]

KINDS = ("mlp", "logreg", "confidence")
SAMPLE_ROWS = 2000
TIE = 0.01  # relative validation cost within which the two learned models count as equal


def train_release(train: PairSet, heldout: PairSet, cost: CostModel, out: Path,
                  settings: TrainSettings | None = None, version: str | None = None,
                  progress: Callable[[str], None] | None = None) -> dict:
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    settings = settings or TrainSettings()
    start = time.perf_counter()
    candidates: dict[str, Candidate] = {}
    comparison: dict[str, dict] = {}
    for kind in KINDS:
        cand = candidates[kind] = fit_candidate(kind, train, cost, settings, seed=settings.seed)
        comparison[kind] = {
            "threshold": round(cand.threshold, 4), "val_cost_ms": round(cand.val_cost_ms, 3),
            "heldout": {dom: evaluate(cand, part, cost) for dom, part in
                        (("all", heldout), ("code", heldout.of_domain("code")),
                         ("prose", heldout.of_domain("prose")),
                         ("greedy", heldout.select(heldout.temperature == 0)),
                         ("sampled", heldout.select(heldout.temperature > 0)))}}
        say(f"[train] {kind}: threshold {cand.threshold:.3f}, validation cost "
            f"{cand.val_cost_ms:.2f} ms/committed token ({time.perf_counter() - start:.0f}s)")
    # Cross-domain: fitted and thresholded on code only, judged on held-out prose.
    code_only = fit_candidate("mlp", train.of_domain("code"), cost, settings, seed=settings.seed)
    cross = {"trained_on": "code", "threshold": round(code_only.threshold, 4),
             "heldout_prose": evaluate(code_only, heldout.of_domain("prose"), cost),
             "heldout_code": evaluate(code_only, heldout.of_domain("code"), cost)}
    # Ship the MLP (WISP's) unless logistic regression is cheaper on the validation rounds by
    # more than TIE: closer than that is within what another validation draw would change.
    mlp_cost, lr_cost = candidates["mlp"].val_cost_ms, candidates["logreg"].val_cost_ms
    chosen = "logreg" if lr_cost < mlp_cost * (1 - TIE) else "mlp"
    cand = candidates[chosen]
    digest = hashlib.sha256(cand.model.mean.numpy().tobytes()
                            + np.float32(cand.threshold).tobytes()
                            + b"".join(p.detach().numpy().tobytes()
                                       for p in cand.model.parameters())).hexdigest()
    version = version or f"{chosen}-{digest[:10]}"
    out.mkdir(parents=True, exist_ok=True)
    onnx_bytes = export_onnx(cand.model, {"version": version, "threshold": cand.threshold,
                                         "cost_model": cost.as_dict()})
    (out / "predictor.onnx").write_bytes(onnx_bytes)
    # The code-only MLP too, for the cross-domain benchmark (tools/bench_policies.py).
    (out / "predictor_code_only.onnx").write_bytes(export_onnx(
        code_only.model, {"version": f"{version}-code-only", "threshold": code_only.threshold,
                          "cost_model": cost.as_dict(), "trained_on": "code"}))
    torch.save({"state": cand.model.state_dict(), "hidden": list(cand.model.hidden),
                "threshold": cand.threshold, "version": version}, out / "predictor.pt")
    rng = np.random.default_rng(settings.seed)
    rows = np.sort(rng.choice(len(heldout), min(SAMPLE_ROWS, len(heldout)), replace=False))
    mask = np.zeros(len(heldout), bool)
    mask[rows] = True
    heldout.select(mask).save(out / "heldout_sample.npz")
    report = {
        "version": version, "chosen": chosen, "threshold": round(cand.threshold, 6),
        "why": f"the MLP unless logistic regression costs over {TIE:.0%} less per committed "
               "token on the validation rounds; threshold: the lowest expected round cost per "
               "committed token within the round cap",
        "cost_model_ms": cost.as_dict(),
        "settings": {"epochs": settings.epochs, "lr": settings.lr, "batch": settings.batch,
                     "weight_decay": settings.weight_decay, "seed": settings.seed,
                     "hidden": list(cand.model.hidden)},
        "data": {"train_rows": len(train), "heldout_rows": len(heldout),
                 "train_accepted_frac": round(float(train.accepted.mean()), 4),
                 "heldout_accepted_frac": round(float(heldout.accepted.mean()), 4)},
        "comparison": comparison, "cross_domain": cross,
        "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    say(f"[train] chose {chosen} (version {version}, threshold {cand.threshold:.3f}); "
        f"wrote {out}/predictor.onnx, predictor.pt, heldout_sample.npz, report.json")
    return report


def load_torch(path: Path) -> RejectionModel:
    """The torch twin of a shipped predictor.onnx (from predictor.pt)."""
    saved = torch.load(path, weights_only=True)
    model = RejectionModel(saved["state"]["mean"].shape[0], tuple(saved["hidden"]))
    model.load_state_dict(saved["state"])
    return model.eval()
