"""QAT (LSQ), binary/ternary weights and mixed precision on LeNet-5 / real MNIST.

builtin:mnist (4,000 train / 1,000 test images). One float LeNet-5 is trained, then each
variant starts from it:

* round-to-nearest PTQ (per-channel weights, min/max activations), no training;
* QAT with fixed (min/max) steps and the STE, the same fine-tune budget as LSQ;
* QAT-LSQ (learned steps), without and with distillation from the float model
  (W4A8, W2A8, W4A4 and W2A2);
* binary (BWN) and ternary (TWN) weights trained with QAT, first and last layer at 8 bits
  (LSQ), 8-bit activations;
* mixed precision (weights only, {8, 4, 2, float} per layer) under a weight byte budget.

Every variant is frozen (integer / bit-packed codes) and saved as an artifact; its bytes on
disk are reported. Prints JSON (benchmarks/results/quant_qat.json).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from _common import emit  # noqa: I001

from slimkit.core.record import Record
from slimkit.core.stages import StageContext, commit_transforms
from slimkit.data import load_data
from slimkit.io.artifact import save_artifact
from slimkit.io.loader import load_zoo
from slimkit.io.model import SlimModel
from slimkit.quant.extreme import pack_layer
from slimkit.quant.mixed import MixedPrecisionConfig, mixed_precision
from slimkit.quant.modules import QUANTIZABLE
from slimkit.quant.plan import QuantSpec, freeze, wrap_layers
from slimkit.quant.qat import QatConfig, calibrate_inputs, qat
from slimkit.train import TrainConfig, evaluate, fit


def disk_bytes(model: SlimModel) -> dict:
    """Artifact bytes (weights file and whole directory) of ``model`` (its arch holds the
    transforms that rebuild the quantized layers)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = save_artifact(model, Path(tmp) / "a")
        weights = (path / "weights.safetensors").stat().st_size
        total = sum(f.stat().st_size for f in path.iterdir())
    return {"weights_bytes": weights, "artifact_bytes": total}


def rtn(model: SlimModel, x_calib: torch.Tensor, bits: int, act_bits: int) -> tuple:
    """Round-to-nearest PTQ: per-channel weights at ``bits``, min/max activations.

    Stored like the QAT variants: <= 4-bit codes bit-packed, 8-bit ones as int8.
    """
    work = copy.deepcopy(model.module)
    names = [n for n, m in work.named_modules() if type(m).__name__ in QUANTIZABLE]
    spec = {"weight": QuantSpec(bits=bits, granularity="channel"),
            "input": QuantSpec(bits=act_bits, symmetric=False, signed=False)}
    layers = wrap_layers(work, {n: spec for n in names})
    calibrate_inputs(work, layers, x_calib)
    if bits <= 4:
        kind, details = "packed_quant", {
            "packed_plan": {"layers": {n: pack_layer(work, n) for n in names}}}
    else:
        freeze(work)
        kind, details = "quant_layers", {"plan": {
            "layers": {n: {k: (v.model_dump() if v else None) for k, v in
                           {**spec, "output": None}.items()} for n in names}, "frozen": True}}
    out = model.copy(work)
    # Not a registered stage: store its transform the way the stage contract does.
    commit_transforms(out, Record(transforms=[(kind, next(iter(details.values())))]))
    return out, details


def run_variant(name: str, fn, results: dict, data) -> None:
    t = time.perf_counter()
    model, details = fn()
    acc = evaluate(model.module, data.x_test, data.y_test)
    results[name] = {"top1": acc, "seconds": round(time.perf_counter() - t, 2),
                     **disk_bytes(model)}
    if details and "finetune" in details:  # QAT: the accuracy trail and training curve
        results[name]["accuracy"] = details["accuracy"]
        results[name]["epoch_test_top1"] = [e.get("test_top1")
                                            for e in details["finetune"]["epochs"]]
    print(f"{name}: {acc:.4f}", flush=True, file=__import__("sys").stderr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=6, help="float training epochs")
    ap.add_argument("--qat-epochs", type=int, default=2, help="QAT fine-tune budget (W4/W2)")
    ap.add_argument("--qat-lr", type=float, default=2e-4, help="QAT fine-tune peak LR")
    ap.add_argument("--extreme-epochs", type=int, default=4, help="binary/ternary budget")
    ap.add_argument("--size-ratio", type=float, default=0.1,
                    help="mixed precision: weight bytes budget as a fraction of float")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_data("builtin:mnist", seed=0)
    torch.manual_seed(0)  # the zoo model's initialization
    zoo = load_zoo("lenet5", data)
    start = time.perf_counter()
    fit(zoo.module, data, TrainConfig(epochs=args.epochs, lr=2e-3, batch_size=64),
        progress=False)
    zoo.module.eval()
    ctx = StageContext(data=data, progress=False)
    calib = data.x_train[:256]
    res: dict = {}
    run_variant("fp32", lambda: (zoo.copy(), None), res, data)
    ft = {"epochs": args.qat_epochs, "lr": args.qat_lr, "batch_size": 64}
    kd = {**ft, "distill": {}}
    for bits, abits in ((4, 8), (2, 8), (4, 4), (2, 2)):
        tag = f"w{bits}a{abits}"
        run_variant(f"{tag}_rtn", lambda b=bits, a=abits: rtn(zoo, calib, b, a), res, data)
        for label, cfg in (
                ("ste_fixed", QatConfig(weight_bits=bits, act_bits=abits,
                                        weight_quantizer="affine", act_quantizer="affine",
                                        weight_init="range", finetune=ft)),
                ("lsq", QatConfig(weight_bits=bits, act_bits=abits, finetune=ft)),
                ("lsq_distill", QatConfig(weight_bits=bits, act_bits=abits, finetune=kd))):
            run_variant(f"{tag}_qat_{label}",
                        lambda c=cfg: _details(qat(zoo, c, ctx)), res, data)
    ext = {"epochs": args.extreme_epochs, "lr": 1e-3, "batch_size": 64}
    for kind in ("binary", "ternary"):
        cfg = QatConfig(weight_quantizer=kind, first_last_bits=8, finetune=ext)
        run_variant(f"{kind}_a8_qat", lambda c=cfg: _details(qat(zoo, c, ctx)), res, data)
    mp_cfg = MixedPrecisionConfig(policy="size", size_ratio=args.size_ratio)
    mp_rec: dict = {}

    def mp():
        out, rec = mixed_precision(zoo, mp_cfg, ctx)
        mp_rec.update(rec.details)
        return out, rec.details

    run_variant("mixed_precision_weights_only", mp, res, data)
    res["mixed_precision_weights_only"]["asked"] = mp_rec["asked"]
    res["mixed_precision_weights_only"]["achieved"] = mp_rec["achieved"]
    res["mixed_precision_weights_only"]["layers"] = {
        n: {"bits": r["bits"], "bytes": r["bytes"], "float_bytes": r["float_bytes"],
            "sensitivity": r["sensitivity"]} for n, r in mp_rec["layers"].items()}
    base = res["fp32"]["weights_bytes"]
    for r in res.values():
        r["size_ratio_vs_fp32"] = round(base / r["weights_bytes"], 2)
    emit({"benchmark": "quant_qat", "model": "lenet5", "data": data.name,
          "n_train": len(data.x_train), "n_test": len(data.x_test),
          "float_epochs": args.epochs, "qat_epochs": args.qat_epochs,
          "extreme_epochs": args.extreme_epochs,
          "notes": ["weights per output channel (symmetric), activations per tensor (each "
                    "quantized layer's input, asymmetric uint8, min/max calibrated on 256 "
                    "training images)",
                    "binary/ternary: first and last layer keep 8-bit LSQ weights; all other "
                    "layers 1-bit (binary) or 2-bit (ternary) packed codes + per-channel alpha",
                    "ste_fixed, lsq and lsq_distill get the same fine-tune budget",
                    "mixed precision is weights-only (activations float), RTN per layer",
                    "weights_bytes: the artifact's weights.safetensors: 8-bit layers as int8 "
                    "codes, 1/2/4-bit ones bit-packed (3-bit would take 4), plus float32 "
                    "per-channel scales and biases"],
          "total_seconds": round(time.perf_counter() - start, 1), "results": res})


def _details(out: tuple) -> tuple:
    model, record = out
    return model, record.details


if __name__ == "__main__":
    main()
