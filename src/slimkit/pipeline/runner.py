"""The runner: baseline -> stages (verify, measure, checkpoint) -> export -> compare -> report."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from slimkit.core import tracking
from slimkit.core.errors import SlimkitError
from slimkit.core.files import output_lock, replace_dir, write_json
from slimkit.core.hashing import update_with_state, update_with_tensor
from slimkit.core.progress import mode as progress_mode
from slimkit.core.progress import step
from slimkit.core.record import Record
from slimkit.core.seed import seed_everything
from slimkit.core.stages import REBUILDERS, STAGES, StageContext
from slimkit.data.bundle import DataBundle
from slimkit.data.validate import data_warnings
from slimkit.export.onnx import check_parity, export_onnx
from slimkit.io import batch as B
from slimkit.io.artifact import (
    WEIGHTS,
    library_versions,
    load_artifact,
    model_bytes,
    save_artifact,
)
from slimkit.io.model import SlimModel
from slimkit.io.transforms import replay_transforms
from slimkit.io.weights import load_weights
from slimkit.measure import (
    check_finite,
    check_fits,
    compare_latency,
    layer_units,
    measure_static,
    ratio_ci,
)
from slimkit.measure.latency import layer_growth, ort_layer_times
from slimkit.pipeline.outdir import (
    EXITS,
    STATE,
    RunPaths,
    prepare_out,
    remove_checkpoints,
    sibling,
)
from slimkit.pipeline.recipe import recipe_to_dict
from slimkit.pipeline.test_split import final_test, with_test
from slimkit.pipeline.verdict import check_target, judge
from slimkit.train.distributed import barrier, world


def fingerprint(model: SlimModel, data: DataBundle | None, recipe: dict,
                threads: int | None = None) -> str:
    """A hash of the model (spec and weights), the data, the recipe and the intra-op thread
    count (default: torch's now), which changes the float results: what makes a run."""
    h = hashlib.sha256()
    h.update(json.dumps(model.describe(), sort_keys=True, default=str).encode())
    update_with_state(h, model.module.state_dict())
    if data is not None:
        h.update(data.name.encode())
        if data.streaming:
            h.update(data.fingerprint().encode())
        else:
            for t in B.leaves((data.x_train, data.y_train, data.x_test, data.y_test)):
                update_with_tensor(h, t)
    h.update(json.dumps(recipe, sort_keys=True).encode())
    h.update(f"threads={threads or torch.get_num_threads()}".encode())
    return h.hexdigest()


def _measure_checkpoint(model: SlimModel, data: DataBundle | None, ckpt: Path,
                        layers: bool = False, reference: torch.nn.Module | None = None) -> dict:
    m = measure_static(model, data, layers=layers, reference=reference, split="val")
    m["size_bytes"] = model_bytes(ckpt)
    return m


def _run_stages(model: SlimModel, data: DataBundle | None, recipe: Any, paths: RunPaths,
                state: dict, ctx: StageContext) -> list[SlimModel]:
    """Apply each unfinished stage; a resumed run starts from the checkpoint the last finished
    stage saved (rebuilt in the structure the run had, see :func:`_reload`), later stages from
    the model in memory, which keeps its module structure for the next technique and takes
    its weights back from its checkpoint (see :func:`_adopt_checkpoint`): the resumed and the
    uninterrupted run start every stage from the same module and the same bytes."""
    verify_inputs = data.example_inputs(2) if data is not None else model.example_inputs(2)
    done = len(state["stages"])
    models: list[SlimModel] = []
    for i, cfg in enumerate(recipe.stages[:done]):
        ctx.log(f"stage {i + 1} {cfg.kind}: finished in an earlier run (resuming after it)")
    for i in range(done, len(recipe.stages)):
        cfg = recipe.stages[i]
        if i == done and i > 0:
            model = _reload(paths, i - 1, ctx.teacher, state)
        ctx.log(f"stage {i + 1}/{len(recipe.stages)} {cfg.kind} ...")
        ctx.workdir = paths.run / f"stage-{i:02d}-train"
        seed_everything(recipe.seed + i)
        start = time.perf_counter()
        with tracking.scope(f"stage-{i:02d}-{cfg.kind}"):
            model, record = STAGES.get(cfg.kind).apply(model, cfg, ctx)
        seconds = time.perf_counter() - start
        check_finite(model, verify_inputs, f"stage {i + 1} ({cfg.kind})")
        entry = {"index": i, "kind": cfg.kind, "seconds": seconds, **record.to_dict(),
                 "config": json.loads(cfg.model_dump_json())}
        model.history.append({k: entry[k] for k in ("index", "kind", "config", "changed",
                                                    "skipped")})
        _finish_stage(model, record, entry, data, paths, state, last=i + 1 == len(recipe.stages),
                      reference=ctx.teacher.module if ctx.teacher else None)
        tracking.log_scalars("stages", {"seconds": seconds, **entry.get("measure", {})}, i)
        tracking.log_text(f"stages/{i:02d}-{cfg.kind}", {k: entry.get(k) for k in (
            "changed", "skipped", "config")}, i)
        acc = entry.get("measure", {}).get("accuracy")
        ctx.log(f"stage {i + 1} {cfg.kind}: {len(record.changed)} changed, "
                f"{len(record.skipped)} skipped, {seconds:.1f}s"
                + (f", top-1 {acc['top1']:.2%}" if acc else ""))
        models.append(model)
    if world()[0] != 0:  # only rank 0 exports and measures the models of earlier stages
        return models
    return [_reload(paths, i, ctx.teacher, state) for i in range(done)] + models


def _finish_stage(model: SlimModel, record: Record, entry: dict, data: DataBundle | None,
                  paths: RunPaths, state: dict, last: bool,
                  reference: torch.nn.Module | None = None) -> None:
    """Checkpoint the stage's model, continue from the checkpoint's bytes, record the stage.

    Under torchrun every rank trains and rank 0 alone writes; the others adopt its checkpoint
    when a stage follows.
    """
    i = entry["index"]
    rank = world()[0]
    if rank == 0:
        save_artifact(model, paths.checkpoint(i), overwrite=True)
    barrier()
    if rank == 0 or not last:
        _adopt_checkpoint(model, paths.checkpoint(i))
    if rank != 0:
        return
    entry["measure"] = _measure_checkpoint(model, data, paths.checkpoint(i), reference=reference)
    state["stages"].append(entry)
    # What rebuilds the structure when a model has no zoo spec to carry it (see _reload).
    state.setdefault("transforms", []).append(
        [{"kind": kind, "version": REBUILDERS.get(kind).version, "plan": plan}
         for kind, plan in record.transforms])
    write_json(paths.run / STATE, state)


def _reload(paths: RunPaths, index: int, baseline: SlimModel, state: dict) -> SlimModel:
    """The model stage ``index`` saved, in the module structure the run had in memory.

    A zoo model's artifact rebuilds that structure itself (zoo spec + transforms). Any other
    model is rebuilt here from the user's own module: a copy of the baseline with the
    structural changes of the stages so far replayed on it, which then takes the weights.
    Loading the artifact's exported graph instead would hand the next stage a graph module
    without the layer types it selects by (a resumed run after ``lowrank`` found nothing to
    prune).
    """
    template = baseline.module
    if baseline.arch is None:
        steps = [t for per_stage in state.get("transforms", [])[:index + 1] for t in per_stage]
        template = replay_transforms(copy.deepcopy(template), steps)
    return load_artifact(paths.checkpoint(index), template=template)


def _adopt_checkpoint(model: SlimModel, ckpt: Path) -> None:
    """Give ``model`` its weights exactly as the checkpoint at ``ckpt`` holds them.

    A checkpoint keeps every value, but not always every bit: sparse tensors are stored as a
    bitmask of the non-zeros plus their values, so the -0.0 that pruning leaves where it
    zeroed a negative weight reads back as +0.0. A resumed run starts from the checkpoint; the
    uninterrupted run must continue from the same bytes, or the two hash differently (a
    training checkpoint refused its own run as "another run") and may round differently.
    """
    model.module.load_state_dict(load_weights(ckpt / WEIGHTS), strict=True)


def environment(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # threads: what the comparison was timed with; train_threads: what the stages ran with
    # (part of the run: a resume must use the same count).
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads,
            "train_threads": torch.get_num_threads(), "platform": platform.platform(),
            **library_versions()}


def _compare(models: dict[str, tuple[SlimModel, Path | None]], data: DataBundle | None,
             recipe: Any, progress: bool = False) -> tuple[dict, dict, dict]:
    """Check the final model's ONNX parity and time every model interleaved in one process.

    Args:
        models: label -> (model, its ONNX file or None when export failed), in order; the
            last one is the final model.

    Returns:
        ``(latency per label, parity of the final model, each model's latency change from
        the one before it)``.
    """
    final, final_onnx = list(models.values())[-1]
    opts = recipe.measure
    batch_sizes = sorted(set(opts.batch_sizes) | ({recipe.target.min_speedup.batch}
                                                  if recipe.target.min_speedup else set()))
    sample = (data.example_inputs(max(batch_sizes)) if data is not None
              else final.example_inputs(max(batch_sizes)))
    parity = ({"ok": False, "error": "the final model could not be exported to ONNX"}
              if final_onnx is None
              else check_parity(final, final_onnx, B.take(sample, slice(0, 8)),
                                atol=opts.parity_atol))
    lat = compare_latency({k: (m.module, p) for k, (m, p) in models.items()}, (sample,),
                          batch_sizes, threads=opts.threads, warmup=opts.warmup,
                          repeats=opts.repeats, progress=progress, keep_samples=True)
    latency = {label: {rt: {b: {k: r[label][k] for k in ("median_ms", "p90_ms")}
                            for b, r in lat[rt].items() if label in r}
                       for rt in ("torch", "onnxruntime")}
               for label in models}
    changes = _changes(lat, list(models))
    changes["overall"] = _changes(lat, ["baseline", "final"]).get("final", {})
    return latency, parity, changes


def _changes(lat: dict, labels: list[str]) -> dict[str, dict]:
    """Per model after the first: its latency against the model before it, per runtime and
    batch, as the median of paired per-round ratios with a 95% interval; ``slower``/``faster``
    only when the interval excludes 1, else ``no difference`` (within the noise)."""
    out: dict[str, dict] = {}
    for prev, cur in zip(labels, labels[1:], strict=False):
        out[cur] = {}
        for rt in ("torch", "onnxruntime"):
            for b, r in lat[rt].items():
                if prev in r and cur in r:
                    ratio, lo, hi = ratio_ci(r[cur]["samples_ms"], r[prev]["samples_ms"])
                    verdict = "slower" if lo > 1 else "faster" if hi < 1 else "no difference"
                    out[cur].setdefault(rt, {})[b] = {"time_ratio": ratio, "ci95": [lo, hi],
                                                      "verdict": verdict}
    return out


Explain = Callable[[str, str, str], list[dict]]


def _flag_slower(stages: list[dict], changes: dict[str, dict], runtime: str,
                 log: Callable[[str], None], explain: Explain | None = None) -> None:
    """Record, and say, every stage that made the target runtime slower than the model it
    started from (beyond the noise of the interleaved timing); ``explain(previous label,
    label, batch)`` names the layers whose time grew (``slower_layers`` per batch)."""
    labels = [f"stage-{i}" for i in range(len(stages) - 1)] + ["final"]
    for k, (st, label) in enumerate(zip(stages, labels, strict=False)):
        st["latency_change"] = changes.get(label, {})
        for b, c in st["latency_change"].get(runtime, {}).items():
            if c["verdict"] == "slower":
                lo, hi = c["ci95"]
                msg = (f"stage {st['index'] + 1} ({st['kind']}) made {runtime} slower at batch "
                       f"{b}: {c['time_ratio']:.2f}x the time of the model before it "
                       f"(95% CI {lo:.2f}-{hi:.2f})")
                grew = explain("baseline" if k == 0 else labels[k - 1], label, b) \
                    if explain is not None and runtime == "onnxruntime" else []
                if grew:
                    st.setdefault("slower_layers", {})[b] = grew
                    msg += "; time grew most in " + ", ".join(
                        f"{g['layer']} (+{g['added_ms']:.3g} ms)" for g in grew[:3])
                st.setdefault("flags", []).append(msg)
                log(f"warning: {msg}")


def _explainer(models: dict[str, tuple[SlimModel, Path | None]], data: DataBundle | None,
               threads: int) -> Explain:
    """``(previous, label, batch) -> layers whose ONNX Runtime time grew most`` between the
    two models' ONNX files, from ORT's per-node profile (:func:`layer_growth`)."""
    def explain(prev: str, label: str, batch: str) -> list[dict]:
        (pm, pp), (cm, cp) = models[prev], models[label]
        if pp is None or cp is None:
            return []
        x = (data.example_inputs(int(batch)) if data is not None
             else cm.example_inputs(int(batch)))
        times = [ort_layer_times(path, (x,), list(layer_units(m.module)), threads)
                 for m, path in ((pm, pp), (cm, cp))]
        return layer_growth(*times)

    return explain


def _export(model: SlimModel, path: Path, errors: dict[str, str], label: str) -> Path | None:
    """Export to ONNX; a failure is recorded under ``label`` instead of aborting the run."""
    try:
        return export_onnx(model, path)
    except SlimkitError as exc:
        errors[label] = str(exc)
        return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _comparison(baseline: dict, final: dict, overall: dict | None = None) -> dict:
    """Ratios baseline / final: size on disk, ONNX size, latency per runtime and batch.

    ``overall`` (baseline -> final from :func:`_changes`) adds each speedup's 95% interval
    and whether it is beyond the noise (``within_noise``)."""
    out: dict[str, Any] = {"size_ratio": baseline["size_bytes"] / final["size_bytes"],
                           "onnx_size_ratio": _ratio(baseline["onnx_size_bytes"],
                                                     final["onnx_size_bytes"])}
    for rt in ("torch", "onnxruntime"):
        out[rt] = {b: {"baseline_ms": baseline["latency"][rt][b]["median_ms"],
                       "final_ms": final["latency"][rt][b]["median_ms"],
                       "speedup": baseline["latency"][rt][b]["median_ms"]
                       / final["latency"][rt][b]["median_ms"]}
                   for b in baseline["latency"][rt] if b in final["latency"][rt]}
        for b, c in (overall or {}).get(rt, {}).items():
            if b in out[rt]:
                lo, hi = c["ci95"]  # of the time ratio final / baseline; speedup inverts it
                out[rt][b]["speedup_ci95"] = [1 / hi, 1 / lo]
                out[rt][b]["within_noise"] = c["verdict"] == "no difference"
    out["batch_sizes"] = [int(b) for b in baseline["latency"]["torch"]]
    return out


def compress(model: SlimModel, data: DataBundle | None, recipe: Any, out: str | Path, *,
             overwrite: bool = False, resume: bool = False, keep_checkpoints: bool = False,
             progress: bool = True, log: Any = print, track: str | None = None,
             ) -> dict[str, Any]:
    """Run a recipe end to end and write the artifact, the ONNX file and the report.

    The input model is never modified. Checkpoints after every stage (in
    ``OUT/.slimkit-run``) let an interrupted run continue with ``resume=True``, bit for bit as
    if it had not stopped (at the same thread count); they are removed once the run has
    succeeded, unless ``keep_checkpoints=True``: they can outweigh the model several times,
    and a finished run has nothing left to resume. The artifact and report are written also
    when the target is missed (that is a success). The output is locked while the run lasts.
    ``overwrite=True`` builds the new run beside the old output and replaces it only when the
    run succeeds: a failed run leaves it as it was.

    ``track="tensorboard"`` logs every training step, stage record and final metric to
    ``OUT/tensorboard`` as the run goes (see :mod:`slimkit.core.tracking`).

    Returns:
        The report dict (also written as ``OUT/report.json`` and ``OUT/report.html``).

    Raises:
        OutputExistsError: the output exists (without ``overwrite``/``resume``), holds files
            slimkit did not write, or another run is writing it.
        ResumeError, ConfigError, DataError, ModelError, ExportError.
    """
    recipe_dict = recipe_to_dict(recipe)
    tracking.check_kind(track)
    check_fits(model, data)
    check_target(recipe.target, data)
    out = Path(out)
    rank = world()[0]
    baseline = model.copy()
    with output_lock(out, log) if rank == 0 else contextlib.nullcontext(), \
            progress_mode(progress):
        if rank == 0:
            paths, state = prepare_out(
                out, lambda threads: fingerprint(model, data, recipe_dict, threads), overwrite,
                resume, model.source or model.name, log)
        else:
            progress, log = False, (lambda s: None)
        try:
            if rank == 0 and "baseline" not in state:
                ckpt = save_artifact(baseline, paths.checkpoint(-1), overwrite=True)
                state["baseline"] = _measure_checkpoint(baseline, data, ckpt, layers=True)
                write_json(paths.run / STATE, state)
            barrier()
            if rank != 0:  # rank 0 made the run directory: a staging sibling or --out itself
                new = sibling(out, "new")
                paths = RunPaths(out, new if new.is_dir() else None)
                state = json.loads((paths.run / STATE).read_text())
            with tracking.tracking(track if rank == 0 else None, paths.work):
                report = _compress(model, baseline, data, recipe, recipe_dict, paths, state,
                                   progress, log)
            if rank == 0 and not keep_checkpoints:  # measured and reported: no longer needed
                remove_checkpoints(paths, log)
        except BaseException:
            if rank == 0 and paths.staged:
                shutil.rmtree(paths.work, ignore_errors=True)
                log(f"'{out}' keeps its previous output: the --overwrite run failed")
            raise
        if rank == 0 and paths.staged:
            replace_dir(paths.work, out.resolve(), sibling(out, "old"))
    return report


def _compress(model: SlimModel, baseline: SlimModel, data: DataBundle | None, recipe: Any,
              recipe_dict: dict, paths: RunPaths, state: dict, progress: bool,
              log: Any) -> dict[str, Any]:
    """The run after the baseline checkpoint, writing into ``paths.work``; the report names
    the files in ``paths.out``, where they end up."""
    from slimkit.report import write_report

    ctx = StageContext(data=data, teacher=baseline, seed=recipe.seed, progress=progress, log=log,
                       hide_test=True,  # stages never see the test split
                       extras={"target": recipe.target})  # early_exit calibrates to it
    stage_models = _run_stages(baseline.copy(), data, recipe, paths, state, ctx)
    if world()[0] != 0:  # measurement and export are rank 0's: others would skew the timings
        return {}
    final = stage_models[-1] if stage_models else baseline.copy()
    final.recipe = recipe_dict
    log("exporting ONNX and measuring baseline and final in one run ...")
    final_dir = save_artifact(final, paths.work / "model", overwrite=True)
    errors: dict[str, str] = {}
    with step("ONNX export", total=len(stage_models[:-1]) + 2, unit="models") as shown:
        export = shown.counted(_export)
        models = {"baseline": (baseline, export(baseline, paths.run / "baseline.onnx", errors,
                                                "baseline"))}
        for i, m in enumerate(stage_models[:-1]):
            models[f"stage-{i}"] = (m, export(m, paths.run / f"stage-{i:02d}.onnx", errors,
                                              f"stage-{i}"))
        models["final"] = (final, export(final, paths.work / "model.onnx", errors, "final"))
    exits = _export_exits(final, data, paths, recipe.measure.parity_atol, errors, log)
    for label, err in errors.items():
        log(f"ONNX export of {label} failed: {err}")
    latency, parity, changes = _compare(models, data, recipe, progress)
    _flag_slower(state["stages"], changes, recipe.target.min_speedup.runtime
                 if recipe.target.min_speedup else "onnxruntime", log,
                 _explainer(models, data, recipe.measure.threads))
    base_m = {**state["baseline"], "latency": latency["baseline"],
              "onnx_size_bytes": _size(models["baseline"][1])}
    final_m = {**measure_static(final, data, layers=True, reference=baseline.module,
                                split="val"),
               "size_bytes": model_bytes(final_dir),
               "latency": latency["final"], "onnx_size_bytes": _size(models["final"][1])}
    for i, st in enumerate(state["stages"]):
        st["measure"]["latency"] = latency.get(f"stage-{i}", latency["final"])
    test = final_test(baseline, final, data) if data is not None else None
    if test is not None:  # the one read of the test split, after the last stage
        base_m, final_m = with_test(base_m, test["baseline"]), with_test(final_m, test["final"])
    comparison = _comparison(base_m, final_m, changes["overall"])
    report = {
        "slimkit_version": library_versions()["slimkit"],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": model.describe(), "data": _describe_data(data), "recipe": recipe_dict,
        "target": recipe_dict["target"],
        "verdict": judge(recipe.target, base_m, final_m, comparison, errors.get("final"),
                         parity, task=data.task if data is not None else None),
        "baseline": base_m, "final": final_m, "stages": state["stages"],
        "comparison": comparison, "parity": parity,
        "fidelity": test["fidelity"] if test is not None else None,
        "test_split": test["record"] if test is not None else None,
        "environment": environment(recipe.measure.threads),
        "outputs": {"artifact": str(paths.out / "model"),
                    "onnx": str(paths.out / "model.onnx") if models["final"][1] else None,
                    **({"exits": str(paths.out / EXITS)} if exits else {})},
        "export_errors": errors,
    }
    if exits:
        report["exit_parity"] = exits
    for name in ("baseline", "final", "comparison"):
        tracking.log_scalars(name, report[name])
    tracking.log_scalars("verdict", {"met": int(report["verdict"]["met"])})
    write_report(report, paths.work)
    return report


def _export_exits(final: SlimModel, data: DataBundle | None, paths: RunPaths, atol: float,
                  errors: dict[str, str], log: Any) -> dict[str, Any] | None:
    """An early-exit model also ships as the chain that really stops in ONNX Runtime
    (``OUT/exits``: one ONNX file per step, the steps nested under ``If`` nodes as
    ``early_exit.onnx``, and the runner), checked against PyTorch exit by exit and sample by
    sample; ``model.onnx`` computes every exit and picks, so it saves nothing."""
    from slimkit.exit.model import EarlyExitModel

    if not isinstance(final.module, EarlyExitModel):
        return None
    from slimkit.exit.onnx import check_exit_parity, export_exit_onnx

    try:
        folder = export_exit_onnx(final, paths.work / EXITS, overwrite=True)
        sample = data.example_inputs(8) if data is not None else final.example_inputs(8)
        parity = check_exit_parity(final, folder, sample, atol=atol)
    except SlimkitError as exc:
        errors["exits"] = str(exc)
        log(f"ONNX export of the early-exit chain failed: {exc}")
        return None
    if not parity["ok"]:
        log(f"the early-exit chain differs from PyTorch (max |diff| "
            f"{max(parity['max_abs_diff'], parity['graph_max_abs_diff']):.2e}, same exits: "
            f"{parity['same_exits'] and parity['graph_same_exits']})")
    return parity


def _size(path: Path | None) -> int | None:
    return None if path is None else path.stat().st_size


def _describe_data(data: DataBundle | None) -> dict | None:
    if data is None:
        return None
    meta = data.meta or {}
    return {"name": data.name, "n_train": data.n_train or meta.get("n_train"),
            "n_test": data.n_test or meta.get("n_test"),
            "input_shape": list(data.input_shape), "num_classes": data.num_classes,
            "task": data.task, "streaming": data.streaming,
            "warnings": meta.get("warnings", []) if data.streaming else data_warnings(data)}
