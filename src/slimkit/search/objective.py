"""Measuring one candidate recipe: build it, then cheap measurements first.

The order is the cost order: FLOPs and size (counted), then the proxy metric (BatchNorm
statistics re-estimated on training samples, the task's metric on the validation split:
never the test split), then latency (timed in the target runtime, interleaved against the
baseline in the same process). A candidate that already breaks a counted constraint is not
timed (the trial is pruned as hopeless).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimkit.core.errors import ModelError
from slimkit.core.files import dir_size
from slimkit.core.seed import seed_everything
from slimkit.core.stages import STAGES, StageContext
from slimkit.data.bundle import DataBundle
from slimkit.io import batch as B
from slimkit.io.artifact import save_artifact
from slimkit.io.model import SlimModel
from slimkit.measure import check_finite
from slimkit.measure.counts import count_flops
from slimkit.measure.latency import (
    ort_runner,
    ort_session,
    ratio_ci,
    time_interleaved,
    torch_runner,
)
from slimkit.measure.tasks import get_task
from slimkit.pipeline.recipe import parse_recipe, recipe_to_dict
from slimkit.train.bn import recalibrate_batchnorm


def _artifact_bytes(path: Path) -> int:
    """An artifact's size as the runner counts it (its model files, when it can say)."""
    try:
        from slimkit.io.artifact import model_bytes
    except ImportError:
        return dir_size(path)
    return model_bytes(path)


@dataclass
class Measured:
    """What one candidate measured: ``values`` (metric, latency, size, flops as the study
    optimizes them) and everything else for the report."""

    metric: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    flops_share: float | None = None
    size_share: float | None = None
    size_bytes: int | None = None
    time_ratio: float | None = None
    time_ci95: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def build(model: SlimModel, data: DataBundle | None, recipe: Any,
          log: Any = lambda s: None) -> SlimModel:
    """Apply ``recipe``'s stages to a copy of ``model`` exactly as the runner does (seed per
    stage, the input model as teacher, NaN/Inf check and history after every stage)."""
    import dataclasses
    import json

    known = {f.name for f in dataclasses.fields(StageContext)}
    extra = {k: v for k, v in (("hide_test", True), ("extras", {"target": recipe.target}))
             if k in known}  # as the runner gives them: stages never see the test split
    ctx = StageContext(data=data, teacher=model, seed=recipe.seed, progress=False, log=log,
                       **extra)
    out = model.copy()
    verify = data.example_inputs(2) if data is not None else model.example_inputs(2)
    for i, cfg in enumerate(recipe.stages):
        seed_everything(recipe.seed + i)
        out, record = STAGES.get(cfg.kind).apply(out, cfg, ctx)
        check_finite(out, verify, f"stage {i + 1} ({cfg.kind})")
        entry = {"index": i, "kind": cfg.kind, **record.to_dict(),
                 "config": json.loads(cfg.model_dump_json())}
        out.history.append({k: entry[k] for k in ("index", "kind", "config", "changed",
                                                  "skipped")})
    out.recipe = recipe_to_dict(recipe)
    return out


class Evaluator:
    """Measures candidates against one baseline (measured once, here).

    Args:
        model, data: the baseline and its data (the proxy needs data with a training split).
        metric: the metric the search optimizes (a name of the data's task).
        runtime, batch: where latency is timed; ``repeats``/``warmup`` per trial.
        proxy: :class:`~slimkit.search.config.ProxyOptions`.
    """

    def __init__(self, model: SlimModel, data: DataBundle, metric: str, runtime: str,
                 batch: int, repeats: int, warmup: int, proxy: Any, seed: int = 0,
                 threads: int = 1) -> None:
        self.threads = threads
        self.model, self.data, self.metric = model, data, metric
        self.runtime, self.batch, self.repeats, self.warmup = runtime, batch, repeats, warmup
        self.task = get_task(data.task)
        self.calib = data.calibration(proxy.calib_samples, seed)
        self.calib_bs = proxy.calib_batch_size
        self.val_samples = proxy.val_samples
        self.example = data.example_inputs(1)
        self.timing_inputs = B.tmap(lambda t: _repeat_to(t, batch), data.example_inputs(batch))
        self._tmp = tempfile.TemporaryDirectory(prefix="slimkit-search-")
        self.base_flops = count_flops(model.module, self.example)["flops"]
        self.base_size = _artifact_bytes(save_artifact(model, Path(self._tmp.name) / "baseline"))
        self.base_metrics = self.metrics(model, recalibrate=True)
        self.base_metrics_raw = self.metrics(model, recalibrate=False)
        self._base_runner = self._runner(model, "baseline")

    @property
    def higher_is_better(self) -> bool:
        return self.task.higher_is_better[self.metric]

    def close(self) -> None:
        self._tmp.cleanup()

    def metrics(self, model: SlimModel, recalibrate: bool) -> dict[str, float]:
        """The task's metrics on the validation split, after BatchNorm re-estimation on the
        calibration samples when ``recalibrate`` (on a copy; ``model`` is left as it is)."""
        module = model.module
        if recalibrate:
            module = model.copy().module
            recalibrate_batchnorm(module, self.calib, self.calib_bs)
        n = self.val_samples

        def batches() -> Any:
            seen = 0
            for x, y in self.data.batches("val"):
                if n is not None and seen >= n:
                    return
                k = len(y) if n is None else min(len(y), n - seen)
                seen += k
                yield B.take(x, slice(0, k)), y[:k]

        with B.judging(model.output):
            out = self.task.evaluate(module, batches, self.model.module)
        return out

    def counts(self, cand: SlimModel) -> Measured:
        m = Measured()
        m.flops_share = count_flops(cand.module, self.example)["flops"] / self.base_flops
        path = save_artifact(cand, Path(self._tmp.name) / "candidate", overwrite=True)
        m.size_bytes = _artifact_bytes(path)
        m.size_share = m.size_bytes / self.base_size
        return m

    def proxy(self, cand: SlimModel, m: Measured, recalibrate: bool = True) -> None:
        m.metrics = self.metrics(cand, recalibrate)
        m.metric = m.metrics[self.metric]
        if not math.isfinite(m.metric):
            raise ModelError(f"the candidate's {self.metric} is {m.metric}")

    def latency(self, cand: SlimModel, m: Measured, repeats: int | None = None) -> None:
        """Time the candidate and the baseline interleaved; the median of per-round ratios."""
        run = self._runner(cand, "candidate")
        t = time_interleaved({"baseline": self._base_runner, "candidate": run},
                             self.warmup, repeats or self.repeats, keep_samples=True)
        ratio, lo, hi = ratio_ci(t["candidate"]["samples_ms"], t["baseline"]["samples_ms"])
        m.time_ratio, m.time_ci95 = ratio, [lo, hi]

    def _runner(self, model: SlimModel, name: str) -> Any:
        inputs = self.timing_inputs
        if self.runtime == "torch":
            return torch_runner(model.module.eval(), inputs)
        from slimkit.export.onnx import export_onnx

        path = export_onnx(model, Path(self._tmp.name) / f"{name}.onnx")
        return ort_runner(ort_session(path, self.threads), inputs)


def candidate_recipe(base: dict, stages: list[dict]) -> Any:
    """The recipe ``base`` (a dict) with ``stages`` and no search block, validated."""
    return parse_recipe({**{k: v for k, v in base.items() if k != "search"}, "stages": stages},
                        "candidate recipe")


def _repeat_to(t: torch.Tensor, batch: int) -> torch.Tensor:
    if t.shape[0] >= batch:
        return t[:batch].contiguous()
    reps = (batch + t.shape[0] - 1) // t.shape[0]
    return t.repeat(reps, *([1] * (t.dim() - 1)))[:batch].contiguous()


__all__ = ["Evaluator", "Measured", "build", "candidate_recipe"]
