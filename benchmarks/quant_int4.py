"""Weight-only INT4 (packed, group-wise) on Linear-heavy zoo models: RTN against GPTQ.

Models: zoo:lenet300, zoo:vit (dim 64, depth 4) and zoo:text_encoder (MNIST rows as tokens),
and optionally ``vit_wide`` (zoo:vit with dim 128), each trained briefly on builtin:mnist.
Every Linear layer is quantized to 4-bit symmetric codes with groups of at most ``--group``
input columns (fp16 scales), once by round-to-nearest and once by GPTQ (Frantar et al. 2023)
on 256 calibration samples. Convolutions, embeddings, LayerNorms and biases stay float.

Reported per model: top-1 test accuracy of FP32 / RTN / GPTQ with Wilson 95% intervals (and
exact McNemar tests GPTQ vs RTN and vs FP32); each layer's relative output error
``||X W_q^T - X W^T|| / ||X W^T||`` for RTN and GPTQ, measured **out of sample**: ``X`` is
each layer's FP32 input on ``--heldout`` test images, which neither training nor GPTQ saw
(GPTQ calibrates on a class-stratified, shuffled subset of the training split, seed 0);
the in-sample error on the calibration inputs (what GPTQ minimised) is kept beside it for
comparison, never as the criterion. Nothing is tuned here (group size, calibration size and
epochs are fixed beforehand), so no validation split is needed; the test split is read once,
at the end. Per-layer "GPTQ lower" counts a layer only when its held-out error is lower.
Also reported: the artifact weight file (weights.safetensors), the ONNX file and its initializers
(the weight payload) of FP32 and INT4 and their ratios (target >= 6x); ONNX Runtime parity
of the INT4 model (``com.microsoft::MatMulNBits``). Prints JSON and saves it to
benchmarks/results/quant_int4.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import data_record, emit  # noqa: I001

from slimkit.core.files import write_json
from slimkit.core.stages import StageContext
from slimkit.data import load_data
from slimkit.data.bundle import DataBundle
from slimkit.export.onnx import check_parity, export_onnx
from slimkit.io import save_artifact
from slimkit.io.loader import load_zoo
from slimkit.io.model import SlimModel
from slimkit.measure.stats import accuracy_ci, bootstrap_ci, mcnemar
from slimkit.quant.calibrate import batches_of
from slimkit.quant.gptq import collect_hessians, output_error
from slimkit.quant.weight_only import WeightOnlyConfig, weight_only_quant
from slimkit.train import TrainConfig, fit

RESULTS = Path(__file__).parent / "results" / "quant_int4.json"
#: benchmark name -> (zoo model, kwargs); vit_wide shows how the ratio grows with width
MODELS = {"lenet300": ("lenet300", {}), "vit": ("vit", {}), "text_encoder": ("text_encoder", {}),
          "vit_wide": ("vit", {"dim": 128})}


def train(name: str, data: DataBundle, epochs: int, lr: float) -> SlimModel:
    torch.manual_seed(0)
    zoo, kwargs = MODELS[name]
    model = load_zoo(zoo, data, **kwargs)
    fit(model.module, data, TrainConfig(epochs=epochs, lr=lr), progress=False)
    model.module.eval()
    return model


def sizes(model: SlimModel, out: Path, tag: str) -> dict[str, int]:
    """Bytes of the artifact's weight file, of the ONNX export and of its initializers.

    The initializers are the ONNX file's weight payload; the rest is the graph (node and
    tensor names), about 60 KB for the small transformers here whatever their weights.
    """
    import onnx

    art = save_artifact(model, out / f"{tag}-artifact")
    onnx_path = export_onnx(model, out / f"{tag}.onnx")
    inits = sum(i.ByteSize() for i in onnx.load(str(onnx_path)).graph.initializer)
    return {"weights_bytes": (art / "weights.safetensors").stat().st_size,
            "onnx_bytes": onnx_path.stat().st_size, "onnx_initializer_bytes": inits,
            "onnx_path": str(onnx_path)}


def quantize(model: SlimModel, data: DataBundle, cfg: WeightOnlyConfig) -> tuple[SlimModel, dict]:
    start = time.perf_counter()
    out, rec = weight_only_quant(model, cfg, StageContext(data=data, progress=False))
    seconds = time.perf_counter() - start
    return out, {"seconds": seconds, "record": rec}


def heldout_errors(model: SlimModel, quantized: dict[str, SlimModel], names: list[str],
                   x: torch.Tensor) -> dict[str, dict[str, float]]:
    """Each layer's relative output error on held-out inputs ``x``.

    ``X`` is the FP32 model's input to the layer (the same for RTN and GPTQ, as GPTQ's own
    objective uses), so the figure isolates the layer's weight rounding.
    """
    hess = collect_hessians(model.module, names, batches_of(x, 128))
    fp = dict(model.module.named_modules())
    mods = {k: dict(q.module.named_modules()) for k, q in quantized.items()}
    out = {}
    for n in names:
        w = fp[n].weight.detach().float().reshape(fp[n].weight.shape[0], -1)
        out[n] = {k: output_error(w, m[n].weight(), hess[n].h) for k, m in mods.items()}
    return out


def error_totals(layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean held-out errors, how many layers GPTQ lowers, and a bootstrap interval (over
    layers) of the mean GPTQ/RTN error ratio: below 1 at its high end = lower beyond noise."""
    rows = list(layers.values())
    ratio = [r["gptq_output_error"] / r["rtn_output_error"] for r in rows]
    mean, lo, hi = bootstrap_ci(ratio)
    return {"rtn_mean": sum(r["rtn_output_error"] for r in rows) / len(rows),
            "gptq_mean": sum(r["gptq_output_error"] for r in rows) / len(rows),
            "layers_where_gptq_lower": sum(r["gptq_output_error"] < r["rtn_output_error"]
                                           for r in rows),
            "layers": len(rows),
            "gptq_over_rtn_ratio": {"mean": mean, "ci95": [lo, hi], "method":
                                    "percentile bootstrap over layers (10,000 draws, seed 0)",
                                    "lower_beyond_noise": hi < 1},
            "in_sample_rtn_mean": sum(r["in_sample"]["rtn"] for r in rows) / len(rows),
            "in_sample_gptq_mean": sum(r["in_sample"]["gptq"] for r in rows) / len(rows)}


def accuracies(models: dict[str, SlimModel], x: torch.Tensor, y: torch.Tensor) -> dict:
    """Test top-1 with Wilson intervals, and exact McNemar GPTQ vs RTN and vs FP32."""
    from slimkit.measure.quality import predict

    hits = {k: (predict(m.module, x, 256).argmax(1) == y).numpy() for k, m in models.items()}
    out: dict[str, Any] = {k: accuracy_ci(int(h.sum()), len(h)) for k, h in hits.items()}
    out["gptq_vs_rtn"] = mcnemar(hits["gptq"], hits["rtn"])
    out["gptq_vs_fp32"] = mcnemar(hits["gptq"], hits["fp32"])
    return out


def layer_rows(rec: Any, held: dict[str, dict[str, float]]) -> tuple[dict, dict]:
    layers, rounded = {}, {}
    for lname, e in rec.details["layers"].items():
        if e["method"] != "gptq":  # convs / embedding tables: round to nearest only
            rounded[lname] = {"type": e["type"], "shape": [e["out_features"], e["in_features"]],
                              "weight_error": e["weight_rel_error"]}
            continue
        layers[lname] = {"shape": [e["out_features"], e["in_features"]], "block": e["block"],
                         "padded_columns": e["padded_columns"],
                         "rtn_output_error": held[lname]["rtn"],
                         "gptq_output_error": held[lname]["gptq"],
                         "in_sample": {"rtn": e["output_rel_error_rtn"],
                                       "gptq": e["output_rel_error"]},
                         "gptq_fallback": e["fallback"]}
    return layers, rounded


def model_case(name: str, data: DataBundle, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    epochs = args.epochs if name != "lenet300" else max(1, args.epochs // 2)
    model = train(name, data, epochs, args.lr)
    cfg = WeightOnlyConfig(bits=4, group_size=args.group, calib_samples=args.calib, seed=0)
    rtn, rtn_info = quantize(model, data, cfg)
    gptq, gptq_info = quantize(model, data, cfg.model_copy(update={"method": "gptq"}))
    rec = gptq_info["record"]
    names = [n for n, e in rec.details["layers"].items() if e["method"] == "gptq"]
    x = data.x_test[: args.heldout]
    held = heldout_errors(model, {"rtn": rtn, "gptq": gptq}, names, x)
    layers, rounded = layer_rows(rec, held)
    fp = sizes(model, tmp, f"{name}-fp32")
    q = sizes(gptq, tmp, f"{name}-int4")
    parity = check_parity(gptq, q.pop("onnx_path"), (data.x_test[:16],), atol=1e-4)
    fp.pop("onnx_path")
    return {
        "epochs": epochs, "group_size": args.group,
        "accuracy_test": accuracies({"fp32": model, "rtn": rtn, "gptq": gptq}, data.x_test,
                                    data.y_test),
        "output_error_total": error_totals(layers),
        "output_error_inputs": f"FP32 layer inputs on the first {len(x)} test images "
                               "(held out of training and of GPTQ's calibration)",
        "layers": layers, "rounded_to_nearest": rounded, "skipped": rec.skipped,
        "fp32": fp, "int4": q,
        "weights_ratio": fp["weights_bytes"] / q["weights_bytes"],
        "onnx_ratio": fp["onnx_bytes"] / q["onnx_bytes"],
        "onnx_initializer_ratio": fp["onnx_initializer_bytes"] / q["onnx_initializer_bytes"],
        "ort_parity": parity,
        "quantize_seconds": {"rtn": rtn_info["seconds"], "gptq": gptq_info["seconds"]},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--group", type=int, default=128, help="group size (<= 128)")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--heldout", type=int, default=1000,
                    help="test images whose layer inputs measure the output errors")
    ap.add_argument("--models", nargs="*", default=["lenet300", "vit", "text_encoder"],
                    choices=list(MODELS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 epoch, lenet300 only")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.models, args.no_save = 1, ["lenet300"], True
    torch.set_num_threads(args.threads)
    data = load_data("builtin:mnist")
    result: dict[str, Any] = {
        "benchmark": "quant_int4",
        "data": data_record(data, calibration=f"{args.calib} class-stratified, shuffled "
                            "training samples (seed 0), the same for RTN and GPTQ",
                            held_out=f"errors and accuracies on the test split (first "
                                     f"{min(args.heldout, data.n_test)} images for errors)"),
        "seeds": {"torch": 0, "calibration": 0}, "settings": vars(args), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            result["models"][name] = model_case(name, data, args, Path(tmp))
    ms = result["models"].values()
    result["criteria"] = {
        "weights_6x_smaller": all(m["weights_ratio"] >= 6 for m in ms),
        "onnx_6x_smaller": all(m["onnx_ratio"] >= 6 for m in ms),
        "gptq_lower_heldout_error_total": all(m["output_error_total"]["gptq_mean"]
                                              < m["output_error_total"]["rtn_mean"] for m in ms),
        "gptq_lower_heldout_error_beyond_noise": all(
            m["output_error_total"]["gptq_over_rtn_ratio"]["lower_beyond_noise"] for m in ms),
        "gptq_lower_heldout_error_every_layer": all(
            m["output_error_total"]["layers_where_gptq_lower"]
            == m["output_error_total"]["layers"] for m in ms),
        "gptq_accuracy_not_below_rtn_beyond_noise": all(
            not (m["accuracy_test"]["gptq_vs_rtn"]["differs"]
                 and m["accuracy_test"]["gptq_vs_rtn"]["accuracy_difference"] < 0) for m in ms),
        "ort_parity": all(m["ort_parity"]["ok"] for m in ms),
    }
    emit(result)
    if not args.no_save:
        write_json(RESULTS, result)


if __name__ == "__main__":
    main()
