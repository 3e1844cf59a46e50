"""The test split out of the stages' reach, and read once by the runner after the last stage."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

import pytest
import torch

from slimkit.core.config import SlimConfig
from slimkit.core.record import Record
from slimkit.core.stages import StageContext
from slimkit.data.bundle import DataBundle
from slimkit.data.guard import TestSplitError, hidden_test_message, hide_test, hides_test
from slimkit.data.stream import StreamData
from slimkit.measure.stats import wilson
from slimkit.pipeline import compress, load_recipe, register_stage

FAST = {"threads": 1, "batch_sizes": [1], "warmup": 1, "repeats": 3}
PEEK: dict[str, Any] = {"how": None, "seen": None}


class PeekConfig(SlimConfig):
    kind: Literal["test_peek_at_test"] = "test_peek_at_test"


@register_stage(PeekConfig)
def _peek(model, cfg, ctx):
    """A stage that reads whatever PEEK["how"] says, and records what it saw."""
    PEEK["seen"] = PEEK["how"](ctx.data) if PEEK["how"] else None
    return model.copy(), Record(changed=["nothing"])


@dataclass
class CountingBundle(DataBundle):
    """A DataBundle that counts how often its test split is read."""

    test_reads: int = 0

    def _split(self, split: str) -> tuple[Any, torch.Tensor]:
        if split == "test":
            self.test_reads += 1
        return super()._split(split)


def _counting(digits: DataBundle) -> CountingBundle:
    return CountingBundle(**{f.name: getattr(digits, f.name) for f in fields(DataBundle)})


READS = {
    "batches": lambda d: next(d.batches("test")),
    "head": lambda d: d.head("test", 4),
    "x_test": lambda d: d.x_test[:4],
    "y_test shape": lambda d: d.y_test.shape,
    "torch op": lambda d: torch.cat([d.x_test]),
}


@pytest.mark.parametrize("how", list(READS))
def test_a_stage_reading_the_test_split_fails_with_the_exact_error(mlp, digits, tmp_path, how):
    PEEK["how"] = READS[how]
    recipe = load_recipe({"stages": [{"kind": "test_peek_at_test"}], "measure": FAST})
    with pytest.raises(TestSplitError) as err:
        compress(mlp, digits, recipe, tmp_path / "o", progress=False, log=lambda s: None)
    assert str(err.value) == (
        f"a stage cannot read the test split of '{digits.name}': make choices on the "
        "validation split (data.batches('val'), data.head('val', n)); the runner evaluates "
        "the test split once, after the last stage")


def test_a_stage_still_reads_train_and_validation(digits):
    view = StageContext(data=digits, hide_test=True).data
    assert isinstance(view, DataBundle) and hides_test(view) and not hides_test(digits)
    assert torch.equal(view.x_train, digits.x_train)
    assert torch.equal(view.head("val", 7)[0], digits.head("val", 7)[0])
    assert view.n_test == digits.n_test and view.fingerprint() == digits.fingerprint()
    assert StageContext(data=digits).data is digits  # only the runner asks for the view
    assert hide_test(view) is view


def test_a_stream_view_hides_its_test_source(digits):
    calls = {"test": 0}

    def test_source():
        calls["test"] += 1
        return [(digits.x_test[:8], digits.y_test[:8])]

    stream = StreamData("s", train=[(digits.x_train[:16], digits.y_train[:16])],
                        test=test_source, val=[(digits.x_train[:8], digits.y_train[:8])])
    view = hide_test(stream)
    assert isinstance(view, StreamData)
    with pytest.raises(TestSplitError, match="test split of 's'"):
        view.head("test", 2)
    assert view.example_inputs(2)[0].shape == (2, 1, 8, 8)
    assert calls["test"] == 0 and next(stream.batches("test"))[0].shape[0] == 8


def test_a_run_reads_the_test_split_exactly_once_after_the_last_stage(mlp, digits, tmp_path):
    data = _counting(digits)
    PEEK["how"] = lambda d: (data.test_reads, len(d.head("val", 10_000)[1]))
    recipe = load_recipe({"stages": [{"kind": "test_peek_at_test"},
                                     {"kind": "magnitude_prune", "sparsity": 0.5}],
                          "measure": FAST})
    report = compress(mlp, data, recipe, tmp_path / "o", progress=False, log=lambda s: None)
    reads_during_stages, n_val = PEEK["seen"]
    assert reads_during_stages == 0 and data.test_reads == 1
    assert report["test_split"]["policy"] == "test split read once, after the last stage"
    assert report["test_split"]["source_reads"] == 1
    assert report["test_split"]["samples"] == digits.n_test
    # Stages were measured on the validation split; baseline and final on the test split.
    assert all(st["measure"]["split"] == "val" for st in report["stages"])
    assert report["stages"][0]["measure"]["accuracy_ci95"]["n"] == n_val
    for side in ("baseline", "final"):
        m = report[side]
        assert m["split"] == "test" and m["val_metrics"]["top1"] >= 0
        ci = m["accuracy_ci95"]
        assert ci["n"] == digits.n_test and ci["value"] == pytest.approx(m["accuracy"]["top1"])
        assert ci["ci95"] == pytest.approx(list(wilson(ci["correct"], ci["n"])))
    # Whether baseline and final differ beyond the noise, paired on the same test images: the
    # discordant counts agree with the two accuracies measured separately.
    paired = report["test_split"]["baseline_vs_final"]
    assert paired["n"] == digits.n_test and "McNemar" in paired["method"]
    assert (paired["a_only"] - paired["b_only"]) / paired["n"] == pytest.approx(
        report["baseline"]["accuracy"]["top1"] - report["final"]["accuracy"]["top1"], abs=1e-9)
    # The baseline's test accuracy is the model's own accuracy on the whole test split.
    with torch.no_grad():
        top1 = (mlp.module(digits.x_test).argmax(1) == digits.y_test).float().mean().item()
    assert report["baseline"]["accuracy"]["top1"] == pytest.approx(top1, abs=1e-6)


def test_the_error_message_names_the_data():
    assert "'builtin:x'" in hidden_test_message("builtin:x")
