"""QAT (LSQ), binary/ternary weights and mixed precision on LeNet-5 / full Fashion-MNIST.

``builtin:fashion-mnist`` (54,000 train / 6,000 validation held out of training / 10,000
test). One float LeNet-5 is trained (learning rate and epoch count chosen on validation by
``quant_cnn.train_on_validation``; ``--float-model DIR`` reuses the one ``quant_cnn.py
--save-model DIR`` trained, with its training record), then each variant starts from it:

* round-to-nearest PTQ (per-channel weights, min/max activations), no training;
* QAT with fixed (min/max) steps and the STE, the same fine-tune budget as LSQ;
* QAT-LSQ (learned steps), without and with distillation from the float model
  (W4A8, W2A8, W4A4 and W2A2);
* binary (BWN) and ternary (TWN) weights trained with QAT, first and last layer at 8 bits
  (LSQ), 8-bit activations;
* mixed precision (weights only, {8, 4, 2, float} per layer) under a weight byte budget.

Calibration (activation ranges, sensitivities) uses ``--calib`` class-stratified, shuffled
training images (seed 0). Every QAT variant fine-tunes for a fixed number of steps
(``--qat-steps``; binary/ternary ``--extreme-steps``) with one learning rate chosen on the
validation split: each rate in ``--qat-lrs`` runs W2A2-LSQ (the hardest setting) and the
best validation top-1 wins (that run is the W2A2-LSQ variant). Training and every variant
see the data with its test split hidden (:func:`slimkit.data.guard.hide_test`: what the QAT
records measure is on validation); the test split is read once, at the end, for every
variant: top-1 with Wilson 95% intervals and exact McNemar tests against FP32, RTN of the
same widths, and STE vs LSQ vs LSQ+distillation.

Claim (issue 17 wording): QAT/LSQ recovers low-bit accuracy, i.e. at every width where RTN
loses accuracy beyond the noise, LSQ is more accurate than RTN beyond the noise.

Every variant is frozen (integer / bit-packed codes) and saved as an artifact; its bytes on
disk are reported. Prints JSON and saves it to benchmarks/results/quant_qat.json
(``--quick``: a smoke run, not saved).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import data_record, emit, settings_record, top1_with_ci  # noqa: I001
from quant_cnn import LENET5_LRS, train_on_validation

from slimkit.core.files import write_json
from slimkit.core.record import Record
from slimkit.core.stages import StageContext, commit_transforms
from slimkit.data import calibration_subset, load_data
from slimkit.data.guard import hide_test
from slimkit.data.split import calibration_indices
from slimkit.io.artifact import load_artifact, save_artifact
from slimkit.io.loader import load_zoo
from slimkit.io.model import SlimModel
from slimkit.measure.stats import mcnemar
from slimkit.quant.extreme import pack_layer
from slimkit.quant.mixed import MixedPrecisionConfig, mixed_precision
from slimkit.quant.modules import QUANTIZABLE
from slimkit.quant.plan import QuantSpec, freeze, wrap_layers
from slimkit.quant.qat import QatConfig, calibrate_inputs, qat

RESULTS = Path(__file__).parent / "results" / "quant_qat.json"
WIDTHS = ((4, 8), (2, 8), (4, 4), (2, 2))


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


def float_model(args: argparse.Namespace, dev: Any) -> tuple[SlimModel, dict[str, Any]]:
    """The float LeNet-5: loaded from ``--float-model`` (quant_cnn.py's) or trained here."""
    if args.float_model is not None:
        model = load_artifact(args.float_model)
        record = json.loads((args.float_model / "train_record.json").read_text())
        return model, record | {"loaded_from": "quant_cnn.py --save-model (same data, "
                                               "seed and training procedure)"}
    return train_on_validation(lambda: load_zoo("lenet5", dev), dev, args.epochs,
                               LENET5_LRS, probe_steps=30 if args.quick else 150)


def qat_config(label: str, bits: int, abits: int, ft: dict[str, Any], calib: int
               ) -> QatConfig:
    """The STE (fixed min/max steps), LSQ or LSQ + distillation config of one width."""
    common = {"weight_bits": bits, "act_bits": abits, "calib_samples": calib}
    if label == "ste_fixed":
        return QatConfig(**common, weight_quantizer="affine", act_quantizer="affine",
                         weight_init="range", finetune=ft)
    if label == "lsq":
        return QatConfig(**common, finetune=ft)
    return QatConfig(**common, finetune={**ft, "distill": {}})


def run(fn: Any) -> tuple[SlimModel, dict[str, Any]]:
    """Build one variant; its validation record (QAT: accuracies and fine-tune trail)."""
    start = time.perf_counter()
    model, details = fn()
    info: dict[str, Any] = {"seconds": round(time.perf_counter() - start, 2),
                            **disk_bytes(model)}
    if details and "finetune" in details:  # QAT: measured on validation (test hidden)
        info["validation"] = details["accuracy"]
        info["finetune_val_top1"] = [e.get("val_top1") for e in details["finetune"]["epochs"]]
    return model, info


def choose_qat_lr(zoo: SlimModel, ctx: StageContext, args: argparse.Namespace
                  ) -> tuple[float, dict[str, float], dict[str, Any]]:
    """The QAT learning rate with the best W2A2-LSQ validation top-1 (that run is kept)."""
    runs, val = {}, {}
    for lr in args.qat_lrs:
        ft = {"max_steps": args.qat_steps, "lr": lr, "batch_size": 64}
        runs[lr] = run(lambda c=qat_config("lsq", 2, 2, ft, args.calib): _details(qat(zoo, c, ctx)))
        val[str(lr)] = runs[lr][1]["validation"]["after"]
    best = max(args.qat_lrs, key=lambda lr: val[str(lr)])
    return best, val, runs[best]


def build_variants(zoo: SlimModel, dev: Any, args: argparse.Namespace
                   ) -> tuple[dict[str, tuple[SlimModel, dict]], dict[str, Any]]:
    """Every variant, every choice on validation; nothing here can read the test split."""
    ctx = StageContext(data=dev, progress=False)
    calib = calibration_subset(dev, args.calib, seed=0)
    lr, lr_val, w2a2_lsq = choose_qat_lr(zoo, ctx, args)
    ft = {"max_steps": args.qat_steps, "lr": lr, "batch_size": 64}
    out: dict[str, tuple[SlimModel, dict]] = {"fp32": (zoo, disk_bytes(zoo))}
    for bits, abits in WIDTHS:
        tag = f"w{bits}a{abits}"
        out[f"{tag}_rtn"] = run(lambda b=bits, a=abits: rtn(zoo, calib, b, a))
        for label in ("ste_fixed", "lsq", "lsq_distill"):
            if (tag, label) == ("w2a2", "lsq"):
                out[f"{tag}_qat_{label}"] = w2a2_lsq
                continue
            cfg = qat_config(label, bits, abits, ft, args.calib)
            out[f"{tag}_qat_{label}"] = run(lambda c=cfg: _details(qat(zoo, c, ctx)))
    ext = {"max_steps": args.extreme_steps, "lr": lr, "batch_size": 64}
    for kind in ("binary", "ternary"):
        cfg = QatConfig(weight_quantizer=kind, first_last_bits=8, calib_samples=args.calib,
                        finetune=ext)
        out[f"{kind}_a8_qat"] = run(lambda c=cfg: _details(qat(zoo, c, ctx)))
    mp_cfg = MixedPrecisionConfig(policy="size", size_ratio=args.size_ratio,
                                  calib_samples=args.calib)
    mp_model, mp_rec = mixed_precision(zoo, mp_cfg, ctx)
    out["mixed_precision_weights_only"] = (mp_model, disk_bytes(mp_model) | {
        "asked": mp_rec.details["asked"], "achieved": mp_rec.details["achieved"],
        "layers": {n: {"bits": r["bits"], "bytes": r["bytes"], "float_bytes": r["float_bytes"],
                       "sensitivity": r["sensitivity"]}
                   for n, r in mp_rec.details["layers"].items()}})
    choice = {"qat_lr_grid": list(args.qat_lrs), "probe": "W2A2 LSQ, the full --qat-steps",
              "validation_top1_after": lr_val, "chosen_lr": lr,
              "applied_to": "every QAT variant (W-bit STE/LSQ/LSQ+KD, binary, ternary)"}
    return out, choice


def test_results(variants: dict[str, tuple[SlimModel, dict]], data: Any) -> dict[str, Any]:
    """The test split, read once: top-1 with Wilson intervals and exact McNemar tests."""
    res, hits = {}, {}
    for name, (model, info) in variants.items():
        acc, hits[name] = top1_with_ci(model.module, data.x_test, data.y_test)
        res[name] = {"top1_test": acc, **info}
    base = res["fp32"]["weights_bytes"]
    for name, r in res.items():
        r["size_ratio_vs_fp32"] = round(base / r["weights_bytes"], 2)
        if name != "fp32":
            r["vs_fp32"] = mcnemar(hits[name].numpy(), hits["fp32"].numpy())
        tag = name.split("_")[0]
        if "_qat_" in name:
            r["vs_rtn"] = mcnemar(hits[name].numpy(), hits[f"{tag}_rtn"].numpy())
        if name.endswith(("_qat_lsq", "_qat_lsq_distill")):
            r["vs_ste_fixed"] = mcnemar(hits[name].numpy(), hits[f"{tag}_qat_ste_fixed"].numpy())
        if name.endswith("_qat_lsq_distill"):
            r["vs_lsq"] = mcnemar(hits[name].numpy(), hits[f"{tag}_qat_lsq"].numpy())
    return res


def criteria(res: dict[str, Any]) -> dict[str, Any]:
    """Per width: does RTN lose beyond noise, and does LSQ then beat RTN beyond noise?"""
    out = {}
    for bits, abits in WIDTHS:
        tag = f"w{bits}a{abits}"
        rtn_loss = res[f"{tag}_rtn"]["vs_fp32"]
        lsq = res[f"{tag}_qat_lsq"]
        loses = rtn_loss["differs"] and rtn_loss["accuracy_difference"] < 0
        beats = lsq["vs_rtn"]["differs"] and lsq["vs_rtn"]["accuracy_difference"] > 0
        out[tag] = {"rtn_drop_points": -100 * rtn_loss["accuracy_difference"],
                    "rtn_loses_beyond_noise": loses,
                    "lsq_gain_over_rtn_points": 100 * lsq["vs_rtn"]["accuracy_difference"],
                    "lsq_beats_rtn_beyond_noise": beats,
                    "lsq_drop_vs_fp32_points": -100 * lsq["vs_fp32"]["accuracy_difference"],
                    "lsq_differs_from_fp32": lsq["vs_fp32"]["differs"],
                    "met": beats if loses else not (lsq["vs_rtn"]["differs"]
                                                   and lsq["vs_rtn"]["accuracy_difference"] < 0)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=5,
                    help="float training: most epochs (the best on validation is kept)")
    ap.add_argument("--float-model", type=Path, default=None,
                    help="the FP32 LeNet-5 saved by quant_cnn.py --save-model DIR")
    ap.add_argument("--qat-steps", type=int, default=200, help="QAT fine-tune steps (W-bit)")
    ap.add_argument("--extreme-steps", type=int, default=400, help="binary/ternary steps")
    ap.add_argument("--qat-lrs", type=float, nargs="+", default=[2e-4, 1e-3],
                    help="QAT learning rates tried on validation")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--size-ratio", type=float, default=0.1,
                    help="mixed precision: weight bytes budget as a fraction of float")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 5,000 training images, 1 float epoch, 10 QAT steps")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.qat_steps, args.extreme_steps, args.no_save = 1, 10, 10, True
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = load_data("builtin:fashion-mnist")
    if args.quick:
        idx = calibration_indices(data, 5000, seed=0)
        data = dataclasses.replace(data, x_train=data.x_train[idx], y_train=data.y_train[idx])
    dev = hide_test(data)
    zoo, trained = float_model(args, dev)
    variants, choice = build_variants(zoo, dev, args)
    res = test_results(variants, data)
    crit = criteria(res)
    result = {
        "benchmark": "quant_qat", "model": "zoo:lenet5",
        "data": data_record(data, calibration=f"{args.calib} class-stratified, shuffled "
                            "training images (seed 0)",
                            choices="on the validation split; test read once at the end"),
        "seeds": {"torch": 0, "calibration": 0, "validation_split": 0},
        "settings": settings_record(args),
        "float_training": trained, "qat_lr_choice": choice,
        "notes": ["weights per output channel (symmetric), activations per tensor (each "
                  "quantized layer's input, asymmetric uint8, min/max calibrated on the "
                  "calibration images)",
                  "binary/ternary: first and last layer keep 8-bit LSQ weights; all other "
                  "layers 1-bit (binary) or 2-bit (ternary) packed codes + per-channel alpha",
                  "ste_fixed, lsq and lsq_distill get the same fine-tune budget and LR",
                  "mixed precision is weights-only (activations float), RTN per layer",
                  "validation / finetune_val_top1: what each QAT run measured on the "
                  "validation split (the test split was hidden from it)",
                  "weights_bytes: the artifact's weights.safetensors: 8-bit layers as int8 "
                  "codes, 1/2/4-bit ones bit-packed (3-bit would take 4), plus float32 "
                  "per-channel scales and biases"],
        "results": res, "criteria": crit,
        "met": all(c["met"] for c in crit.values()),
        "total_seconds": round(time.perf_counter() - start, 1)}
    emit(result)
    if not args.no_save:
        write_json(RESULTS, result)


def _details(out: tuple) -> tuple:
    model, record = out
    return model, record.details


if __name__ == "__main__":
    main()
