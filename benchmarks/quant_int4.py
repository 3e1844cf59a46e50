"""Weight-only INT4 (packed, group-wise) on Linear-heavy zoo models: RTN against GPTQ.

Models: zoo:lenet300, zoo:vit (dim 64, depth 4) and zoo:text_encoder (image rows as tokens),
and optionally ``vit_wide`` (zoo:vit with dim 128), each trained on ``builtin:fashion-mnist``
(54,000 train / 6,000 validation held out of training / 10,000 test) with its learning rate
and epoch count (at most ``--epochs``) chosen on validation (``quant_cnn.train_on_validation``).
Every Linear layer is quantized to 4-bit symmetric codes with groups of at most ``--group``
input columns (fp16 scales), once by round-to-nearest and once by GPTQ (Frantar et al. 2023)
on 256 calibration samples. Convolutions, embeddings, LayerNorms and biases stay float.

Reported per model: top-1 test accuracy of FP32 / RTN / GPTQ with Wilson 95% intervals (and
exact McNemar tests GPTQ vs RTN and vs FP32); each layer's relative output error
``||X W_q^T - X W^T|| / ||X W^T||`` for RTN and GPTQ, measured **out of sample**: ``X`` is
each layer's FP32 input on ``--heldout`` validation images (a seeded random draw), which
neither training nor GPTQ saw (GPTQ calibrates on a class-stratified, shuffled subset of the
training split, seed 0); the in-sample error on the calibration inputs (what GPTQ minimised)
is kept beside it for comparison, never as the criterion. Group size and calibration size
are fixed beforehand (no choice is made on them); training and quantization see the data
with its test split hidden (:func:`slimkit.data.guard.hide_test`), and the test split is read
once per model, at the end, for accuracy. Per-layer "GPTQ lower" counts a layer only when its
held-out error is lower.
Also reported: the artifact weight file (weights.safetensors), the ONNX file and its initializers
(the weight payload) of FP32 and INT4 and their ratios (target >= 6x); ONNX Runtime parity
of the INT4 model (``com.microsoft::MatMulNBits``).

Peer: ONNX Runtime's ``MatMulNBitsQuantizer`` on the same FP32 ONNX export, 4-bit symmetric,
groups of ``--group``: its default algorithm (round to nearest, ``ort_rtn``) and its GPTQ
(``GPTQWeightOnlyQuantConfig``: the vendored Intel Neural Compressor GPTQ, percdamp 0.01,
no act-order, GPTQ block 128 = slimkit's settings) on the same calibration images. It
quantizes ``MatMul`` nodes only: a Linear that exports as ``Gemm`` (2-D input: LeNet-300's
layers, the ViT's head) stays float there, and each peer row records its coverage. For a
like-for-like comparison slimkit is run a second time with those layers excluded
(``rtn_same_coverage`` / ``gptq_same_coverage``); the peers are compared with these rows (or
with the default ones where the coverage is already the same; not at all where the peer
quantizes no layer) on test top-1 (exact McNemar, paired) and on the mean per-image relative
logit error vs FP32 (paired bootstrap interval of the difference). Prints JSON and saves it to
benchmarks/results/quant_int4.json (``--quick``: a smoke run, not saved). ``--save-models DIR``
keeps each trained FP32 model (artifact + training record) in ``DIR/NAME``, so that
``quant_transformer.py --vit-from DIR/vit`` measures the same ViT.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import data_record, emit, settings_record  # noqa: I001
from quant_cnn import train_on_validation

from slimkit.core.files import write_json
from slimkit.core.stages import StageContext
from slimkit.data import calibration_subset, load_data
from slimkit.data.bundle import DataBundle
from slimkit.data.guard import hide_test
from slimkit.data.split import calibration_indices
from slimkit.export.onnx import check_parity, export_onnx
from slimkit.io import save_artifact
from slimkit.io.loader import load_zoo
from slimkit.io.model import SlimModel
from slimkit.measure.stats import accuracy_ci, bootstrap_ci, mcnemar
from slimkit.quant.calibrate import batches_of
from slimkit.quant.gptq import collect_hessians, output_error
from slimkit.quant.weight_only import WeightOnlyConfig, weight_only_quant

RESULTS = Path(__file__).parent / "results" / "quant_int4.json"
#: benchmark name -> (zoo model, kwargs); vit_wide shows how the ratio grows with width
MODELS = {"lenet300": ("lenet300", {}), "vit": ("vit", {}), "text_encoder": ("text_encoder", {}),
          "vit_wide": ("vit", {"dim": 128})}


def train(name: str, dev: DataBundle, args: argparse.Namespace) -> tuple[SlimModel, dict]:
    """The FP32 model, learning rate and epoch count chosen on validation."""
    zoo, kwargs = MODELS[name]
    model, record = train_on_validation(lambda: load_zoo(zoo, dev, **kwargs), dev,
                                        args.epochs, probe_steps=args.probe_steps)
    if args.save_models is not None:
        save_artifact(model, args.save_models / name, overwrite=True)
        write_json(args.save_models / name / "train_record.json", record)
    return model, record


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


def accuracies(logits: dict[str, torch.Tensor], y: torch.Tensor) -> dict[str, Any]:
    """Test top-1 with Wilson intervals; exact McNemar GPTQ vs RTN and vs FP32, and slimkit
    vs each ONNX Runtime peer of the same method; mean relative logit error vs FP32 with a
    paired bootstrap interval of slimkit's minus the peer's."""
    hits = {k: (v.argmax(1) == y).numpy() for k, v in logits.items()}
    out: dict[str, Any] = {k: accuracy_ci(int(h.sum()), len(h)) for k, h in hits.items()}
    out["gptq_vs_rtn"] = mcnemar(hits["gptq"], hits["rtn"])
    out["gptq_vs_fp32"] = mcnemar(hits["gptq"], hits["fp32"])
    ref = logits["fp32"].double()
    err = {k: ((v.double() - ref).norm(dim=1) / ref.norm(dim=1)).numpy()
           for k, v in logits.items() if k != "fp32"}
    out["logit_rel_error_vs_fp32"] = {k: float(e.mean()) for k, e in err.items()}
    for method in ("rtn", "gptq"):
        peer = f"ort_{method}"
        if peer not in hits:
            continue
        ours = f"{method}_same_coverage" if f"{method}_same_coverage" in hits else method
        out[f"{method}_vs_{peer}"] = mcnemar(hits[ours], hits[peer]) | {"slimkit_row": ours}
        diff, lo, hi = bootstrap_ci(err[ours] - err[peer], rounds=2000)
        out[f"{method}_vs_{peer}_logit_error"] = {
            "difference": diff, "ci95": [lo, hi], "lower_beyond_noise": hi < 0,
            "higher_beyond_noise": lo > 0,
            "method": "paired percentile bootstrap over test images (2,000 draws, seed 0)"}
    return out


def ort_peer(fp32: Path, out: Path, calib: torch.Tensor, group: int, gptq: bool
             ) -> tuple[Path, dict[str, Any]]:
    """ONNX Runtime's MatMulNBitsQuantizer (RTN or its GPTQ) on the FP32 ONNX file."""
    import contextlib
    import sys

    import onnx
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        GPTQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    name = onnx.load(str(fp32)).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{name: calib[i:i + 32].numpy()}
                                 for i in range(0, len(calib), 32)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    algo = (GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(), percdamp=0.01,
                                      block_size=128, actorder=False, perchannel=True)
            if gptq else None)
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # its progress lines; stdout is the JSON
        q = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=4, block_size=group,
                                 is_symmetric=True, algo_config=algo)
        q.process()
    onnx.save(q.model.model, str(out))
    config = {"call": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
              "bits": 4, "block_size": group, "is_symmetric": True,
              "algorithm": ("GPTQ (percdamp 0.01, blocksize 128, actorder False, perchannel "
                            f"True, {len(calib)} calibration images)" if gptq
                            else "DEFAULT (round to nearest)"),
              "seconds": time.perf_counter() - start, "coverage": onnx_coverage(out)}
    return out, config


def onnx_coverage(path: Path) -> dict[str, Any]:
    """MatMulNBits nodes, and the modules whose MatMul/Gemm still reads a float weight
    (``/blocks.0/mlp/fc1/MatMul`` -> ``blocks.0.mlp.fc1``)."""
    import onnx

    g = onnx.load(str(path)).graph
    inits = {i.name for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT}
    left = [".".join(n.name.split("/")[1:-1]) for n in g.node
            if n.op_type in ("MatMul", "Gemm") and any(i in inits for i in n.input)]
    return {"MatMulNBits": sum(n.op_type == "MatMulNBits" for n in g.node),
            "float_weight_layers": left}


def ort_logits(path: Path, x: torch.Tensor, threads: int, chunk: int = 500) -> torch.Tensor:
    from slimkit.measure.latency import ort_session

    sess = ort_session(path, threads)
    name = sess.get_inputs()[0].name
    return torch.cat([torch.from_numpy(sess.run(None, {name: x[i:i + chunk].numpy()})[0])
                      for i in range(0, len(x), chunk)]).float()


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
    """One model: trained and quantized without the test split, then read on it once."""
    dev = hide_test(data)
    model, trained = train(name, dev, args)
    cfg = WeightOnlyConfig(bits=4, group_size=args.group, calib_samples=args.calib, seed=0)
    rtn, rtn_info = quantize(model, dev, cfg)
    gptq, gptq_info = quantize(model, dev, cfg.model_copy(update={"method": "gptq"}))
    rec = gptq_info["record"]
    names = [n for n, e in rec.details["layers"].items() if e["method"] == "gptq"]
    pick = torch.randperm(data.n_val, generator=torch.Generator().manual_seed(0))
    x = data.x_val[pick[: args.heldout]]
    held = heldout_errors(model, {"rtn": rtn, "gptq": gptq}, names, x)
    layers, rounded = layer_rows(rec, held)
    fp = sizes(model, tmp, f"{name}-fp32")
    q = sizes(gptq, tmp, f"{name}-int4")
    parity = check_parity(gptq, q.pop("onnx_path"), (data.x_val[:16],), atol=1e-4)
    fp32_onnx = Path(fp.pop("onnx_path"))
    calib = calibration_subset(dev, args.calib, seed=0)  # the images slimkit calibrates on
    peers = {f"ort_{m}": ort_peer(fp32_onnx, tmp / f"{name}-ort-{m}.onnx", calib, args.group,
                                  m == "gptq") for m in ("rtn", "gptq")}
    from slimkit.measure.quality import predict

    models = {"fp32": model, "rtn": rtn, "gptq": gptq}
    left = peers["ort_rtn"][1]["coverage"]["float_weight_layers"]
    covered = peers["ort_rtn"][1]["coverage"]["MatMulNBits"] > 0
    if covered and left:  # slimkit with the peer's coverage: the layers it leaves float
        for m in ("rtn", "gptq"):
            models[f"{m}_same_coverage"] = quantize(model, dev, cfg.model_copy(
                update={"method": m, "exclude": left}))[0]
    # The test split, read once, at the end (every model above is final).
    logits = {k: predict(m.module, data.x_test, 256).float() for k, m in models.items()}
    if covered:
        logits |= {k: ort_logits(p, data.x_test, args.threads) for k, (p, _) in peers.items()}
    return {
        "training": trained, "group_size": args.group,
        "accuracy_test": accuracies(logits, data.y_test),
        "peers": {k: c for k, (_, c) in peers.items()},
        "output_error_total": error_totals(layers),
        "output_error_inputs": f"FP32 layer inputs on {len(x)} validation images (seeded "
                               "random draw; held out of training and of GPTQ's calibration)",
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
    ap.add_argument("--epochs", type=int, default=12,
                    help="most training epochs per model (the best on validation is kept)")
    ap.add_argument("--probe-steps", type=int, default=150,
                    help="steps of each learning-rate probe (see train_on_validation)")
    ap.add_argument("--group", type=int, default=128, help="group size (<= 128)")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--heldout", type=int, default=1000,
                    help="validation images whose layer inputs measure the output errors")
    ap.add_argument("--models", nargs="*", default=["lenet300", "vit", "text_encoder"],
                    choices=list(MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-models", type=Path, default=None,
                    help="keep each trained FP32 model in DIR/NAME (quant_transformer.py "
                         "--vit-from DIR/vit)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 5,000 training images, 1 epoch, 20-step probes")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.probe_steps, args.no_save = 1, 20, True
    torch.set_num_threads(args.threads)
    data = load_data("builtin:fashion-mnist")
    if args.quick:
        idx = calibration_indices(data, 5000, seed=0)
        data = dataclasses.replace(data, x_train=data.x_train[idx], y_train=data.y_train[idx])
    result: dict[str, Any] = {
        "benchmark": "quant_int4",
        "data": data_record(data, calibration=f"{args.calib} class-stratified, shuffled "
                            "training samples (seed 0), the same for RTN and GPTQ",
                            held_out=f"layer errors on {min(args.heldout, data.n_val)} "
                                     "validation images; accuracies on the test split, read "
                                     "once per model at the end",
                            choices="learning rate and epochs on validation"),
        "seeds": {"torch": 0, "calibration": 0, "validation_split": 0, "heldout_draw": 0},
        "settings": settings_record(args),
        "models": {}}
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
        # Peers (ORT MatMulNBitsQuantizer): models where it quantizes at least one layer;
        # its coverage (Gemm layers stay float) is recorded per model beside the verdict.
        "gptq_accuracy_not_below_ort_gptq_beyond_noise": all(
            not (m["accuracy_test"]["gptq_vs_ort_gptq"]["differs"]
                 and m["accuracy_test"]["gptq_vs_ort_gptq"]["accuracy_difference"] < 0)
            for m in ms if m["peers"]["ort_gptq"]["coverage"]["MatMulNBits"]),
        "gptq_logit_error_not_above_ort_gptq_beyond_noise": all(
            not m["accuracy_test"]["gptq_vs_ort_gptq_logit_error"]["higher_beyond_noise"]
            for m in ms if m["peers"]["ort_gptq"]["coverage"]["MatMulNBits"]),
    }
    emit(result)
    if not args.no_save:
        write_json(RESULTS, result)


if __name__ == "__main__":
    main()
