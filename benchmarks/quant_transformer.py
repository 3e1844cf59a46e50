"""Dynamic INT8 on transformers: slimkit against ONNX Runtime's and PyTorch's dynamic quantizers.

Models: zoo:vit (dim 64, depth 4) trained on ``builtin:fashion-mnist`` (54,000 train / 6,000
validation held out of training / 10,000 test; learning rate and epoch count chosen on
validation by ``quant_cnn.train_on_validation``, or the one ``quant_int4.py --save-models DIR``
trained, loaded with ``--vit-from DIR/vit``), and optionally any
BERT-family Hugging Face directory (``--hf DIR``; ``--make-tiny-bert DIR`` writes one from a
small random BertConfig first, for a smoke run without downloads). Inputs of the HF model are
random token ids (no labels, so no accuracy there).

Compared on the same FP32 model. Coverage (which weights are quantized) is the same for the
like-for-like rows: every quantizer quantizes every Linear layer and leaves embeddings and
convolutions (ViT's patch embedding) float:

* slimkit ``dynamic_quant`` (Linear layers only, by design);
* ``onnxruntime.quantization.quantize_dynamic`` with ``op_types_to_quantize=["MatMul"]``
  (``ort_quantize_dynamic_same_coverage``; ORT rewrites Gemm as MatMul first, so this covers
  every Linear);
* ``torch.ao.quantization.quantize_dynamic`` on ``nn.Linear`` (deprecated; run in PyTorch).

ORT's default coverage (``ort_quantize_dynamic_default``: ``MatMul``, ``Conv`` and ``Gather``,
so it also quantizes ViT's patch embedding and BERT's embedding tables) is printed beside
them, never compared as like for like. Each ONNX graph's integer and float weight ops are
recorded, so the coverage actually deployed can be checked.

slimkit variants: int8 per-channel weights with per-token activations (``slimkit_token``) or
per-tensor ones (``slimkit_tensor``: exact u8 x u8 products; ``slimkit_tensor_7bit``: 7-bit
weight codes run by ORT's faster u8 x s8 kernel), exported to ONNX. Every quantizer that
calibrates gets the same calibration tensor: ``--calib`` class-stratified, shuffled training
images (seed 0), never a prefix of the label-sorted training set. Training and quantization
see the data with its test split hidden (:func:`slimkit.data.guard.hide_test`).

Reported: mean per-sample cosine of the outputs vs FP32 (target >= 0.995) with a bootstrap
95% interval of the paired per-sample difference to each peer (a "beats" verdict says whether
it exceeds the noise), test accuracy with Wilson 95% intervals (ViT) and exact McNemar tests
against FP32 and between slimkit and each peer, ONNX sizes, each ONNX
graph's integer and float weight ops (the coverage actually deployed), slimkit's
ORT-vs-PyTorch parity, and latencies over ``--rounds`` interleaved rounds in one process with
a fixed thread count (ORT sessions side by side; PyTorch eager FP32 vs torch peers), as
median paired ratios with ~95% intervals. No quantizer setting is chosen (every variant is
reported); the test split is read once, at the end. Prints JSON and saves it to
benchmarks/results/quant_transformer.json (``--quick``: smoke run, not saved).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _common import data_record, emit, settings_record  # noqa: I001
from quant_cnn import train_on_validation
from torch import nn

from slimkit.core.files import write_json
from slimkit.data import calibration_subset, load_data
from slimkit.data.guard import hide_test
from slimkit.export.onnx import check_parity, export_onnx
from slimkit.io import batch as B
from slimkit.io import load_artifact
from slimkit.io.loader import load_zoo
from slimkit.io.model import SlimModel
from slimkit.measure.latency import (
    ort_session,
    ratio_ci,
    time_interleaved,
    torch_runner,
)
from slimkit.measure.stats import accuracy_ci, bootstrap_ci, mcnemar
from slimkit.quant.dynamic import DynamicQuantConfig, _dynamic_quant

RESULTS = Path(__file__).parent / "results" / "quant_transformer.json"
VARIANTS = {
    "slimkit_token": DynamicQuantConfig(activations="token"),
    "slimkit_tensor": DynamicQuantConfig(activations="tensor"),
    "slimkit_tensor_7bit": DynamicQuantConfig(activations="tensor", reduce_range=True),
}
#: ONNX ops that compute with integer weights, and float ops that hold a weight
INT_OPS = {"MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
           "DynamicQuantizeLinear", "QGemm", "QLinearMatMul"}
FLOAT_WEIGHT_OPS = {"MatMul", "Gemm", "Conv", "Gather"}


def cosines(ref: torch.Tensor, out: torch.Tensor) -> np.ndarray:
    """Per-sample cosine similarity of the outputs, float64."""
    return F.cosine_similarity(out.flatten(1).double(), ref.flatten(1).double(), dim=1).numpy()


def feed(sess: Any, x: torch.Tensor) -> dict[str, np.ndarray]:
    """ORT inputs for ``x``: a BERT graph also takes an all-ones attention mask and all-zero
    token types (what the PyTorch model assumes when given input ids only)."""
    extra = {"attention_mask": np.ones_like, "token_type_ids": np.zeros_like}
    xs = x.numpy()
    return {i.name: extra[i.name](xs) if i.name in extra else xs for i in sess.get_inputs()}


def named(path: Path, x: torch.Tensor) -> tuple | dict[str, torch.Tensor]:
    """``x`` as the ONNX graph names its inputs (a dict for a BERT graph, see :func:`feed`)."""
    sess = ort_session(path, 1)
    if len(sess.get_inputs()) == 1:
        return (x,)
    return {k: torch.from_numpy(v) for k, v in feed(sess, x).items()}


def ort_outputs(path: Path, x: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    sess = ort_session(path, 1)
    outs = [sess.run(None, feed(sess, x[i:i + chunk]))[0] for i in range(0, len(x), chunk)]
    return torch.from_numpy(np.concatenate(outs)).float()


def torch_outputs(module: nn.Module, x: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    module.eval()
    with torch.inference_mode():
        # the first output tensor (HF models return a ModelOutput: its logits)
        return torch.cat([B.select(module(x[i:i + chunk]))
                          for i in range(0, len(x), chunk)]).float()


def top1(logits: torch.Tensor, y: torch.Tensor | None) -> dict[str, Any] | None:
    if y is None:
        return None
    return accuracy_ci(int((logits.argmax(1) == y).sum()), len(y))


def correct(logits: torch.Tensor, y: torch.Tensor | None) -> np.ndarray | None:
    """Per-sample top-1 correctness (for the paired McNemar tests); None without labels."""
    return None if y is None else (logits.argmax(1) == y).numpy()


def make_tiny_bert(path: Path) -> None:
    """A small random BERT classifier saved as a Hugging Face directory (no download)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=512, num_labels=16,
                     max_position_embeddings=64, attn_implementation="eager")
    BertForSequenceClassification(cfg).eval().save_pretrained(path)


def graph_coverage(path: Path) -> dict[str, Any]:
    """Which ops of an ONNX graph compute with integer weights and which weighted ops stay
    float (a float ``MatMul``/``Gemm``/``Conv``/``Gather`` reading an initializer)."""
    import onnx

    g = onnx.load(str(path)).graph
    inits = {i.name for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT}
    ints: dict[str, int] = {}
    floats: dict[str, int] = {}
    for n in g.node:
        if n.op_type in INT_OPS:
            ints[n.op_type] = ints.get(n.op_type, 0) + 1
        elif n.op_type in FLOAT_WEIGHT_OPS and any(i in inits for i in n.input):
            floats[n.op_type] = floats.get(n.op_type, 0) + 1
    return {"integer_ops": ints, "float_weight_ops": floats}


def slimkit_variant(model: SlimModel, cfg: DynamicQuantConfig, calib: torch.Tensor,
                    tmp: Path, tag: str) -> tuple[SlimModel, Path, dict]:
    # The stage (dynamic_quant) calibrates on a stratified subset of a DataBundle; every
    # quantizer here gets the same calibration tensor, so the module-level function is used.
    module, rec = _dynamic_quant(model.module, cfg, calib_x=calib)
    q = model.copy(module)
    q.arch = None
    path = export_onnx(q, tmp / f"{tag}.onnx")
    return q, path, {"config": cfg.model_dump(), "kept_float": rec.skipped,
                     "layers": len(rec.details["layers"]),
                     "max_layer_error": max((e["output_rel_error"] or 0.0)
                                            for e in rec.details["layers"].values())}


def peers(model: SlimModel, fp32: Path, tmp: Path) -> dict[str, tuple[Path | nn.Module, dict]]:
    """The ORT (both coverages) and torch dynamic quantizers: (ONNX path or module, config)."""
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    out: dict[str, tuple[Path | nn.Module, dict]] = {}
    for tag, ops in (("same_coverage", ["MatMul"]), ("default", None)):
        path = tmp / f"ort_peer_{tag}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ort_quantize_dynamic(str(fp32), str(path), op_types_to_quantize=ops)
        out[f"ort_quantize_dynamic_{tag}"] = (path, {
            "call": "onnxruntime.quantization.quantize_dynamic", "op_types_to_quantize":
            ops or "default (MatMul, Conv, Gather, Attention, LSTM, EmbedLayerNormalization, "
                   "Transpose)", "weight_type": "QInt8 (default)", "per_channel": False,
            "reduce_range": False, "note": "ORT rewrites Gemm as MatMul before quantizing, "
                                          "so ['MatMul'] covers every Linear"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tq = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model.module), {nn.Linear},
                                                    dtype=torch.qint8)
    out["torch_quantize_dynamic_same_coverage"] = (tq, {
        "call": "torch.ao.quantization.quantize_dynamic", "dtype": "qint8",
        "qconfig_spec": ["nn.Linear"]})
    return out


def case(model: SlimModel, x: torch.Tensor, y: torch.Tensor | None, calib: torch.Tensor,
         args: argparse.Namespace, tmp: Path, extra: dict[str, DynamicQuantConfig] | None = None
         ) -> dict[str, Any]:
    """Fidelity, accuracy, sizes, coverage and latencies of every quantizer on one model."""
    model.module.eval()
    fp32_path = export_onnx(model, tmp / "fp32.onnx")
    ref = torch_outputs(model.module, x)
    res: dict[str, Any] = {"fp32": {"accuracy": top1(ref, y),
                                    "onnx_bytes": fp32_path.stat().st_size}}
    paths, cos, hits = {"fp32": fp32_path}, {}, {"fp32": correct(ref, y)}
    variants = {**VARIANTS, **(extra or {})}
    for tag, cfg in variants.items():
        q, path, info = slimkit_variant(model, cfg, calib, tmp, tag)
        got = ort_outputs(path, x)
        cos[tag], hits[tag] = cosines(ref, got), correct(got, y)
        res[tag] = {"cosine": float(cos[tag].mean()), "accuracy": top1(got, y),
                    "onnx_bytes": path.stat().st_size, "coverage": graph_coverage(path),
                    "parity_ort_vs_torch": check_parity(q, path, named(path, x[:16]), atol=1e-4),
                    **info}
        paths[tag] = path
    torch_peers = {}
    for tag, (obj, cfg) in peers(model, fp32_path, tmp).items():
        is_ort = isinstance(obj, Path)
        got = ort_outputs(obj, x) if is_ort else torch_outputs(obj, x)
        cos[tag], hits[tag] = cosines(ref, got), correct(got, y)
        res[tag] = {"cosine": float(cos[tag].mean()), "accuracy": top1(got, y),
                    "peer_config": cfg}
        if is_ort:
            res[tag] |= {"onnx_bytes": obj.stat().st_size, "coverage": graph_coverage(obj)}
            paths[tag] = obj
        else:
            torch_peers[tag] = obj
    res["latency"] = latencies(model.module, torch_peers, paths, x, args)
    res["_cosines"], res["_hits"] = cos, hits
    return res


def timed(fns: dict[str, Any], base: str, args: argparse.Namespace) -> dict[str, Any]:
    """Median ms and speed-up vs ``base`` (median paired ratio, ~95% CI) over rounds."""
    rounds = [time_interleaved(fns, warmup=5, repeats=args.repeats, keep_samples=True)
              for _ in range(args.rounds)]
    samples = {k: [t for r in rounds for t in r[k]["samples_ms"]] for k in fns}
    out = {}
    for k in fns:
        med, lo, hi = ratio_ci(samples[base], samples[k])
        out[k] = {"median_ms": float(np.median(samples[k])), f"speedup_vs_{base}": med,
                  "ci95": [lo, hi], "per_round": [r[base]["median_ms"] / r[k]["median_ms"]
                                                  for r in rounds]}
    return {"models": out, "samples": samples}


def latencies(fp32: nn.Module, tq: dict[str, nn.Module], paths: dict[str, Path],
              x: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """ORT sessions side by side, then PyTorch FP32 vs the torch peers, per batch size."""
    sessions = {k: ort_session(p, args.threads) for k, p in paths.items()}
    out: dict[str, Any] = {"threads": args.threads, "rounds": args.rounds,
                           "repeats_per_round": args.repeats,
                           "interval": "order-statistic ~95% CI of the median paired ratio",
                           "onnxruntime": {}, "torch": {}, "_samples": {}}
    for b in args.batches:
        xb = x[:b]
        t = timed({k: (lambda s=s, f=feed(s, xb): s.run(None, f)) for k, s in sessions.items()},
                  "fp32", args)
        out["onnxruntime"][str(b)] = t["models"]
        out["_samples"][str(b)] = t["samples"]
        t = timed({"fp32": torch_runner(fp32, (xb,)),
                   **{k: torch_runner(m, (xb,)) for k, m in tq.items()}}, "fp32", args)
        out["torch"][str(b)] = t["models"]
    return out


def verdict(res: dict[str, Any], ours: str) -> dict[str, Any]:
    """One slimkit variant against each peer: fidelity >= 0.995, fidelity difference (bootstrap
    interval of the paired per-sample cosine difference), ORT speed vs the ORT peers. Only
    the ``*_same_coverage`` peers are like for like; ORT's default coverage is printed too."""
    cos, hits = res["_cosines"], res["_hits"]
    out: dict[str, Any] = {"ours": ours, "cosine_ok": res[ours]["cosine"] >= 0.995}
    if hits[ours] is not None:  # labelled data: paired accuracy tests (exact McNemar)
        out["accuracy_vs_fp32"] = mcnemar(hits[ours], hits["fp32"])
    for peer in ("ort_quantize_dynamic_same_coverage", "torch_quantize_dynamic_same_coverage",
                 "ort_quantize_dynamic_default"):
        diff, lo, hi = bootstrap_ci(cos[ours] - cos[peer], rounds=2000)
        out[f"fidelity_vs_{peer}"] = {"cosine_difference": diff, "ci95": [lo, hi],
                                      "beats": diff > 0, "beyond_noise": lo > 0 or hi < 0}
        if hits[ours] is not None:
            out[f"accuracy_vs_{peer}"] = mcnemar(hits[ours], hits[peer])
    for peer in ("ort_quantize_dynamic_same_coverage", "ort_quantize_dynamic_default"):
        out[f"ort_speedup_vs_{peer}"] = {}
        for b, smp in res["latency"]["_samples"].items():
            med, lo, hi = ratio_ci(smp[peer], smp[ours])
            out[f"ort_speedup_vs_{peer}"][b] = {"median": med, "ci95": [lo, hi],
                                                "beyond_noise": lo > 1 or hi < 1}
    return out


def finish(res: dict[str, Any]) -> dict[str, Any]:
    """Criteria of every slimkit variant; drop the raw per-sample arrays from the record."""
    crit = {v: verdict(res, v) for v in VARIANTS}
    hits = res["_hits"]
    for k, h in hits.items():  # every row's accuracy against FP32 (McNemar), labelled data
        if h is not None and k != "fp32" and res[k].get("accuracy"):
            res[k]["accuracy"]["vs_fp32"] = mcnemar(h, hits["fp32"])
    del res["_cosines"], res["_hits"], res["latency"]["_samples"]
    return crit


def vit_model(args: argparse.Namespace, dev: Any) -> tuple[SlimModel, dict[str, Any]]:
    """The FP32 ViT: quant_int4.py's (``--vit-from``) or trained here, choices on validation."""
    if args.vit_from is not None:
        record = json.loads((args.vit_from / "train_record.json").read_text())
        return load_artifact(args.vit_from), record | {
            "loaded_from": "quant_int4.py --save-models (same data, seed and procedure)"}
    return train_on_validation(lambda: load_zoo("vit", dev), dev, args.epochs,
                               probe_steps=20 if args.quick else 150)


def vit_case(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any], Any]:
    data = load_data("builtin:fashion-mnist")
    if args.quick:  # smoke run: 5,000 training images, 2,000 test images
        import dataclasses

        from slimkit.data.split import calibration_indices

        idx = calibration_indices(data, 5000, seed=0)
        data = dataclasses.replace(data, x_train=data.x_train[idx], y_train=data.y_train[idx],
                                   x_test=data.x_test[:2000], y_test=data.y_test[:2000])
    dev = hide_test(data)
    torch.set_num_threads(args.train_threads)
    model, trained = vit_model(args, dev)
    torch.set_num_threads(args.threads)
    calib = calibration_subset(dev, args.calib, seed=0)  # stratified, shuffled training images
    extra = {"slimkit_token_head_float": DynamicQuantConfig(activations="token",
                                                            exclude=["head"])}
    (tmp / "vit").mkdir()
    res = case(model, data.x_test, data.y_test, calib, args, tmp / "vit", extra)
    res["training"] = trained
    return res, data


def hf_case(path: Path, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from slimkit.io.hf import load_hf_dir

    model = load_hf_dir(path, seq_len=args.seq_len)
    gen = torch.Generator().manual_seed(0)
    hf = getattr(model.module, "model", model.module)  # the HF module, wrapped or not
    vocab = int(hf.config.vocab_size)
    x = torch.randint(0, vocab, (args.hf_samples, args.seq_len), generator=gen)
    calib = torch.randint(0, vocab, (args.calib // 4, args.seq_len), generator=gen)
    (tmp / "hf").mkdir()
    res = case(model, x, None, calib, args, tmp / "hf")
    res["model"] = path.name  # a directory of this machine: its name only
    res["inputs"] = {"kind": "random token ids (torch.Generator seed 0)", "n": args.hf_samples,
                     "calibration_n": args.calib // 4, "seq_len": args.seq_len}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=5,
                    help="ViT: most training epochs (the best on validation is kept)")
    ap.add_argument("--vit-from", type=Path, default=None,
                    help="the FP32 ViT saved by quant_int4.py --save-models DIR (DIR/vit)")
    ap.add_argument("--train-threads", type=int, default=2, help="threads for training")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--hf", type=Path, default=None, help="a BERT-family HF model directory")
    ap.add_argument("--make-tiny-bert", type=Path, default=None,
                    help="write a small random BERT there first and use it as --hf")
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--hf-samples", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per model per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-vit", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 epoch, 2x3 calls")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.rounds, args.repeats, args.no_save = 1, 2, 3, True
    torch.set_num_threads(args.threads)
    if args.make_tiny_bert is not None:
        make_tiny_bert(args.make_tiny_bert)
        args.hf = args.make_tiny_bert
    settings = settings_record(args)
    result: dict[str, Any] = {"benchmark": "quant_transformer", "settings": settings,
                              "seeds": {"torch": 0, "calibration": 0, "validation_split": 0},
                              "models": {},
                              "criteria": {}}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_vit:
            result["models"]["vit"], data = vit_case(args, Path(tmp))
            result["data"] = data_record(data, calibration=f"{args.calib} class-stratified, "
                                         "shuffled training images (seed 0)",
                                         evaluated="test split, read once",
                                         choices="learning rate and epochs on validation")
            result["criteria"]["vit"] = finish(result["models"]["vit"])
        if args.hf is not None:
            result["models"]["hf"] = hf_case(args.hf, args, Path(tmp))
            result["criteria"]["hf"] = finish(result["models"]["hf"])
    emit(result)
    if not args.no_save:
        write_json(RESULTS, result)


if __name__ == "__main__":
    main()
