"""The rejection predictor's models in torch, their training, and their export to ONNX.

`RejectionModel` maps feature rows [B, F] to the probability [B] that each drafted token is
rejected. Feature scaling is part of the model (buffers fitted on the training rows), so the
exported ONNX graph takes raw feature rows as the edge computes them. With no hidden layers it
is logistic regression; WISP's choice is a small MLP.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.protocol import DRAFT_FEATURES

__all__ = ["FORMAT", "RejectionModel", "TrainSettings", "export_onnx", "fit"]

FORMAT = "wisp.rejection-predictor/1"  # input "features" [B, F] float32 -> "p_reject" [B]


class RejectionModel(nn.Module):
    def __init__(self, num_features: int = len(DRAFT_FEATURES), hidden: tuple[int, ...] = (32, 16)):
        super().__init__()
        self.hidden = tuple(hidden)
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("scale", torch.ones(num_features))
        layers: list[nn.Module] = []
        width = num_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    @property
    def kind(self) -> str:
        return "mlp" if self.hidden else "logreg"

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, F] -> rejection logits [B]."""
        return self.net((features - self.mean) / self.scale).squeeze(-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, F] float32 -> p_reject [B]."""
        return torch.sigmoid(self.logits(features))

    def predict(self, features: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self(torch.from_numpy(np.ascontiguousarray(features, np.float32))).numpy()


@dataclass(slots=True, frozen=True)
class TrainSettings:
    epochs: int = 300
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch: int = 4096
    seed: int = 0


def fit(model: RejectionModel, features: np.ndarray, accepted: np.ndarray,
        settings: TrainSettings | None = None) -> RejectionModel:
    """Fit on rows features [N, F], accepted [N] bool (binary cross-entropy on rejection)."""
    settings = settings or TrainSettings()
    gen = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)  # the layers' initial weights
    model.__init__(features.shape[1], model.hidden)
    x = torch.from_numpy(np.ascontiguousarray(features, np.float32))  # [N, F]
    y = torch.from_numpy((~accepted).astype(np.float32))  # [N] 1 = rejected
    model.mean.copy_(x.mean(0))
    model.scale.copy_(x.std(0).clamp_min(1e-6))
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr,
                            weight_decay=settings.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    for _ in range(settings.epochs):
        order = torch.randperm(len(x), generator=gen)
        for lo in range(0, len(x), settings.batch):
            idx = order[lo:lo + settings.batch]
            opt.zero_grad()
            loss_fn(model.logits(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    return model


def export_onnx(model: RejectionModel, metadata: dict[str, object]) -> bytes:
    """The model as ONNX bytes: input "features" [B, F] float32 with a dynamic batch, output
    "p_reject" [B]; `metadata` (plus the format, the feature names and the kind) goes into the
    model's metadata_props as JSON values."""
    import onnx

    model.eval()
    example = torch.zeros(4, model.mean.shape[0])
    buf = io.BytesIO()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(model, (example,), input_names=["features"],
                                output_names=["p_reject"],
                                dynamic_shapes={"features": {0: batch}}, dynamo=True,
                                verbose=False)
    program.save(buf)
    proto = onnx.load_from_string(buf.getvalue())
    meta = {"format": FORMAT, "feature_names": list(DRAFT_FEATURES), "kind": model.kind,
            **metadata}
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"wisp.{key}", json.dumps(value)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()
