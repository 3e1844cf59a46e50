"""Static INT8 PTQ of a CNN on real MNIST, run by ONNX Runtime's integer kernels.

Trains LeNet-5 (zoo) on builtin:mnist for a few epochs, then quantizes it with slimkit's PTQ
(BatchNorm folded, weights per-channel symmetric, uint8 activations per tensor, calibration on
a class-stratified subset) and exports the QDQ ONNX file with int8 weight initializers.
LeNet-5's conv1 (1 input channel, 5x5: a reduction of 25) stays float by slimkit's
``min_conv_reduction`` rule, because ORT's integer conv is slower than its float conv at that
size; ``slimkit_int8_all_layers`` shows the result with every layer in int8. Side by side, the
same FP32 ONNX file is quantized by ``onnxruntime.quantization.
quantize_static`` (QDQ format, per_channel=True, the same calibration samples), with and
without its ``reduce_range`` option.

Criteria (slimkit issue 3):

* accuracy drop of the deployed INT8 model (ONNX Runtime) <= 0.3 points;
* the INT8 ONNX file >= 3.8x smaller than the FP32 one;
* ORT INT8 at batch 32 >= 1.3x faster than ORT FP32 (one process, sessions with a fixed
  thread count, interleaved timing via slimkit.measure.latency.time_interleaved);
* slimkit at least as accurate and at least as fast as ``quantize_static``.

Prints JSON and saves it to benchmarks/results/quant_cnn.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import emit  # noqa: I001

from slimkit.core.files import write_json
from slimkit.core.stages import StageContext
from slimkit.data import calibration_subset, load_data
from slimkit.export.onnx import check_parity, export_onnx
from slimkit.export.qdq import int8_ops
from slimkit.io.loader import load_zoo
from slimkit.measure.latency import ort_session, time_interleaved
from slimkit.quant.ptq import PtqConfig, ptq
from slimkit.train.loop import TrainConfig, fit

RESULTS = Path(__file__).parent / "results" / "quant_cnn.json"


def ort_accuracy(session: Any, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> float:
    """Top-1 accuracy in percent of an ONNX Runtime session."""
    name = session.get_inputs()[0].name
    preds = [session.run(None, {name: x[i:i + batch].numpy()})[0].argmax(1)
             for i in range(0, len(x), batch)]
    return float((np.concatenate(preds) == y.numpy()).mean() * 100)


def peer_quantize(fp32: Path, out: Path, calib: torch.Tensor, reduce_range: bool) -> Path:
    """onnxruntime.quantization.quantize_static: QDQ, per-channel, same calibration data."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
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

    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=reduce_range,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--calibration", default="percentile")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    data = load_data("builtin:mnist")
    model = load_zoo("lenet5", data)
    fit(model.module, data, TrainConfig(epochs=args.epochs, lr=2e-3), progress=False)
    model.module.eval()
    with torch.no_grad():
        torch_fp32 = float((model.module(data.x_test).argmax(1) == data.y_test).float().mean())
    ctx = StageContext(data=data, progress=False)
    qmodel, record = ptq(model, PtqConfig(calibration=args.calibration,
                                          num_samples=args.calib), ctx)
    # For comparison: every conv in int8, including conv1 (reduction 25), which ORT's integer
    # conv runs slower than its float conv.
    q_all, _ = ptq(model, PtqConfig(calibration=args.calibration, num_samples=args.calib,
                                    min_conv_reduction=0), ctx)
    calib = calibration_subset(data, args.calib, seed=0)  # the samples slimkit calibrated on
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = {"fp32": export_onnx(model, tmp / "fp32.onnx"),
                 "slimkit_int8": export_onnx(qmodel, tmp / "slimkit.onnx"),
                 "slimkit_int8_all_layers": export_onnx(q_all, tmp / "all.onnx"),
                 "ort_quantize_static": peer_quantize(tmp / "fp32.onnx", tmp / "peer.onnx",
                                                      calib, reduce_range=False),
                 "ort_quantize_static_reduce_range": peer_quantize(
                     tmp / "fp32.onnx", tmp / "peer_rr.onnx", calib, reduce_range=True)}
        result = measure(paths, args, data, qmodel, torch_fp32)
    result["slimkit_layers"] = record.details["layers"]
    result["slimkit_skipped"] = record.skipped
    emit(result)
    if not args.no_save:
        write_json(RESULTS, result)


def measure(paths: dict[str, Path], args: argparse.Namespace, data: Any, qmodel: Any,
            torch_fp32: float) -> dict[str, Any]:
    import onnxruntime as ort

    sessions = {k: ort_session(p, args.threads) for k, p in paths.items()}
    x = data.x_test[: args.batch].numpy()
    fns = {k: (lambda s=s: s.run(None, {"input": x})) for k, s in sessions.items()}
    # The machine is shared: besides the headline run, the speed-up of several shorter
    # interleaved rounds is reported to show how much it moves with the load.
    rounds = [time_interleaved(fns, warmup=10, repeats=args.repeats // args.rounds)
              for _ in range(args.rounds)]
    timing = time_interleaved(fns, warmup=10, repeats=args.repeats)
    per_round = {k: [r["fp32"]["median_ms"] / r[k]["median_ms"] for r in rounds] for k in fns}
    acc = {k: ort_accuracy(s, data.x_test, data.y_test) for k, s in sessions.items()}
    size = {k: p.stat().st_size for k, p in paths.items()}
    fp = timing["fp32"]["median_ms"]
    models = {k: {"ort_accuracy": acc[k], "accuracy_drop_points": acc["fp32"] - acc[k],
                  "onnx_bytes": size[k], "onnx_size_ratio": size["fp32"] / size[k],
                  "median_ms": timing[k]["median_ms"], "p90_ms": timing[k]["p90_ms"],
                  "speedup_vs_fp32": fp / timing[k]["median_ms"],
                  "speedup_per_round": per_round[k],
                  "ort_ops": int8_ops(paths[k], args.threads) if k != "fp32" else None}
              for k in paths}
    par = check_parity(qmodel, paths["slimkit_int8"], (data.x_test,))
    with torch.no_grad():
        sim = qmodel.module(data.x_test).argmax(1).numpy()
    ort_pred = sessions["slimkit_int8"].run(None, {"input": data.x_test.numpy()})[0].argmax(1)
    s, peer = models["slimkit_int8"], models["ort_quantize_static"]
    criteria = {"accuracy_drop_le_0.3": s["accuracy_drop_points"] <= 0.3,
                "onnx_size_ratio_ge_3.8": s["onnx_size_ratio"] >= 3.8,
                "ort_speedup_ge_1.3_at_batch": s["speedup_vs_fp32"] >= 1.3,
                "as_accurate_as_peer": s["ort_accuracy"] >= peer["ort_accuracy"],
                "as_fast_as_peer": s["median_ms"] <= peer["median_ms"]}
    return {"benchmark": "quant_cnn", "model": "zoo:lenet5", "data": data.name,
            "n_test": len(data.x_test), "torch_fp32_accuracy": torch_fp32 * 100,
            "settings": vars(args) | {"activations": "uint8 asymmetric per-tensor",
                                      "weights": "int8 storage, symmetric per-channel, "
                                                 "reduce_range (7-bit codes)"},
            "ort_version": ort.__version__, "ort_threads": args.threads,
            "batch": args.batch, "models": models,
            "parity": par | {"argmax_agreement": float((sim == ort_pred).mean())},
            "criteria": criteria, "met": all(criteria.values())}


if __name__ == "__main__":
    main()
