"""Static INT8 PTQ of a CNN on Fashion-MNIST, run by ONNX Runtime's integer kernels.

Trains LeNet-5 (zoo) on ``builtin:fashion-mnist`` (54,000 train / 6,000 validation / 10,000
test; learning rate and epoch count chosen on validation, see :func:`train_on_validation`),
then quantizes it with slimkit's PTQ (BatchNorm folded, weights per-channel symmetric,
uint8 activations per tensor) and exports the QDQ ONNX file with int8 weight initializers.
LeNet-5's conv1 (1 input channel, 5x5: a reduction of 25) stays float by slimkit's
``min_conv_reduction`` rule; ``slimkit_int8_all_layers`` quantizes every layer.

Peers, on the same FP32 ONNX file and the same calibration samples (a class-stratified,
shuffled subset of the *training* split, seed 0), each run twice: with slimkit's exclusion
(conv1 float: ``*_same_exclusions``) and quantizing every layer (``*_all_layers``):

* ``onnxruntime.quantization.quantize_static`` (QDQ, per_channel=True, uint8 activations,
  int8 weights; calibrate_method and reduce_range chosen on validation);
* NNCF's ``nncf.quantize`` (ONNX backend on the FP32 ONNX model: the output is an ONNX model;
  its defaults), with ``ignored_scope`` = conv1 for the same-exclusions row.

Every choice (slimkit's calibration method, the peer's calibrate_method/reduce_range) is made
on the validation split; the test split is read once, at the end, for the chosen models.
Accuracies carry Wilson 95% intervals; differences are tested with exact McNemar (paired).
Speed: ``--rounds`` interleaved rounds in one process (all sessions round-robin, fixed thread
count); each speed-up is the median of paired per-call ratios with a ~95% order-statistic
interval (``slimkit.measure.latency.ratio_ci``) and the per-round medians beside it.

Criteria (slimkit issue 3, re-checked in issue 17):

* accuracy drop of the deployed INT8 model (ONNX Runtime) <= 0.3 points;
* the INT8 ONNX file >= 3.8x smaller than the FP32 one;
* ORT INT8 at batch 32 >= 1.3x faster than ORT FP32 (the interval's low end decides);
* slimkit at least as accurate and at least as fast as each peer (not worse beyond noise).

Training and every quantizer see the data through :func:`slimkit.data.guard.hide_test` (reading
the test split raises); the test split is read by :func:`test_accuracy` only. Prints JSON and
saves it to benchmarks/results/quant_cnn.json (``--quick``: a smoke run, not saved);
``--save-model DIR`` keeps the trained FP32 LeNet-5 (artifact + training record) for
``quant_qat.py --float-model DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import data_record, emit, settings_record  # noqa: I001

from slimkit.core.files import write_json
from slimkit.core.stages import StageContext
from slimkit.data import calibration_subset, load_data
from slimkit.data.guard import hide_test
from slimkit.export.onnx import check_parity, export_onnx
from slimkit.export.qdq import int8_ops
from slimkit.io import save_artifact
from slimkit.io.loader import load_zoo
from slimkit.io.model import SlimModel
from slimkit.measure.latency import ort_session, ratio_ci, time_interleaved
from slimkit.measure.stats import accuracy_ci, mcnemar
from slimkit.quant.ptq import PtqConfig, ptq
from slimkit.train.config import EarlyStopping
from slimkit.train.loop import TrainConfig, fit

RESULTS = Path(__file__).parent / "results" / "quant_cnn.json"
SLIMKIT_METHODS = ("minmax", "percentile", "mse")
ORT_METHODS = ("MinMax", "Percentile", "Entropy")
#: learning rates tried on validation (Adam, cosine schedule, batch 64)
LR_GRID = (1e-3, 2e-3, 4e-3, 8e-3)
#: LeNet-5's grid and epoch cap (quant_cnn, quant_qat): the committed run. A rerun with the
#: 8e-3 point and a 20-epoch cap (the cosine schedule then stays high when early stopping
#: ends it) reached 89.70% best validation top-1 against this run's 91.33%, so this run was
#: kept: a choice on validation.
LENET5_LRS = (1e-3, 2e-3, 4e-3)


def train_on_validation(build: Callable[[], SlimModel], dev: Any, max_epochs: int,
                        lrs: Sequence[float] = LR_GRID, probe_steps: int = 150,
                        patience: int = 2) -> tuple[SlimModel, dict[str, Any]]:
    """A model trained with its learning rate and epoch count chosen on the validation split.

    Each learning rate in ``lrs`` trains ``probe_steps`` steps (batch 64) from the same
    initialization (seed 0); the one with the best validation top-1 (the first on ties)
    trains the model for at most ``max_epochs`` epochs, stopping after ``patience`` epochs
    without a validation gain and ending with the best epoch's weights.

    Args:
        build: a fresh, untrained model (called after ``torch.manual_seed(0)``).
        dev: the data with its test split hidden (:func:`slimkit.data.guard.hide_test`).

    Returns:
        The trained model (eval mode) and a record of the grid, the chosen learning rate
        and the validation top-1 of every epoch.
    """
    probe = {}
    for lr in lrs:
        torch.manual_seed(0)
        m = build()
        hist = fit(m.module, dev, TrainConfig(max_steps=probe_steps, lr=lr, early_stopping=
                                              EarlyStopping(patience=1)), progress=False)
        probe[lr] = hist["epochs"][-1]["val_top1"]
    lr = max(probe, key=probe.get)
    torch.manual_seed(0)
    model = build()
    start = time.perf_counter()
    hist = fit(model.module, dev, TrainConfig(epochs=max_epochs, lr=lr, early_stopping=
                                              EarlyStopping(patience=patience,
                                                            restore_best=True)),
               progress=False)
    model.module.eval()
    val = [e["val_top1"] for e in hist["epochs"]]
    return model, {"optimizer": "adam, cosine schedule, batch 64, seed 0",
                   "lr_grid_validation_top1": {str(k): v for k, v in probe.items()},
                   "lr_probe_steps": probe_steps, "chosen_lr": lr, "max_epochs": max_epochs,
                   "patience": patience, "val_top1_per_epoch": val,
                   "chosen_epoch": val.index(max(val)) + 1, "epochs_run": len(val),
                   "train_seconds": time.perf_counter() - start}


def ort_correct(session: Any, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> np.ndarray:
    """Per-sample correctness (bool) of an ONNX Runtime session's top-1."""
    name = session.get_inputs()[0].name
    preds = [session.run(None, {name: x[i:i + batch].numpy()})[0].argmax(1)
             for i in range(0, len(x), batch)]
    return np.concatenate(preds) == y.numpy()


def conv1_nodes(fp32: Path) -> list[str]:
    """Names of the FP32 graph's nodes that belong to module ``conv1`` (slimkit's exclusion)."""
    import onnx

    return [n.name for n in onnx.load(str(fp32)).graph.node
            if n.name.split("/")[1:2] == ["conv1"]]


def ort_static(fp32: Path, out: Path, calib: torch.Tensor, method: str, reduce_range: bool,
               exclude: list[str]) -> Path:
    """onnxruntime.quantization.quantize_static: QDQ, per-channel, the given calibration data."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": calib[i:i + 64].numpy()}
                                 for i in range(0, len(calib), 64)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    with contextlib.redirect_stdout(sys.stderr):  # its progress lines; stdout is the JSON
        quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=reduce_range,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method),
                        nodes_to_exclude=exclude)
    return out


def nncf_quantize(fp32: Path, out: Path, calib: torch.Tensor, exclude: list[str]) -> Path:
    """``nncf.quantize`` (ONNX backend) of the FP32 ONNX model on the same calibration data."""
    import nncf
    import onnx

    for handler in logging.getLogger("nncf").handlers:  # its log lines; stdout is the JSON
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)
    # One sample per item: NNCF's subset_size counts items, and its statistics are per item.
    dataset = nncf.Dataset([{"input": calib[i:i + 1].numpy()} for i in range(len(calib))])
    scope = nncf.IgnoredScope(names=exclude) if exclude else None
    with contextlib.redirect_stdout(sys.stderr):
        q = nncf.quantize(onnx.load(str(fp32)), dataset, subset_size=len(calib),
                          **({"ignored_scope": scope} if scope else {}))
    onnx.save(q, str(out))
    return out


def nncf_status() -> dict[str, Any]:
    try:
        import nncf
    except Exception as err:  # noqa: BLE001 - any import failure means "no NNCF row"
        return {"installed": False, "reason": f"{type(err).__name__}: {err}"}
    return {"installed": True, "version": nncf.__version__}


def choose_slimkit(model: Any, data: Any, args: argparse.Namespace, tmp: Path
                   ) -> tuple[str, dict[str, float]]:
    """slimkit's calibration method with the best validation accuracy in ONNX Runtime."""
    ctx = StageContext(data=data, progress=False)
    val = {}
    for method in SLIMKIT_METHODS:
        q, _ = ptq(model, PtqConfig(calibration=method, num_samples=args.calib), ctx)
        sess = ort_session(export_onnx(q, tmp / f"val-slimkit-{method}.onnx"), args.threads)
        val[method] = float(ort_correct(sess, data.x_val, data.y_val).mean())
    return max(val, key=val.get), val


def choose_ort(fp32: Path, calib: torch.Tensor, data: Any, args: argparse.Namespace,
               tmp: Path, exclude: list[str], tag: str) -> tuple[dict[str, Any], dict]:
    """quantize_static's calibrate_method and reduce_range with the best validation accuracy."""
    val = {}
    for method in ORT_METHODS:
        for rr in (False, True):
            path = ort_static(fp32, tmp / f"val-{tag}-{method}-{rr}.onnx", calib, method, rr,
                              exclude)
            val[f"{method}/reduce_range={rr}"] = float(
                ort_correct(ort_session(path, args.threads), data.x_val, data.y_val).mean())
    best = max(val, key=val.get)
    method, rr = best.split("/reduce_range=")
    return {"calibrate_method": method, "reduce_range": rr == "True"}, val


def build(model: Any, data: Any, args: argparse.Namespace, tmp: Path
          ) -> tuple[dict[str, Path], dict[str, Any], Any, Any]:
    """Every model's ONNX file, with the configurations chosen on validation."""
    ctx = StageContext(data=data, progress=False)
    calib = calibration_subset(data, args.calib, seed=0)  # the samples slimkit calibrates on
    fp32 = export_onnx(model, tmp / "fp32.onnx")
    excl = conv1_nodes(fp32)
    method, slim_val = choose_slimkit(model, data, args, tmp)
    cfg = PtqConfig(calibration=method, num_samples=args.calib)
    qmodel, record = ptq(model, cfg, ctx)
    q_all, _ = ptq(model, cfg.model_copy(update={"min_conv_reduction": 0}), ctx)
    paths = {"fp32": fp32, "slimkit_int8": export_onnx(qmodel, tmp / "slimkit.onnx"),
             "slimkit_int8_all_layers": export_onnx(q_all, tmp / "slimkit_all.onnx")}
    configs: dict[str, Any] = {"slimkit": {"config": cfg.model_dump(), "validation_accuracy":
                                           slim_val, "excluded": [s["what"] for s in
                                                                  record.skipped]}}
    for tag, ex in (("same_exclusions", excl), ("all_layers", [])):
        chosen, val = choose_ort(fp32, calib, data, args, tmp, ex, tag)
        name = f"ort_quantize_static_{tag}"
        paths[name] = ort_static(fp32, tmp / f"{name}.onnx", calib, chosen["calibrate_method"],
                                 chosen["reduce_range"], ex)
        configs[name] = {"call": "quantize_static", "quant_format": "QDQ", "per_channel": True,
                         "activation_type": "QUInt8", "weight_type": "QInt8",
                         "nodes_to_exclude": ex, **chosen, "validation_accuracy": val}
    nn_ = nncf_status()
    configs["nncf"] = nn_
    if nn_["installed"]:
        for tag, ex in (("same_exclusions", excl), ("all_layers", [])):
            name = f"nncf_{tag}"
            start = time.perf_counter()
            paths[name] = nncf_quantize(fp32, tmp / f"{name}.onnx", calib, ex)
            configs[name] = {"call": "nncf.quantize on the FP32 ONNX model (ONNX backend; "
                                     "defaults: no preset, target_device or model_type given)",
                             "subset_size": len(calib), "ignored_scope": ex,
                             "seconds": time.perf_counter() - start}
    return paths, configs, qmodel, record


def speed(paths: dict[str, Path], x: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """Speed-ups vs FP32 (and slimkit vs each peer) over interleaved rounds, with intervals."""
    sessions = {k: ort_session(p, args.threads) for k, p in paths.items()}
    fns = {k: (lambda s=s: s.run(None, {"input": x})) for k, s in sessions.items()}
    rounds = [time_interleaved(fns, warmup=10, repeats=args.repeats, keep_samples=True)
              for _ in range(args.rounds)]
    samples = {k: [t for r in rounds for t in r[k]["samples_ms"]] for k in fns}
    out = {}
    for k in fns:
        med, lo, hi = ratio_ci(samples["fp32"], samples[k])  # fp32 / k: > 1 is faster
        out[k] = {"median_ms": float(np.median(samples[k])),
                  "speedup_vs_fp32": med, "speedup_ci95": [lo, hi],
                  "speedup_per_round": [r["fp32"]["median_ms"] / r[k]["median_ms"]
                                        for r in rounds],
                  "differs_from_fp32": lo > 1 or hi < 1}
    for k in fns:
        if k.startswith(("ort_", "nncf_")):
            med, lo, hi = ratio_ci(samples[k], samples["slimkit_int8"])  # peer / slimkit
            out[k]["slimkit_speedup_vs_this"] = {"median": med, "ci95": [lo, hi],
                                                 "differs": lo > 1 or hi < 1}
    return {"batch": args.batch, "threads": args.threads, "rounds": args.rounds,
            "repeats_per_round": args.repeats, "paired_calls": len(samples["fp32"]),
            "interval": "order-statistic ~95% CI of the median paired ratio", "models": out}


def test_accuracy(paths: dict[str, Path], data: Any, args: argparse.Namespace
                  ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read once, at the end: every chosen model's test accuracy with its Wilson interval."""
    hits = {k: ort_correct(ort_session(p, args.threads), data.x_test, data.y_test)
            for k, p in paths.items()}
    acc = {k: accuracy_ci(int(h.sum()), len(h)) | {
        "drop_points_vs_fp32": 100 * (hits["fp32"].mean() - h.mean()),
        "vs_fp32": mcnemar(hits["fp32"], h)} for k, h in hits.items()}
    for k, h in hits.items():
        if k.startswith(("ort_", "nncf_")):
            acc[k]["slimkit_vs_this"] = mcnemar(hits["slimkit_int8"], h)
    return acc, hits


def criteria(acc: dict, spd: dict, size: dict) -> dict[str, Any]:
    s, peers = spd["models"]["slimkit_int8"], [k for k in acc if k.startswith(("ort_", "nncf_"))]
    out: dict[str, Any] = {
        "accuracy_drop_le_0.3": {"met": bool(acc["slimkit_int8"]["drop_points_vs_fp32"] <= 0.3),
                                 "drop_points": acc["slimkit_int8"]["drop_points_vs_fp32"],
                                 "drop_beyond_noise": acc["slimkit_int8"]["vs_fp32"]["differs"]},
        "onnx_size_ratio_ge_3.8": {"met": size["fp32"] / size["slimkit_int8"] >= 3.8,
                                   "ratio": size["fp32"] / size["slimkit_int8"]},
        "ort_speedup_ge_1.3_at_batch": {"met": s["speedup_ci95"][0] >= 1.3,
                                        "speedup": s["speedup_vs_fp32"],
                                        "ci95": s["speedup_ci95"],
                                        "faster_than_fp32_beyond_noise": s["speedup_ci95"][0] > 1},
    }
    for k in peers:
        a = acc[k]["slimkit_vs_this"]
        v = spd["models"][k]["slimkit_speedup_vs_this"]
        out[f"as_accurate_as_{k}"] = {"met": not (a["differs"] and a["accuracy_difference"] < 0),
                                      "difference": a["accuracy_difference"],
                                      "beyond_noise": a["differs"], "p_value": a["p_value"]}
        out[f"as_fast_as_{k}"] = {"met": v["ci95"][1] >= 1.0, "slimkit_speedup": v["median"],
                                  "ci95": v["ci95"], "beyond_noise": v["differs"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=5,
                    help="most training epochs (the best on validation is kept)")
    ap.add_argument("--train-threads", type=int, default=2,
                    help="threads for training and calibration (timing uses --threads)")
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=60, help="timed calls per model per round")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 epoch on 5,000 images, 3x20 calls")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--save-model", type=Path, default=None,
                    help="keep the trained FP32 model there (for quant_qat.py --float-model)")
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.rounds, args.repeats, args.no_save = 1, 3, 20, True
    torch.set_num_threads(args.train_threads)
    data = load_data("builtin:fashion-mnist")
    if args.quick:  # smoke run: train on a stratified 5,000-image subset
        import dataclasses

        from slimkit.data.split import calibration_indices

        idx = calibration_indices(data, 5000, seed=0)
        data = dataclasses.replace(data, x_train=data.x_train[idx], y_train=data.y_train[idx])
    dev = hide_test(data)  # training, calibration and every choice: no test split
    model, trained = train_on_validation(lambda: load_zoo("lenet5", dev), dev, args.epochs,
                                         LENET5_LRS, probe_steps=30 if args.quick else 150)
    if args.save_model is not None:
        save_artifact(model, args.save_model, overwrite=True)
        write_json(args.save_model / "train_record.json", trained)
    with tempfile.TemporaryDirectory() as tmp:
        paths, configs, qmodel, record = build(model, dev, args, Path(tmp))
        torch.set_num_threads(args.threads)
        x = data.x_val[: args.batch].numpy()  # timing input
        spd = speed(paths, x, args)
        size = {k: p.stat().st_size for k, p in paths.items()}
        ops = {k: int8_ops(p, args.threads) for k, p in paths.items() if k != "fp32"}
        acc, hits = test_accuracy(paths, data, args)
        par = check_parity(qmodel, paths["slimkit_int8"], (data.x_val[:1000],))
    with torch.no_grad():
        sim = qmodel.module(data.x_test).argmax(1).numpy() == data.y_test.numpy()
    result = {
        "benchmark": "quant_cnn", "model": "zoo:lenet5",
        "data": data_record(data, calibration=f"{args.calib} class-stratified, shuffled "
                            "training samples (seed 0), the same for every quantizer",
                            choices="on the validation split; test read once at the end"),
        "seeds": {"torch": 0, "calibration": 0, "validation_split": 0},
        "training": trained,
        "settings": settings_record(args),
        "ort_version": __import__("onnxruntime").__version__,
        "peer_configs": configs, "accuracy_test": acc, "speed": spd,
        "onnx_bytes": size, "onnx_size_ratio": {k: size["fp32"] / v for k, v in size.items()},
        "ort_ops": ops,
        "parity": par | {"torch_vs_ort_correct_agreement":
                         float((sim == hits["slimkit_int8"]).mean())},
        "slimkit_layers": record.details["layers"], "slimkit_skipped": record.skipped,
    }
    result["criteria"] = criteria(acc, spd, size)
    result["met"] = all(c["met"] for c in result["criteria"].values())
    emit(result)
    if not args.no_save:
        write_json(RESULTS, result)


if __name__ == "__main__":
    main()
