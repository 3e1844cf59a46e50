"""The runner: baseline -> stages (verify, measure, checkpoint) -> export -> compare -> report."""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from slimkit.core.errors import OutputExistsError, ResumeError, SlimkitError
from slimkit.core.files import dir_size, write_json
from slimkit.core.hashing import update_with_state, update_with_tensor
from slimkit.core.seed import seed_everything
from slimkit.core.stages import STAGES, StageContext
from slimkit.data.bundle import DataBundle
from slimkit.export.onnx import check_parity, export_onnx
from slimkit.io.artifact import library_versions, load_artifact, save_artifact
from slimkit.io.model import SlimModel
from slimkit.measure import (
    check_finite,
    check_fits,
    compare_latency,
    fidelity,
    measure_static,
    predict,
)
from slimkit.pipeline.recipe import recipe_to_dict
from slimkit.pipeline.verdict import judge
from slimkit.train.distributed import barrier, world

RUN_DIR = ".slimkit-run"
STATE = "state.json"


@dataclass
class RunPaths:
    out: Path
    run: Path = field(init=False)

    def __post_init__(self) -> None:
        self.run = self.out / RUN_DIR

    def checkpoint(self, index: int) -> Path:
        return self.run / ("baseline" if index < 0 else f"stage-{index:02d}")


def fingerprint(model: SlimModel, data: DataBundle | None, recipe: dict) -> str:
    """A hash of the model (spec and weights), the data and the recipe: what makes a run."""
    h = hashlib.sha256()
    h.update(json.dumps(model.describe(), sort_keys=True, default=str).encode())
    update_with_state(h, model.module.state_dict())
    if data is not None:
        h.update(data.name.encode())
        for t in (data.x_train, data.y_train, data.x_test, data.y_test):
            update_with_tensor(h, t)
    h.update(json.dumps(recipe, sort_keys=True).encode())
    return h.hexdigest()


def _prepare_out(paths: RunPaths, fp: str, overwrite: bool, resume: bool,
                 source: str) -> dict:
    """Decide between a fresh run and a resume; return the saved state (or a fresh one).

    Only a directory this runner made (it holds ``.slimkit-run``) or an empty one is ever
    deleted, and never one that holds the input model.
    """
    state_file = paths.run / STATE
    src = Path(source).resolve()
    if src.exists() and (src == paths.out.resolve() or paths.out.resolve() in src.parents):
        raise OutputExistsError(f"output '{paths.out}' would hold or replace the input model "
                                f"'{source}'; choose another --out")
    if paths.out.exists():
        if resume and state_file.is_file():
            state = json.loads(state_file.read_text())
            if state.get("fingerprint") != fp:
                raise ResumeError(
                    f"'{paths.out}' holds a run of a different model, data or recipe; "
                    "refusing to resume it. Use another --out, or --overwrite to start over")
            return state
        ours = paths.run.is_dir() or not any(paths.out.iterdir())
        if not ours:
            raise OutputExistsError(f"output '{paths.out}' exists and is not a slimkit run "
                                    "directory; refusing to touch it, choose another --out")
        if not overwrite and not resume:
            raise OutputExistsError(f"output '{paths.out}' already exists; pass --overwrite "
                                    "to replace it or --resume to continue an interrupted run")
        shutil.rmtree(paths.out)
    paths.run.mkdir(parents=True, exist_ok=True)
    return {"fingerprint": fp, "stages": []}


def _measure_checkpoint(model: SlimModel, data: DataBundle | None, ckpt: Path,
                        layers: bool = False) -> dict:
    m = measure_static(model, data, layers=layers)
    m["size_bytes"] = dir_size(ckpt)
    return m


def _run_stages(model: SlimModel, data: DataBundle | None, recipe: Any, paths: RunPaths,
                state: dict, ctx: StageContext) -> list[SlimModel]:
    """Apply each unfinished stage; a resumed run starts from the checkpoint the last finished
    stage saved (the same weights bit for bit), later stages from the model in memory, which
    keeps its module structure for the next technique."""
    verify_inputs = data.example_inputs(2) if data is not None else model.example_inputs(2)
    done = len(state["stages"])
    models: list[SlimModel] = []
    for i, cfg in enumerate(recipe.stages[:done]):
        ctx.log(f"stage {i + 1} {cfg.kind}: finished in an earlier run (resuming after it)")
    for i in range(done, len(recipe.stages)):
        cfg = recipe.stages[i]
        if i == done and i > 0:
            model = load_artifact(paths.checkpoint(i - 1), template=ctx.teacher.module)
        ctx.log(f"stage {i + 1}/{len(recipe.stages)} {cfg.kind} ...")
        ctx.workdir = paths.run / f"stage-{i:02d}-train"
        seed_everything(recipe.seed + i)
        start = time.perf_counter()
        model, record = STAGES.get(cfg.kind).apply(model, cfg, ctx)
        seconds = time.perf_counter() - start
        check_finite(model, verify_inputs, f"stage {i + 1} ({cfg.kind})")
        entry = {"index": i, "kind": cfg.kind, "seconds": seconds, **record.to_dict(),
                 "config": json.loads(cfg.model_dump_json())}
        model.history.append({k: entry[k] for k in ("index", "kind", "config", "changed",
                                                    "skipped")})
        if world()[0] == 0:  # under torchrun every rank trains; rank 0 alone writes
            ckpt = save_artifact(model, paths.checkpoint(i), overwrite=True)
            entry["measure"] = _measure_checkpoint(model, data, ckpt)
            state["stages"].append(entry)
            write_json(paths.run / STATE, state)
            acc = entry["measure"]["accuracy"]
            ctx.log(f"stage {i + 1} {cfg.kind}: {len(record.changed)} changed, "
                    f"{len(record.skipped)} skipped, {seconds:.1f}s"
                    + (f", top-1 {acc['top1']:.2%}" if acc else ""))
        barrier()
        models.append(model)
    earlier = [load_artifact(paths.checkpoint(i), template=ctx.teacher.module)
               for i in range(done)]
    return earlier + models


def environment(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads,
            "platform": platform.platform(), **library_versions()}


def _compare(models: dict[str, tuple[SlimModel, Path | None]], data: DataBundle | None,
             recipe: Any, progress: bool = False) -> tuple[dict, dict]:
    """Check the final model's ONNX parity and time every model interleaved in one process.

    Args:
        models: label -> (model, its ONNX file or None when export failed), in order; the
            last one is the final model.

    Returns:
        ``(latency per label, parity of the final model)``.
    """
    final, final_onnx = list(models.values())[-1]
    opts = recipe.measure
    batch_sizes = sorted(set(opts.batch_sizes) | ({recipe.target.min_speedup.batch}
                                                  if recipe.target.min_speedup else set()))
    sample = (data.x_test[: max(batch_sizes)] if data is not None
              else final.example_inputs(max(batch_sizes))[0])
    parity = ({"ok": False, "error": "the final model could not be exported to ONNX"}
              if final_onnx is None
              else check_parity(final, final_onnx, (sample[:8],), atol=opts.parity_atol))
    lat = compare_latency({k: (m.module, p) for k, (m, p) in models.items()}, (sample,),
                          batch_sizes, threads=opts.threads, warmup=opts.warmup,
                          repeats=opts.repeats, progress=progress)
    latency = {label: {rt: {b: {k: r[label][k] for k in ("median_ms", "p90_ms")}
                            for b, r in lat[rt].items() if label in r}
                       for rt in ("torch", "onnxruntime")}
               for label in models}
    return latency, parity


def _export(model: SlimModel, path: Path, errors: dict[str, str], label: str) -> Path | None:
    """Export to ONNX; a failure is recorded under ``label`` instead of aborting the run."""
    try:
        return export_onnx(model, path)
    except SlimkitError as exc:
        errors[label] = str(exc)
        return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _comparison(baseline: dict, final: dict) -> dict:
    """Ratios baseline / final: size on disk, ONNX size, latency per runtime and batch."""
    out: dict[str, Any] = {"size_ratio": baseline["size_bytes"] / final["size_bytes"],
                           "onnx_size_ratio": _ratio(baseline["onnx_size_bytes"],
                                                     final["onnx_size_bytes"])}
    for rt in ("torch", "onnxruntime"):
        out[rt] = {b: {"baseline_ms": baseline["latency"][rt][b]["median_ms"],
                       "final_ms": final["latency"][rt][b]["median_ms"],
                       "speedup": baseline["latency"][rt][b]["median_ms"]
                       / final["latency"][rt][b]["median_ms"]}
                   for b in baseline["latency"][rt] if b in final["latency"][rt]}
    out["batch_sizes"] = [int(b) for b in baseline["latency"]["torch"]]
    return out


def compress(model: SlimModel, data: DataBundle | None, recipe: Any, out: str | Path, *,
             overwrite: bool = False, resume: bool = False, progress: bool = True,
             log: Any = print) -> dict[str, Any]:
    """Run a recipe end to end and write the artifact, the ONNX file and the report.

    The input model is never modified. Checkpoints after every stage let an interrupted run
    continue with ``resume=True``; the artifact and report are written also when the target
    is missed.

    Returns:
        The report dict (also written as ``OUT/report.json`` and ``OUT/report.html``).

    Raises:
        OutputExistsError, ResumeError, ConfigError, DataError, ModelError, ExportError.
    """
    from slimkit.report import write_report

    recipe_dict = recipe_to_dict(recipe)
    check_fits(model, data)
    paths = RunPaths(Path(out))
    rank = world()[0]
    baseline = model.copy()
    if rank == 0:
        state = _prepare_out(paths, fingerprint(model, data, recipe_dict), overwrite, resume,
                             model.source or model.name)
        if "baseline" not in state:
            ckpt = save_artifact(baseline, paths.checkpoint(-1), overwrite=True)
            state["baseline"] = _measure_checkpoint(baseline, data, ckpt, layers=True)
            write_json(paths.run / STATE, state)
    barrier()
    if rank != 0:
        state = json.loads((paths.run / STATE).read_text())
        log, progress = (lambda s: None), False
    ctx = StageContext(data=data, teacher=baseline, seed=recipe.seed, progress=progress, log=log)
    stage_models = _run_stages(baseline.copy(), data, recipe, paths, state, ctx)
    if rank != 0:  # measurement and export are rank 0's: other ranks would skew the timings
        return {}
    final = stage_models[-1] if stage_models else baseline.copy()
    final.recipe = recipe_dict
    log("exporting ONNX and measuring baseline and final in one run ...")
    final_dir = save_artifact(final, paths.out / "model", overwrite=True)
    errors: dict[str, str] = {}
    models = {"baseline": (baseline, _export(baseline, paths.run / "baseline.onnx", errors,
                                             "baseline"))}
    for i, m in enumerate(stage_models[:-1]):
        models[f"stage-{i}"] = (m, _export(m, paths.run / f"stage-{i:02d}.onnx", errors,
                                           f"stage-{i}"))
    models["final"] = (final, _export(final, paths.out / "model.onnx", errors, "final"))
    for label, err in errors.items():
        log(f"ONNX export of {label} failed: {err}")
    latency, parity = _compare(models, data, recipe, progress)
    base_m = {**state["baseline"], "latency": latency["baseline"],
              "onnx_size_bytes": _size(models["baseline"][1])}
    final_m = {**measure_static(final, data, layers=True), "size_bytes": dir_size(final_dir),
               "latency": latency["final"], "onnx_size_bytes": _size(models["final"][1])}
    for i, st in enumerate(state["stages"]):
        st["measure"]["latency"] = latency.get(f"stage-{i}", latency["final"])
    comparison = _comparison(base_m, final_m)
    report = {
        "slimkit_version": library_versions()["slimkit"],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": model.describe(), "data": _describe_data(data), "recipe": recipe_dict,
        "target": recipe_dict["target"],
        "verdict": judge(recipe.target, base_m, final_m, comparison, errors.get("final")),
        "baseline": base_m, "final": final_m, "stages": state["stages"],
        "comparison": comparison, "parity": parity,
        "fidelity": (fidelity(predict(baseline.module, data.x_test),
                              predict(final.module, data.x_test)) if data is not None else None),
        "environment": environment(recipe.measure.threads),
        "outputs": {"artifact": str(final_dir),
                    "onnx": str(models["final"][1]) if models["final"][1] else None},
        "export_errors": errors,
    }
    write_report(report, paths.out)
    return report


def _size(path: Path | None) -> int | None:
    return None if path is None else path.stat().st_size


def _describe_data(data: DataBundle | None) -> dict | None:
    if data is None:
        return None
    return {"name": data.name, "n_train": len(data.x_train), "n_test": len(data.x_test),
            "input_shape": list(data.input_shape), "num_classes": data.num_classes}
