"""Dynamic INT8 on transformers: slimkit against ONNX Runtime's and PyTorch's dynamic quantizers.

Models: zoo:vit (dim 64, depth 4) trained briefly on builtin:mnist, and optionally any
BERT-family Hugging Face directory (``--hf DIR``; ``--make-tiny-bert DIR`` writes one from a
small random BertConfig first, for a smoke run without downloads). Inputs of the HF model are
random token ids (no labels, so no accuracy there).

Compared on the same FP32 model:
- slimkit ``dynamic_quant``: int8 per-channel weights with per-token activations
  (``slimkit_token``) or per-tensor ones (``slimkit_tensor``: exact u8 x u8 products;
  ``slimkit_tensor_7bit``: 7-bit weight codes run by ORT's faster u8 x s8 kernel), exported to
  ONNX (DynamicQuantizeLinear / per-row quantization + MatMulInteger);
- ``onnxruntime.quantization.quantize_dynamic`` on the same FP32 ONNX file (default options);
- ``torch.ao.quantization.quantize_dynamic`` (deprecated; the peer only, run in PyTorch).

Reported: mean per-sample cosine of the outputs vs FP32 (target >= 0.995), accuracy (ViT),
ONNX sizes, slimkit's ORT-vs-PyTorch parity, and latencies measured interleaved in one
process with a fixed thread count (ORT: FP32 / slimkit / ORT peer; PyTorch eager: FP32 /
torch peer). Prints JSON and saves it to benchmarks/results/quant_transformer.json.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _common import emit  # noqa: I001
from torch import nn

from slimkit.core.files import write_json
from slimkit.data import load_data
from slimkit.export.onnx import check_parity, export_onnx
from slimkit.io.loader import load_zoo
from slimkit.io.model import SlimModel
from slimkit.measure.latency import ort_runner, ort_session, time_interleaved, torch_runner
from slimkit.quant.dynamic import DynamicQuantConfig, _dynamic_quant
from slimkit.train import TrainConfig, evaluate, fit

RESULTS = Path(__file__).parent / "results" / "quant_transformer.json"
VARIANTS = {
    "slimkit_token": DynamicQuantConfig(activations="token"),
    "slimkit_tensor": DynamicQuantConfig(activations="tensor"),
    "slimkit_tensor_7bit": DynamicQuantConfig(activations="tensor", reduce_range=True),
}


def cosine(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(F.cosine_similarity(out.flatten(1).double(), ref.flatten(1).double(),
                                     dim=1).mean())


def ort_outputs(path: Path, x: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    sess = ort_session(path, 1)
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i:i + chunk].numpy()})[0] for i in range(0, len(x), chunk)]
    return torch.from_numpy(np.concatenate(outs)).float()


def torch_outputs(module: nn.Module, x: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    module.eval()
    with torch.inference_mode():
        return torch.cat([module(x[i:i + chunk]) for i in range(0, len(x), chunk)]).float()


def top1(logits: torch.Tensor, y: torch.Tensor | None) -> float | None:
    return None if y is None else float((logits.argmax(1) == y).float().mean())


def make_tiny_bert(path: Path) -> None:
    """A small random BERT classifier saved as a Hugging Face directory (no download)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=512, num_labels=16,
                     max_position_embeddings=64, attn_implementation="eager")
    BertForSequenceClassification(cfg).eval().save_pretrained(path)


def slimkit_variant(model: SlimModel, cfg: DynamicQuantConfig, calib: torch.Tensor,
                    tmp: Path, tag: str) -> tuple[SlimModel, Path, dict]:
    # The stage (dynamic_quant) calibrates on a stratified subset of a DataBundle; every
    # quantizer here gets the same calibration tensor, so the module-level function is used.
    module, rec = _dynamic_quant(model.module, cfg, calib_x=calib)
    q = model.copy(module)
    q.arch = None
    path = export_onnx(q, tmp / f"{tag}.onnx")
    return q, path, {"kept_float": rec.skipped, "layers": len(rec.details["layers"]),
                     "max_layer_error": max((e["output_rel_error"] or 0.0)
                                            for e in rec.details["layers"].values())}


def case(model: SlimModel, x: torch.Tensor, y: torch.Tensor | None, calib: torch.Tensor,
         args: argparse.Namespace, tmp: Path, variants: dict[str, DynamicQuantConfig]
         ) -> dict[str, Any]:
    """Fidelity, accuracy, sizes and latencies of every quantizer on one model."""
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    model.module.eval()
    fp32_path = export_onnx(model, tmp / "fp32.onnx")
    ref = torch_outputs(model.module, x)
    res: dict[str, Any] = {"fp32": {"accuracy": top1(ref, y),
                                    "onnx_bytes": fp32_path.stat().st_size}}
    paths = {"fp32": fp32_path}
    for tag, cfg in variants.items():
        q, path, info = slimkit_variant(model, cfg, calib, tmp, tag)
        got = ort_outputs(path, x)
        res[tag] = {"cosine": cosine(ref, got), "accuracy": top1(got, y),
                    "onnx_bytes": path.stat().st_size,
                    "parity_ort_vs_torch": check_parity(q, path, (x[:16],), atol=1e-4), **info}
        paths[tag] = path
    peer = tmp / "ort_peer.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ort_quantize_dynamic(str(fp32_path), str(peer))
    got = ort_outputs(peer, x)
    res["ort_quantize_dynamic"] = {"cosine": cosine(ref, got), "accuracy": top1(got, y),
                                   "onnx_bytes": peer.stat().st_size}
    paths["ort_quantize_dynamic"] = peer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tq = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model.module), {nn.Linear},
                                                    dtype=torch.qint8)
    got = torch_outputs(tq, x)
    res["torch_quantize_dynamic"] = {"cosine": cosine(ref, got), "accuracy": top1(got, y)}
    res["latency"] = latencies(model.module, tq, paths, x, args)
    return res


def latencies(fp32: nn.Module, tq: nn.Module, paths: dict[str, Path], x: torch.Tensor,
              args: argparse.Namespace) -> dict[str, Any]:
    """Median ms, interleaved: ORT sessions side by side, then PyTorch FP32 vs torch peer."""
    sessions = {k: ort_session(p, args.threads) for k, p in paths.items()}
    out: dict[str, Any] = {"threads": args.threads, "onnxruntime": {}, "torch": {}}
    for b in args.batches:
        xb = x[:b]
        t = time_interleaved({k: ort_runner(s, (xb,)) for k, s in sessions.items()},
                             warmup=5, repeats=args.repeats)
        med = {k: v["median_ms"] for k, v in t.items()}
        out["onnxruntime"][str(b)] = {"median_ms": med, "speedup_vs_fp32": {
            k: med["fp32"] / v for k, v in med.items()}}
        t = time_interleaved({"fp32": torch_runner(fp32, (xb,)),
                              "torch_quantize_dynamic": torch_runner(tq, (xb,))},
                             warmup=5, repeats=args.repeats)
        med = {k: v["median_ms"] for k, v in t.items()}
        out["torch"][str(b)] = {"median_ms": med,
                                "speedup_vs_fp32": med["fp32"] / med["torch_quantize_dynamic"]}
    return out


def verdict(res: dict[str, Any], ours: str) -> dict[str, Any]:
    """Criteria for one model: fidelity >= 0.995, beats both peers, ORT at least as fast."""
    lat = res["latency"]["onnxruntime"]
    return {
        "ours": ours, "cosine_ok": res[ours]["cosine"] >= 0.995,
        "beats_ort_peer_fidelity": res[ours]["cosine"] > res["ort_quantize_dynamic"]["cosine"],
        "beats_torch_peer_fidelity": res[ours]["cosine"]
        > res["torch_quantize_dynamic"]["cosine"],
        "ort_latency_ratio_vs_ort_peer": {
            b: v["median_ms"]["ort_quantize_dynamic"] / v["median_ms"][ours]
            for b, v in lat.items()},
        "ort_latency_ratio_vs_torch_peer_eager": {
            b: res["latency"]["torch"][b]["median_ms"]["torch_quantize_dynamic"]
            / v["median_ms"][ours] for b, v in lat.items()},
    }


def vit_case(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    data = load_data("builtin:mnist")
    torch.manual_seed(0)
    model = load_zoo("vit", data)
    fit(model.module, data, TrainConfig(epochs=args.epochs, lr=2e-3), progress=False)
    model.module.eval()
    calib = data.x_train[: args.calib]
    variants = {**VARIANTS, "slimkit_token_head_float": DynamicQuantConfig(
        activations="token", exclude=["head"])}
    (tmp / "vit").mkdir()
    res = case(model, data.x_test, data.y_test, calib, args, tmp / "vit", variants)
    res["fp32"]["accuracy_check"] = evaluate(model.module, data.x_test, data.y_test)
    res["epochs"] = args.epochs
    return res


def hf_case(path: Path, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from slimkit.io.hf import load_hf_dir

    model = load_hf_dir(path, seq_len=args.seq_len)
    gen = torch.Generator().manual_seed(0)
    vocab = int(model.module.model.config.vocab_size)
    x = torch.randint(0, vocab, (args.hf_samples, args.seq_len), generator=gen)
    calib = torch.randint(0, vocab, (args.calib // 4, args.seq_len), generator=gen)
    (tmp / "hf").mkdir()
    res = case(model, x, None, calib, args, tmp / "hf", VARIANTS)
    res["model"] = path.name  # a directory of this machine: its name only
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--hf", type=Path, default=None, help="a BERT-family HF model directory")
    ap.add_argument("--make-tiny-bert", type=Path, default=None,
                    help="write a small random BERT there first and use it as --hf")
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--hf-samples", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-vit", action="store_true")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.make_tiny_bert is not None:
        make_tiny_bert(args.make_tiny_bert)
        args.hf = args.make_tiny_bert
    result: dict[str, Any] = {"benchmark": "quant_transformer", "models": {}, "criteria": {}}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_vit:
            result["models"]["vit"] = vit_case(args, Path(tmp))
            result["criteria"]["vit"] = {v: verdict(result["models"]["vit"], v)
                                         for v in VARIANTS}
        if args.hf is not None:
            result["models"]["hf"] = hf_case(args.hf, args, Path(tmp))
            result["criteria"]["hf"] = {v: verdict(result["models"]["hf"], v) for v in VARIANTS}
    emit(result)
    if not args.no_save:
        write_json(RESULTS, result)


if __name__ == "__main__":
    main()
