"""docs/configuration.md lists every setting of every service (flag and variable)."""

import dataclasses
from pathlib import Path

import pytest

from common.config import BaseConfig
from services.admission_scheduler.service import SchedulerConfig
from services.edge_drafter.service import EdgeConfig
from services.gpu_verifier.service import VerifierConfig
from services.metrics.service import MetricsConfig
from services.predictor.service import PredictorConfig

DOC = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()


@pytest.mark.parametrize("config", [BaseConfig, VerifierConfig, SchedulerConfig, EdgeConfig,
                                    MetricsConfig, PredictorConfig])
def test_every_field_is_documented(config):
    for f in dataclasses.fields(config):
        flag, env = "--" + f.name.replace("_", "-"), "WISP_" + f.name.upper()
        assert f"| `{flag}` | `{env}` |" in DOC, f"{config.__name__}.{f.name} is not documented"
