"""Distillation configs: defaults, ranges, cross-field checks, documented fields."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from slimkit.distill.config import (
    DistillConfig,
    FeaturePair,
    LogitKD,
    SelfDistill,
    TransformerKD,
)


def test_defaults() -> None:
    cfg = DistillConfig()
    assert cfg.logits == LogitKD(temperature=4.0, alpha=0.5)
    assert cfg.features == [] and cfg.transformer is None and cfg.self_distill is None
    assert cfg.needs_teacher
    assert FeaturePair(student="a", teacher="b").loss == "hint"
    sd = DistillConfig(logits=None, self_distill=SelfDistill(exits=["x"]))
    assert not sd.needs_teacher and sd.self_distill.temperature == 3.0


@pytest.mark.parametrize("kwargs", [{"temperature": 0.0}, {"temperature": -1.0},
                                    {"alpha": -0.1}, {"alpha": 1.5}])
def test_logit_kd_ranges(kwargs: dict) -> None:
    with pytest.raises(ValidationError):
        LogitKD(**kwargs)


def test_cross_field_checks() -> None:
    with pytest.raises(ValidationError, match="teacher_layers has 1"):
        TransformerKD(student_layers=["a", "b"], teacher_layers=["c"])
    with pytest.raises(ValidationError, match="both 0"):
        TransformerKD(student_layers=["a"], teacher_layers=["c"], hidden_weight=0,
                      attention_weight=0)
    with pytest.raises(ValidationError, match="at least one"):
        DistillConfig(logits=None)
    with pytest.raises(ValidationError, match="more than once"):
        SelfDistill(exits=["a", "a"])
    with pytest.raises(ValidationError):
        FeaturePair(student="a", teacher="b", loss="cosine")
    with pytest.raises(ValidationError, match="Extra inputs"):
        DistillConfig(temprature=3)


def test_round_trip_through_json() -> None:
    cfg = DistillConfig(features=[FeaturePair(student="a", teacher="b", loss="relational")],
                        self_distill=SelfDistill(exits=["a"], feature_weight=0.1))
    assert DistillConfig.model_validate_json(cfg.model_dump_json()) == cfg


@pytest.mark.parametrize("model", [LogitKD, FeaturePair, TransformerKD, SelfDistill,
                                   DistillConfig])
def test_every_field_is_documented(model: type[BaseModel]) -> None:
    undocumented = [n for n, f in model.model_fields.items() if not f.description]
    assert undocumented == []
