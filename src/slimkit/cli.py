"""The ``slimkit`` command line: a thin typer layer over the public Python API."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from slimkit.core.errors import ConfigError, DataError, ModelLoadError, SlimkitError
from slimkit.core.files import ensure_absent


class _ShowsFlagsAsFlags:
    """typer's rich help gives every option a value placeholder, flags too (``--overwrite
    <bool>``), though a flag takes no value; a blank metavar shows it as it is typed."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        for param in self.get_params(ctx):  # type: ignore[attr-defined]
            if getattr(param, "is_flag", False):
                param.metavar = ""
        super().format_help(ctx, formatter)  # type: ignore[misc]


class _Command(_ShowsFlagsAsFlags, TyperCommand):
    pass


class _Group(_ShowsFlagsAsFlags, TyperGroup):
    pass


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False,
                  help="Make trained PyTorch models smaller and faster, and prove it.")
out_console = Console()
err_console = Console(stderr=True)

ModelArg = Annotated[str, typer.Argument(
    help="Artifact directory, .pt2 export, Hugging Face directory, .onnx file, or zoo:NAME.")]
DataOpt = Annotated[str | None, typer.Option(
    "--data", help="builtin:mnist|digits|mnist1d, an .npz, a .jsonl/.csv text file, an image "
                   "folder, or an HF dataset (save_to_disk). Text and image folders stream.")]
TextColumnOpt = Annotated[str | None, typer.Option(
    "--text-column", help="Text data: the column holding the text, tokenized with the model's "
                          "own tokenizer (default: text).", rich_help_panel="Data")]
LabelColumnOpt = Annotated[str | None, typer.Option(
    "--label-column", help="Text data, HF datasets: the column of class labels (default: "
                           "label, labels or y when present).", rich_help_panel="Data")]
MaxLengthOpt = Annotated[int | None, typer.Option(
    "--max-length", min=1, help="Text data: the most tokens per row (default: the model's "
                                "maximum).", rich_help_panel="Data")]
TruncateOpt = Annotated[bool, typer.Option(
    "--truncate/--no-truncate", help="Text data: truncate rows longer than the maximum (a "
                                     "warning counts them), or refuse them.",
    rich_help_panel="Data")]
ImageSizeOpt = Annotated[int | None, typer.Option(
    "--image-size", min=1, help="Image folders: resize the shorter side to this, then "
                                "center-crop to the model's input size (default: the model's "
                                "size).", rich_help_panel="Data")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
TrustOpt = Annotated[bool, typer.Option(
    "--trust-pickle", help="Allow loading pickled files (runs code from the file!).")]
#: ``compress``'s exit code when the run finished but missed its target (errors exit 2).
TARGET_MISSED = 3

RemoteCodeOpt = Annotated[bool, typer.Option(
    "--trust-remote-code",
    help="Allow a Hugging Face model's own Python code (config auto_map; runs code from the "
         "directory!).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
ThreadsOpt = Annotated[int, typer.Option("--threads", min=1, help="Intra-op threads.")]
SeedOpt = Annotated[int, typer.Option(
    "--seed", min=0, max=2**63 - 1,
    help="Seed for data splits, training and a zoo model's initial weights.")]


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
          ) -> None:
    """Global options."""


def _count(n: int, noun: str) -> str:
    """``1 thread``, ``4 threads``."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _emit(obj: Any, as_json: bool) -> bool:
    if as_json:
        sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    return as_json


def _warn_data(bundle: Any) -> None:
    """Show why the data cannot support an accuracy claim (also kept in ``bundle.meta``)."""
    for line in bundle.meta.get("warnings", []):
        err_console.print("[bold yellow]warning:[/]", escape(line), highlight=False,
                          soft_wrap=True)


@contextlib.contextmanager
def _drawn_from(seed: int, fixed: bool) -> Iterator[None]:
    """With ``fixed``, random draws inside come from ``seed`` (torch's own state left as it
    was): a zoo model's initial weights are then the same in every process for one --seed,
    which is what lets ``compress zoo:NAME --resume`` recognise its own run."""
    if not fixed:
        yield
        return
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _culprit(error: type[SlimkitError], what: str) -> Iterator[None]:
    """Turn an error slimkit did not foresee into one naming ``what`` it was reading."""
    try:
        yield
    except SlimkitError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            UnicodeError, RecursionError, EOFError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise error(f"cannot read {what}: {type(exc).__name__}: {first}; is it damaged or of "
                    "another kind? (slimkit --debug shows the traceback)") from exc


def _check_out(out: Path, writes: Literal["file", "folder"]) -> None:
    """Refuse an ``--out`` that cannot hold what the command writes, before any work."""
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"--out '{out}': '{parent}' is a file, so nothing can be written "
                          "under it; choose another --out")
    if not out.exists():
        return
    if writes == "folder" and not out.is_dir():
        raise ConfigError(f"--out '{out}' is a file, but this command writes a folder there; "
                          "choose another --out (slimkit replaces only outputs it wrote)")
    if writes == "file" and out.is_dir():
        raise ConfigError(f"--out '{out}' is a folder, but this command writes one file; give "
                          "a file path inside it instead")
    if writes == "file" and not out.is_file():
        raise ConfigError(f"--out '{out}' is not a regular file (a device, pipe or socket?); "
                          "choose another --out")


def _data_options(text_column: str | None = None, label_column: str | None = None,
                  max_length: int | None = None, truncate: bool = True,
                  image_size: int | None = None) -> Any:
    """The data options as the loader takes them (torch-free)."""
    from slimkit.data.load import DataOptions

    return DataOptions(text_column=text_column, label_column=label_column,
                       max_length=max_length, truncate=truncate, image_size=image_size)


def _check_inputs(model: str | None, data: str | None, allow_onnx: bool = True,
                  trust_pickle: bool = False, options: Any = None) -> None:
    """Refuse a model or data argument that names nothing loadable, from the paths alone:
    before torch is imported (seconds on a cold start), so a typo is reported at once. Text
    data is checked too: its columns, that it has rows, and the model's tokenizer files."""
    from slimkit.data.load import check_data_options, check_data_spec
    from slimkit.io.model_path import model_format

    if model is not None:
        model_format(model, allow_onnx=allow_onnx, trust_pickle=trust_pickle)
    if data is not None:
        spec = check_data_spec(data)
        with _culprit(DataError, f"data '{data}'"):
            model_dir = Path(model) if model is not None and Path(model).is_dir() else None
            check_data_options(spec, options, model, model_dir)


def _load_data(data: str, seed: int, trust_pickle: bool = False, options: Any = None,
               hints: Any = None, stream: bool = True) -> Any:
    """Load ``data``; image folders and text stream (memory bounded by the batch) unless
    ``stream`` is False."""
    from slimkit.data import load_data

    with _culprit(DataError, f"data '{data}'"):
        bundle = load_data(data, seed=seed, trust_pickle=trust_pickle, options=options,
                           hints=hints, stream=stream)
    _warn_data(bundle)
    return bundle


def _load(model: str, data: str | None, seed: int, trust_pickle: bool, allow_onnx: bool = True,
          trust_remote_code: bool = False, options: Any = None):
    """The model and the data. A model that is fitted to the data (zoo:NAME, a pickled
    module) loads after it, from data in memory (as ``train`` fits one); any other loads
    first, so that the data, streamed, can take its tokenizer, input size, normalization and
    class names (:func:`slimkit.data.load.model_hints`)."""
    from slimkit.data.load import model_hints
    from slimkit.io.loader import load_model
    from slimkit.io.model_path import model_format
    from slimkit.io.onnx_model import OnnxModel
    from slimkit.measure import check_fits

    kind = model_format(model, allow_onnx=allow_onnx, trust_pickle=trust_pickle)
    fitted = kind in ("zoo", "pickle")
    bundle = _load_data(data, seed, trust_pickle, options, stream=False) \
        if data and fitted else None
    with _culprit(ModelLoadError, f"model '{model}'"), _drawn_from(seed, kind == "zoo"):
        m = load_model(model, data=bundle, trust_pickle=trust_pickle, allow_onnx=allow_onnx,
                       trust_remote_code=trust_remote_code)
    if data and not fitted:
        bundle = _load_data(data, seed, trust_pickle, options, hints=model_hints(m, model))
    if bundle is not None and not isinstance(m, OnnxModel):
        check_fits(m, bundle)
    elif bundle is not None and tuple(bundle.input_shape) != tuple(m.input_shape):
        raise DataError(f"data '{bundle.name}' gives samples of shape {bundle.input_shape} "
                        f"but '{model}' takes {tuple(m.input_shape)}")
    return m, bundle


@app.command(cls=_Command)
def inspect(model: ModelArg, data: DataOpt = None, as_json: JsonOpt = False,
            trust_pickle: TrustOpt = False,
            trust_remote_code: RemoteCodeOpt = False, seed: SeedOpt = 0,
            text_column: TextColumnOpt = None, label_column: LabelColumnOpt = None,
            max_length: MaxLengthOpt = None, truncate: TruncateOpt = True,
            image_size: ImageSizeOpt = None) -> None:
    """Params, non-zero params, MACs per layer, size on disk and history of a model."""
    opts = _data_options(text_column, label_column, max_length, truncate, image_size)
    _check_inputs(model, data, trust_pickle=trust_pickle, options=opts)
    from slimkit.core.files import dir_size
    from slimkit.io.onnx_model import OnnxModel
    from slimkit.measure import measure_static

    m, bundle = _load(model, data, seed, trust_pickle,
                      trust_remote_code=trust_remote_code, options=opts)
    path = Path(model)
    info: dict[str, Any] = {"model": model, "input_shape": list(m.input_shape),
                            "input_dtype": m.input_dtype,
                            "size_bytes": dir_size(path) if path.exists() else None}
    if isinstance(m, OnnxModel):
        from slimkit.measure.onnx_stats import onnx_stats

        info.update(onnx_stats(m.path))
    else:
        info.update(measure_static(m, bundle, layers=True))
        info["history"] = m.history
    if _emit(info, as_json):
        return
    from slimkit.cli_views import human_bytes, layer_rows

    if "layers" in info:
        out_console.print(layer_rows(info["layers"]))
    for key in ("params", "nonzero_params", "macs", "flops", "peak_memory_bytes", "ops"):
        if key in info:
            out_console.print(f"{key}: {info[key]:,}" if isinstance(info[key], int)
                              else f"{key}: {info[key]}")
    out_console.print(f"input: {info['input_dtype']} {tuple(info['input_shape'])}; "
                      f"size on disk: {human_bytes(info['size_bytes'])}")


@app.command(cls=_Command)
def bench(model: ModelArg, data: DataOpt = None,
          batch: Annotated[list[int], typer.Option(
              "--batch", min=1, max=1 << 16, help="Batch sizes.")] = [1, 32],  # noqa: B006
          threads: ThreadsOpt = 1,
          repeats: Annotated[int, typer.Option(min=1)] = 30,
          as_json: JsonOpt = False, trust_pickle: TrustOpt = False,
          trust_remote_code: RemoteCodeOpt = False, seed: SeedOpt = 0,
          text_column: TextColumnOpt = None, label_column: LabelColumnOpt = None,
          max_length: MaxLengthOpt = None, truncate: TruncateOpt = True,
          image_size: ImageSizeOpt = None) -> None:
    """Latency (median, p90) in PyTorch eager and ONNX Runtime at fixed threads."""
    opts = _data_options(text_column, label_column, max_length, truncate, image_size)
    _check_inputs(model, data, trust_pickle=trust_pickle, options=opts)
    from slimkit.export.onnx import export_onnx
    from slimkit.io.onnx_model import OnnxModel
    from slimkit.measure import time_interleaved
    from slimkit.measure.latency import _take, compare_latency, ort_runner, ort_session

    m, bundle = _load(model, data, seed, trust_pickle,
                      trust_remote_code=trust_remote_code, options=opts)
    sample = bundle.head("test", max(batch))[0] if bundle else m.example_inputs(max(batch))[0]
    if isinstance(m, OnnxModel):
        sess = ort_session(m.path, threads)
        result = {"threads": threads, "onnxruntime": {
            str(b): time_interleaved({"model": ort_runner(sess, [_take(sample, b)])},
                                     3, repeats) for b in batch}}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = export_onnx(m, Path(tmp) / "model.onnx")
            result = compare_latency({"model": (m.module, onnx_path)}, (sample,), batch,
                                     threads=threads, repeats=repeats, progress=not as_json)
    if _emit(result, as_json):
        return
    for rt in ("torch", "onnxruntime"):
        for b, r in result.get(rt, {}).items():
            s = r["model"]
            out_console.print(f"{rt:12s} batch {b:>4}: median {s['median_ms']:.3f} ms, "
                              f"p90 {s['p90_ms']:.3f} ms ({_count(threads, 'thread')})")


@app.command(cls=_Command, name="eval")
def evaluate(model: ModelArg, data: Annotated[str, typer.Option("--data", help="Dataset.")],
             as_json: JsonOpt = False, trust_pickle: TrustOpt = False,
             trust_remote_code: RemoteCodeOpt = False,
             seed: SeedOpt = 0, text_column: TextColumnOpt = None,
             label_column: LabelColumnOpt = None, max_length: MaxLengthOpt = None,
             truncate: TruncateOpt = True, image_size: ImageSizeOpt = None) -> None:
    """Top-1 / top-5 accuracy on the test split of a dataset (the task's metrics for text
    data of other tasks: perplexity, embedding agreement)."""
    opts = _data_options(text_column, label_column, max_length, truncate, image_size)
    _check_inputs(model, data, trust_pickle=trust_pickle, options=opts)
    m, bundle = _load(model, data, seed, trust_pickle,
                      trust_remote_code=trust_remote_code, options=opts)
    result = {"model": model, "data": bundle.name, **_evaluate(m, bundle)}
    if _emit(result, as_json):
        return
    if "top1" in result:
        out_console.print(f"top-1 {result['top1']:.2%}, top-5 {result['top5']:.2%} "
                          f"on {result['n_test']} test samples of {bundle.name}")
    else:
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in result["metrics"].items())
        out_console.print(f"{bundle.task}: {metrics} on the test split of {bundle.name}")


def _evaluate(m: Any, data: Any) -> dict:
    """Top-1/top-5 of a classifier on the test split, in memory or batch by batch; the
    task's metrics for a stream of another task."""
    from slimkit.io.onnx_model import OnnxModel
    from slimkit.measure import accuracy, predict

    fn = m if isinstance(m, OnnxModel) else m.module
    if not data.streaming:
        return {"n_test": data.n_test, **accuracy(predict(fn, data.x_test), data.y_test)}
    if data.task != "classification":
        if isinstance(m, OnnxModel):
            raise ConfigError(f"eval of an ONNX model measures classification only; data "
                              f"'{data.name}' is for {data.task} (evaluate the PyTorch model)")
        from slimkit.measure.tasks import get_task

        return {"task": data.task, "metrics": get_task(data.task).evaluate(
            fn, lambda: data.batches("test"))}
    hits = {"top1": 0.0, "top5": 0.0}
    n = 0
    for x, y in data.batches("test"):
        for key, value in accuracy(predict(fn, x), y).items():
            hits[key] += value * len(y)
        n += len(y)
    return {"n_test": n, **{k: v / n for k, v in hits.items()}}


@app.command(cls=_Command)
def train(model: Annotated[str, typer.Argument(help="zoo:NAME to train from scratch.")],
          data: Annotated[str, typer.Option("--data", help="Dataset.")],
          out: Annotated[Path, typer.Option("--out", help="Artifact directory to write.")],
          epochs: Annotated[int, typer.Option(min=0)] = 3,
          lr: Annotated[float, typer.Option(min=0)] = 1e-3,
          batch_size: Annotated[int, typer.Option(min=1)] = 64,
          overwrite: OverwriteOpt = False, seed: SeedOpt = 0, as_json: JsonOpt = False) -> None:
    """Train a zoo model on a dataset and write a slimkit artifact."""
    from pydantic import ValidationError

    from slimkit.core.config import format_validation_error
    from slimkit.train.config import TrainConfig

    if not model.startswith("zoo:"):
        raise ConfigError(f"train: '{model}' is not a zoo model; use zoo:NAME "
                          "(fine-tuning a loaded model happens inside compress stages)")
    try:
        cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    except ValidationError as err:
        raise format_validation_error(err, "training options", TrainConfig) from None
    _check_out(out, "folder")
    ensure_absent(out, overwrite)
    _check_inputs(model, data)
    from slimkit.api import train_zoo  # torch: after every check that needs none

    bundle = _load_data(data, seed, stream=False)  # a zoo model is fitted to data in memory
    _, hist = train_zoo(model.removeprefix("zoo:"), bundle, cfg, out, overwrite=overwrite,
                        progress=not as_json)
    result = {"out": str(out), "epochs": hist["epochs"]}
    if not _emit(result, as_json):
        last = hist["epochs"][-1] if hist["epochs"] else None
        acc = f", test top-1 {last['test_top1']:.2%}" if last else ""
        out_console.print(f"wrote {out}{acc}")


@app.command(cls=_Command)
def compress(model: ModelArg,
             recipe: Annotated[str, typer.Option("--recipe", help="Recipe YAML/JSON file.")],
             out: Annotated[Path, typer.Option("--out", help="Output directory.")],
             data: DataOpt = None, overwrite: OverwriteOpt = False,
             resume: Annotated[bool, typer.Option(
                 "--resume", help="Continue an interrupted run in --out.")] = False,
             keep_checkpoints: Annotated[bool, typer.Option(
                 "--keep-checkpoints",
                 help="Keep the per-stage checkpoints (--out/.slimkit-run) after the run "
                      "succeeded; by default they are removed then (an interrupted run keeps "
                      "them for --resume).")] = False,
             as_json: JsonOpt = False, trust_pickle: TrustOpt = False,
             trust_remote_code: RemoteCodeOpt = False,
             seed: SeedOpt = 0, text_column: TextColumnOpt = None,
             label_column: LabelColumnOpt = None, max_length: MaxLengthOpt = None,
             truncate: TruncateOpt = True, image_size: ImageSizeOpt = None,
             track: Annotated[str | None, typer.Option(
                 "--track", help="Log every training step, stage and final metric for "
                                 "TensorBoard in --out/tensorboard (tensorboard --logdir "
                                 "OUT).")] = None) -> None:
    """Apply a recipe, export ONNX, measure baseline and final in one run, write the report."""
    from slimkit.core.tracking import check_kind
    from slimkit.pipeline.outdir import check_out
    from slimkit.pipeline.recipe import check_data, load_recipe

    # Everything that needs no model is checked before torch loads (seconds on a cold start).
    _check_out(out, "folder")
    check_out(out, overwrite, resume, model)
    check_kind(track)
    opts = _data_options(text_column, label_column, max_length, truncate, image_size)
    _check_inputs(model, data, allow_onnx=False, trust_pickle=trust_pickle, options=opts)
    rec = load_recipe(recipe)
    check_data(rec, data is not None, f"recipe '{recipe}'")
    # The runner itself: the API's compress only wraps nn.Modules and reads recipes, both done
    # here, and takes no keep_checkpoints (yet).
    from slimkit.pipeline import compress as run

    m, bundle = _load(model, data, seed, trust_pickle, allow_onnx=False,
                      trust_remote_code=trust_remote_code, options=opts)
    log = (lambda s: err_console.print(s)) if as_json else out_console.print
    report = run(m, bundle, rec, out, overwrite=overwrite, resume=resume,
                 keep_checkpoints=keep_checkpoints, progress=not as_json, log=log, track=track)
    if report:  # empty on the non-zero ranks of a torchrun launch
        _print_report(report, out, as_json)
        if not report["verdict"]["met"]:
            raise typer.Exit(TARGET_MISSED)  # the outputs are written; CI can gate on this


def _print_report(report: dict, out: Path, as_json: bool) -> None:
    if _emit({"verdict": report["verdict"], "comparison": report["comparison"],
              "parity": report["parity"], "outputs": report["outputs"],
              "flags": [f for st in report.get("stages", []) for f in st.get("flags", [])],
              "report": str(out / "report.json")}, as_json):
        return
    from slimkit.cli_views import before_after, verdict_lines

    out_console.print(before_after(report))
    for line in verdict_lines(report):
        out_console.print(line)
    for stage in report.get("stages", []):  # a stage that made the target runtime slower
        for flag in stage.get("flags", []):
            out_console.print(f"[bold yellow]slower:[/] {escape(flag)}", soft_wrap=True)
    out_console.print(f"report: {out / 'report.html'}  artifact: {report['outputs']['artifact']}"
                      f"  onnx: {report['outputs']['onnx']}", soft_wrap=True)


@app.command(cls=_Command)
def search(model: ModelArg,
           recipe: Annotated[str, typer.Option(
               "--recipe", help="Recipe with a target: (and optionally a search: block); its "
                                "stages are the hand-written baseline.")],
           out: Annotated[Path, typer.Option("--out", help="Output directory (the SQLite "
                                                           "study lives here: rerun to resume).")],
           data: DataOpt = None,
           storage: Annotated[str | None, typer.Option(
               "--storage", help="Shared Optuna storage (postgresql://USER@HOST/DB) for "
                                 "several workers; default sqlite in --out.")] = None,
           study_name: Annotated[str, typer.Option("--study-name", help="Study name.")
                                 ] = "slimkit-search",
           worker: Annotated[bool, typer.Option(
               "--worker", help="Only run trials of the shared study (the process without "
                                "--worker writes the outputs).")] = False,
           trials: Annotated[int | None, typer.Option(
               "--trials", min=1, help="Trials in the study (default: search.trials).")] = None,
           require_target: Annotated[bool, typer.Option(
               "--require-target", help="Exit 2 when no candidate meets the target.")] = False,
           overwrite: OverwriteOpt = False, as_json: JsonOpt = False,
           trust_pickle: TrustOpt = False, trust_remote_code: RemoteCodeOpt = False,
           seed: SeedOpt = 0) -> None:
    """Search for the recipe that meets the target with the best metric (Optuna)."""
    from slimkit.search.cli import check_search_args, summary

    _check_out(out, "folder")
    rec = check_search_args(recipe, out, data, storage, worker)
    _check_inputs(model, data, allow_onnx=False, trust_pickle=trust_pickle)
    from slimkit.search.run import search as run  # torch: after every check that needs none

    m, bundle = _load(model, data, seed, trust_pickle, allow_onnx=False,
                      trust_remote_code=trust_remote_code, options=_data_options())
    log = (lambda s: err_console.print(s)) if as_json else out_console.print
    result = run(m, bundle, rec, out, storage=storage, study_name=study_name, worker=worker,
                 trials=trials, overwrite=overwrite, require_target=require_target, log=log)
    if not _emit({k: v for k, v in result.items() if k != "trials"}, as_json):
        for line in summary(result):
            out_console.print(escape(line), highlight=False, soft_wrap=True)


@app.command(cls=_Command)
def export(model: ModelArg,
           out: Annotated[Path, typer.Option("--out", help="ONNX file to write.")],
           overwrite: OverwriteOpt = False, trust_pickle: TrustOpt = False,
           trust_remote_code: RemoteCodeOpt = False,
           as_json: JsonOpt = False) -> None:
    """Export to ONNX and check ONNX Runtime against PyTorch."""
    _check_out(out, "file")
    ensure_absent(out, overwrite)
    _check_inputs(model, None, allow_onnx=False, trust_pickle=trust_pickle)
    from slimkit.export.onnx import export_checked  # torch: after every check that needs none

    m, _ = _load(model, None, 0, trust_pickle, allow_onnx=False,
                 trust_remote_code=trust_remote_code)
    result = export_checked(m, out, overwrite=overwrite)  # replaces out only after parity
    if not _emit(result, as_json):
        out_console.print(f"wrote {out} ({result['bytes']:,} bytes); ONNX Runtime vs "
                          f"PyTorch max |diff| {result['parity']['max_abs_diff']:.2e}")


@app.command(cls=_Command)
def pack(model: ModelArg,
         out: Annotated[Path, typer.Option("--out", help=".slim file to write.")],
         bits: Annotated[int | None, typer.Option(
             "--bits", min=1, max=8, help="Cluster bits for every layer (default conv 8, fc 5).")
         ] = None,
         data: DataOpt = None, overwrite: OverwriteOpt = False, as_json: JsonOpt = False) -> None:
    """Pack a model into a .slim file: shared weights, relative indices, entropy coding."""
    from slimkit.encode.cli import pack_command, pack_summary

    _check_out(out, "file")
    result = pack_command(model, out, bits, overwrite, data)
    if not _emit(result, as_json):
        for line in pack_summary(result):
            out_console.print(escape(line), highlight=False, soft_wrap=True)


@app.command(cls=_Command)
def unpack(path: Annotated[Path, typer.Argument(help="A .slim file.")],
           out: Annotated[Path, typer.Option("--out", help="Artifact directory to write.")],
           overwrite: OverwriteOpt = False, as_json: JsonOpt = False) -> None:
    """Unpack a .slim file into a slimkit artifact directory (checksums verified)."""
    from slimkit.encode.cli import unpack_command

    _check_out(out, "folder")
    result = unpack_command(path, out, overwrite)
    if not _emit(result, as_json):
        out_console.print(f"wrote {out}")


@app.command(cls=_Command)
def schema(out: Annotated[Path | None, typer.Option("--out", help="Write to a file.")] = None,
           overwrite: OverwriteOpt = False) -> None:
    """Print (or write) the recipe's JSON Schema."""
    from slimkit.core.files import write_json
    from slimkit.pipeline.recipe import recipe_schema

    if out is not None:
        _check_out(out, "file")
        ensure_absent(out, overwrite)
        write_json(out, recipe_schema())
        out_console.print(f"wrote {out}")
    else:
        sys.stdout.write(json.dumps(recipe_schema(), indent=2) + "\n")


@app.command(cls=_Command)
def compare(run_a: Annotated[Path, typer.Argument(help="A run directory (or its report.json).")],
            run_b: Annotated[Path, typer.Argument(help="Another run directory.")],
            time_them: Annotated[bool, typer.Option(
                "--time", help="Re-time both ONNX files interleaved in this process (a ratio "
                               "with a 95% interval).")] = False,
            batch: Annotated[int, typer.Option(min=1, help="Batch size for --time.")] = 32,
            threads: ThreadsOpt = 1,
            repeats: Annotated[int, typer.Option(min=5, help="Rounds for --time.")] = 30,
            as_json: JsonOpt = False) -> None:
    """Put two runs side by side: sizes, quality, latency, verdicts."""
    from slimkit.cli_views import compare_table
    from slimkit.report.compare import compare_runs, load_run, time_runs

    a, b = load_run(run_a), load_run(run_b)
    result = compare_runs(a, b)
    if time_them:
        result["timed"] = time_runs(a, b, batch=batch, threads=threads, repeats=repeats)
    if _emit(result, as_json):
        return
    out_console.print(compare_table(result))
    for note in result["notes"]:
        out_console.print(f"note: {escape(note)}", highlight=False)
    if "timed" in result:
        t = result["timed"]
        out_console.print(
            f"ONNX Runtime b={t['batch']}, {_count(t['threads'], 'thread')}, {t['repeats']} "
            f"interleaved rounds: A {t['a_ms']:.3f} ms, B {t['b_ms']:.3f} ms, B/A "
            f"{t['ratio_b_to_a']:.2f} [{t['ci'][0]:.2f}, {t['ci'][1]:.2f}]: {t['verdict']}")


@app.command(cls=_Command)
def demo(out: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path("demo-out"),
         overwrite: OverwriteOpt = False,
         epochs: Annotated[int, typer.Option(min=1, help="Baseline training epochs.")] = 6,
         as_json: JsonOpt = False) -> None:
    """Train LeNet-5 on real MNIST (built in), then structured pruning, distillation, INT8 and
    ONNX export, aiming at >= 3x faster in ONNX Runtime, >= 4x smaller, <= 1 point lost."""
    _check_out(out, "folder")
    ensure_absent(out, overwrite)  # fail before torch loads, and before training
    from slimkit.api import compress as run
    from slimkit.api import train_zoo
    from slimkit.data import load_data
    from slimkit.data.split import hold_out_validation
    from slimkit.pipeline.recipe import load_recipe
    from slimkit.train.loop import TrainConfig

    start = time.perf_counter()
    recipe_text = resources.files("slimkit").joinpath("recipes/demo.yaml").read_text()
    rec = load_recipe(recipe_text)
    # 10% of the training images held out: the baseline never trains on the validation
    # split that the stages make their choices on; the test split is read once, at the end.
    bundle = hold_out_validation(load_data("builtin:mnist", seed=0), 0.1, seed=0)
    log = (lambda s: err_console.print(s)) if as_json else out_console.print
    log(f"training zoo:lenet5 on {bundle.name} ({len(bundle.x_train)} train, "
        f"{bundle.n_val} validation, {len(bundle.x_test)} test) for {epochs} epochs ...")
    model, _ = train_zoo("lenet5", bundle, TrainConfig(epochs=epochs, lr=2e-3),
                         progress=not as_json)
    report = run(model, bundle, rec, out, overwrite=True, progress=not as_json, log=log)
    _print_report(report, out, as_json)
    log(f"demo finished in {time.perf_counter() - start:.0f} s")


#: Exit code of a run stopped with Ctrl-C (128 + SIGINT, as shells report it).
INTERRUPTED = 130


def _option(args: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in ``args`` (the last one)."""
    found = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            found = args[i + 1]
        elif a.startswith(name + "="):
            found = a.split("=", 1)[1]
    return found


def resume_hint(args: list[str]) -> str:
    """The one line Ctrl-C prints: for ``compress``, the exact command that resumes the run
    (its arguments, without ``--overwrite``, plus ``--resume``), or why there is none."""
    import shlex

    from slimkit.pipeline.outdir import RUN_DIR, STATE

    args = [a for a in args if a != "--debug"]
    if not args or args[0] != "compress":
        return "interrupted"
    out = _option(args, "--out")
    cmd = shlex.join(["slimkit", *[a for a in args if a not in ("--overwrite", "--resume")],
                      "--resume"])
    if out is not None and (Path(out) / RUN_DIR / STATE).is_file():
        return f"interrupted; resume with: {cmd}"
    again = shlex.join(["slimkit", *args])
    return (f"interrupted; nothing to resume in '{out}' (an --overwrite run keeps the previous "
            f"output and its own checkpoints only until it succeeds); start again with: {again}")


def _interrupted(args: list[str]) -> int:
    """Ctrl-C: one line on stderr (see :func:`resume_hint`) and exit code 130."""
    err_console.print(resume_hint(args), highlight=False, soft_wrap=True, markup=False)
    return INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    """Entry point: one clear line and exit code 2 for any SlimkitError."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        if "WORLD_SIZE" in os.environ:  # under torchrun: join the process group
            from slimkit.train.distributed import init_from_env

            init_from_env()  # (gloo on CPU, NCCL on GPU; a no-op for a world of one)
        try:
            code = app(args=args, prog_name="slimkit", standalone_mode=False)
        finally:
            if "torch" in sys.modules:  # no torch, no process group: --help and early errors
                from slimkit.train.distributed import shutdown

                shutdown()
        if code == INTERRUPTED:  # typer turns Ctrl-C (KeyboardInterrupt) into a silent 130
            return _interrupted(args)
        return code if isinstance(code, int) else 0  # --help returns its exit code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    except typer.Abort:  # click's own commands turn Ctrl-C into Abort
        return _interrupted(args)
    except typer.exceptions.TyperException as exc:  # usage errors: one line too, exit 2
        ctx = getattr(exc, "ctx", None)
        where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        err_console.print("[bold red]error:[/]", escape(message + where),
                          highlight=False, soft_wrap=True)
        return int(getattr(exc, "exit_code", 2))
    except SlimkitError as exc:
        if debug:
            raise
        err_console.print("[bold red]error:[/]", escape(" ".join(str(exc).split())),
                          highlight=False, soft_wrap=True)
        return exc.exit_code
    except Exception as exc:  # an error slimkit did not foresee: still one line, exit 2
        if debug:
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        err_console.print("[bold red]error:[/]", escape(f"{type(exc).__name__}: {first}"),
                          "(rerun with slimkit --debug for the traceback)",
                          highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        return _interrupted(args)


if __name__ == "__main__":
    sys.exit(main())
