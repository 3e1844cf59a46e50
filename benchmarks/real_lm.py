"""Weight-only INT4 (RTN, GPTQ) of a GPT-2 trained here on real text: the stdlib's source.

A small GPT-2 (``transformers.GPT2LMHeadModel`` from a config: byte vocabulary 256, context
256) is trained with slimkit's own loop on the Python standard library's ``.py`` files
(:func:`slimkit.data.corpus.stdlib_corpus`: split by file; the checkpoint is picked on
``val``; ``test`` is read once per reported model). Then the ``weight_only_quant`` stage packs
its matmul weights to 4-bit symmetric group-wise codes by round-to-nearest and by GPTQ
(calibrated on the first ``--calib`` sequences of the train split).

Variants (the same trained model each time, ``slimkit.wrap(model)`` as transformers builds
it; GPT-2's matmuls are ``transformers.pytorch_utils.Conv1D``, weight ``[in, out]``, which
the stage converts to ``nn.Linear`` itself, recorded):

- ``as_it_comes``: the stage's defaults. ``lm_head`` *is* the token embedding (tied), so the
  stage leaves it float and says why. The headline numbers.
- ``with_head``: ``lm_head`` named in ``include`` as well: it is packed, the float embedding
  table stays for the input lookup, and the record counts no float bytes freed for it.

Reported: test perplexity FP32 / RTN / GPTQ (PyTorch; ONNX Runtime on the first batches),
bytes of the matmul weights (state tensors, shared ones counted once) and the record's
per-layer totals, the artifact weight file and the ONNX file, ONNX Runtime latency FP32 vs
INT4 (``com.microsoft::MatMulNBits``) at batch 1 and 8, sequence 256, timed interleaved with
paired-ratio confidence intervals, and wall times. Goals (issue 15): GPTQ INT4 perplexity at
most 5% above FP32, matmul weights at least 6x smaller. Prints JSON and saves it to
benchmarks/results/real_lm.json (``--quick``: a tiny smoke run, nothing saved).
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import emit  # noqa: I001
from torch import nn

import slimkit
from slimkit.core.files import write_json
from slimkit.core.stages import STAGES, StageContext
from slimkit.data.corpus import stdlib_corpus
from slimkit.data.stream import StreamData
from slimkit.export.onnx import export_checked
from slimkit.io import save_artifact
from slimkit.io.model import SlimModel
from slimkit.io.onnx_model import ort_session
from slimkit.measure.latency import ort_runner, ratio_ci, time_interleaved
from slimkit.measure.tasks import get_task
from slimkit.quant.config import WeightOnlyConfig
from slimkit.quant.packed import PackedLinear
from slimkit.train import TrainConfig, fit
from slimkit.train.config import EarlyStopping

RESULTS = Path(__file__).parent / "results" / "real_lm.json"
FULL = {"embd": 256, "layers": 4, "heads": 4, "seq": 256, "batch": 16, "epochs": 3,
        "train_bytes": 700_000, "val_bytes": 131_072, "test_bytes": 262_144, "calib": 256,
        "repeats": 20, "ort_ppl_batches": 4}
QUICK = {"embd": 64, "layers": 2, "heads": 2, "seq": 64, "batch": 8, "epochs": 2,
         "train_bytes": 12_000, "val_bytes": 2_048, "test_bytes": 4_096, "calib": 32,
         "repeats": 3, "ort_ppl_batches": 2}
GOAL_PPL_INCREASE, GOAL_RATIO = 0.05, 6.0


def build_model(a: argparse.Namespace) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(a.seed)
    cfg = GPT2Config(vocab_size=256, n_positions=a.seq, n_embd=a.embd, n_layer=a.layers,
                     n_head=a.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0, use_cache=False)
    return GPT2LMHeadModel(cfg)


def train(model: nn.Module, data: StreamData, a: argparse.Namespace) -> dict[str, Any]:
    """slimkit's loop, the checkpoint with the best val perplexity restored.

    ``fit`` evaluates its data's ``test`` split after every epoch; the view it gets has the
    val split in that place, so the real test split is not read before the end.
    """
    view = StreamData(data.name, train=data.train, val=data.val, test=data.val,
                      task="causal_lm")
    cfg = TrainConfig(epochs=a.epochs, batch_size=a.batch, lr=a.lr, optimizer="adamw",
                      weight_decay=0.01, warmup_steps=a.warmup, grad_clip=1.0, seed=a.seed,
                      early_stopping=EarlyStopping(patience=a.epochs, restore_best=True))
    start = time.perf_counter()
    out = fit(model, view, cfg, progress=False)
    val = [e["val_perplexity"] for e in out["epochs"]]
    return {"config": cfg.model_dump(mode="json"), "steps": out["steps"],
            "tokens": out["steps"] * a.batch * a.seq,
            "epochs": [{"epoch": e["epoch"], "train_loss": e["loss"],
                        "val_perplexity": e["val_perplexity"], "seconds": e["seconds"]}
                       for e in out["epochs"]],
            "chosen_epoch": 1 + val.index(min(val)), "seconds": time.perf_counter() - start}


def _unique_bytes(tensors: list[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def matmul_bytes(module: nn.Module) -> dict[str, int]:
    """Stored bytes of the matmul layers inside the transformer blocks (weights or codes,
    scales, biases), of ``lm_head`` apart from the token embedding it may share, and of the
    whole state (each shared tensor once)."""
    from transformers.pytorch_utils import Conv1D

    kinds = (nn.Linear, Conv1D, PackedLinear)
    wte = module.get_input_embeddings().weight
    blocks = [t for n, m in module.named_modules() if isinstance(m, kinds) and n != "lm_head"
              for t in m.state_dict().values()]
    head = [t for t in module.lm_head.state_dict().values()
            if t.untyped_storage().data_ptr() != wte.untyped_storage().data_ptr()]
    return {"block_matmuls": _unique_bytes(blocks), "lm_head_own": _unique_bytes(head),
            "model_state": _unique_bytes(list(module.state_dict().values()))}


def perplexity(module: nn.Module, data: StreamData, batches: int | None = None) -> float:
    """Test perplexity (``batches``: only the first ones)."""
    task = get_task("causal_lm")
    return task.evaluate(module, lambda: itertools.islice(data.batches("test"), batches)
                         )["perplexity"]


def quantize(model: SlimModel, data: StreamData, cfg: WeightOnlyConfig,
             ) -> tuple[SlimModel, dict[str, Any]]:
    start = time.perf_counter()
    q, rec = STAGES.get("weight_only_quant").apply(model, cfg, StageContext(data=data,
                                                                          progress=False))
    seconds = time.perf_counter() - start
    layers = rec.details["layers"]
    errs = [e["output_rel_error"] for e in layers.values() if "output_rel_error" in e]
    fp, got = matmul_bytes(model.module), matmul_bytes(q.module)
    totals = rec.details["totals"]
    return q, {"seconds": seconds, "layers_packed": list(layers),
               "conv1d_converted": len(rec.details.get("conv1d_to_linear", [])),
               "record_totals": totals,
               # The record's saving is the state's real one (tied tensors counted once).
               "record_saving_is_real": (fp["model_state"] - got["model_state"]
                                         == totals["bytes_before"] - totals["bytes_after"]),
               "fallbacks": {n: e["fallback"] for n, e in layers.items() if e.get("fallback")},
               "mean_output_rel_error": sum(errs) / len(errs) if errs else None,
               "mean_output_rel_error_rtn": _mean([e.get("output_rel_error_rtn")
                                                   for e in layers.values()]),
               "skipped": rec.skipped}


def _mean(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return sum(got) / len(got) if got else None


class OrtLM(nn.Module):
    """An ONNX Runtime session seen as a module returning logits (for the task's metric)."""

    def __init__(self, session: Any) -> None:
        super().__init__()
        self.session = session

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        feed = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        return torch.from_numpy(self.session.run(None, feed)[0])


def onnx_case(model: SlimModel, path: Path) -> dict[str, Any]:
    """Export with slimkit's parity check; file and initializer bytes, op counts."""
    import onnx

    start = time.perf_counter()
    res = export_checked(model, path, overwrite=True)
    graph = onnx.load(str(path)).graph
    ops: dict[str, int] = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"bytes": res["bytes"], "parity_ok": res["parity"]["ok"],
            "parity_max_abs_diff": res["parity"]["max_abs_diff"],
            "initializer_bytes": sum(i.ByteSize() for i in graph.initializer),
            "matmulnbits": ops.get("MatMulNBits", 0), "matmul": ops.get("MatMul", 0),
            "gemm": ops.get("Gemm", 0), "seconds": time.perf_counter() - start}


def latency(paths: dict[str, Path], a: argparse.Namespace) -> dict[str, Any]:
    """ORT latency of each file at batch 1 and 8, sequence ``a.seq``, interleaved."""
    sessions = {n: ort_session(p, a.ort_threads) for n, p in paths.items()}
    gen = torch.Generator().manual_seed(1)
    out: dict[str, Any] = {"threads": a.ort_threads, "seq": a.seq}
    for b in (1, 8):
        ids = torch.randint(0, 256, (b, a.seq), generator=gen)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        fns = {n: ort_runner(s, inputs) for n, s in sessions.items()}
        t = time_interleaved(fns, warmup=3, repeats=a.repeats, keep_samples=True)
        ratio, lo, hi = ratio_ci(t["int4"]["samples_ms"], t["fp32"]["samples_ms"])
        out[f"batch_{b}"] = {**{n: {k: v for k, v in s.items() if k != "samples_ms"}
                                for n, s in t.items()},
                             "int4_over_fp32": ratio, "ci95": [lo, hi]}
    return out


def headline_variant(base: SlimModel, data: StreamData, a: argparse.Namespace, tmp: Path,
                     fp32_ppl: float) -> dict[str, Any]:
    """The headline: RTN and GPTQ of GPT-2 as it comes, the tied lm_head left float."""
    cfg = WeightOnlyConfig(bits=4, group_size=a.group, calib_samples=a.calib, calib_batch=16)
    res: dict[str, Any] = {"config": cfg.model_dump(mode="json")}
    models = {}
    for method in ("rtn", "gptq"):
        q, info = quantize(base, data, cfg.model_copy(update={"method": method}))
        info["test_perplexity"] = perplexity(q.module, data)
        info["perplexity_increase"] = info["test_perplexity"] / fp32_ppl - 1
        info["bytes"] = matmul_bytes(q.module)
        res[method], models[method] = info, q
    fp = matmul_bytes(base.module)
    res["bytes_fp32"] = fp
    res["block_matmul_ratio"] = fp["block_matmuls"] / res["gptq"]["bytes"]["block_matmuls"]
    res["model_state_ratio"] = fp["model_state"] / res["gptq"]["bytes"]["model_state"]
    res["artifact_weights_bytes"] = {
        "fp32": _artifact_bytes(base, tmp / "fp32-art"),
        "int4": _artifact_bytes(models["gptq"], tmp / "int4-art")}
    res["onnx"] = {"fp32": onnx_case(base, tmp / "fp32.onnx"),
                   "int4": onnx_case(models["gptq"], tmp / "int4.onnx")}
    n = a.ort_ppl_batches
    res["ort_check"] = {"batches": n,
                        "torch_fp32": perplexity(base.module, data, n),
                        "torch_int4": perplexity(models["gptq"].module, data, n),
                        "ort_fp32": perplexity(OrtLM(ort_session(tmp / "fp32.onnx", a.threads)),
                                               data, n),
                        "ort_int4": perplexity(OrtLM(ort_session(tmp / "int4.onnx", a.threads)),
                                               data, n)}
    start = time.perf_counter()
    res["latency_ort"] = latency({"fp32": tmp / "fp32.onnx", "int4": tmp / "int4.onnx"}, a)
    res["latency_ort"]["seconds"] = time.perf_counter() - start
    return res


def _artifact_bytes(model: SlimModel, path: Path) -> int | str:
    try:
        return (save_artifact(model, path) / "weights.safetensors").stat().st_size
    except Exception as exc:  # reported, not hidden: the benchmark's other numbers stand
        return f"{type(exc).__name__}: {exc}"


def head_variant(model: SlimModel, data: StreamData, a: argparse.Namespace,
                 fp32_ppl: float) -> dict[str, Any]:
    """GPTQ with the tied lm_head named in include: packed, its bytes counted honestly."""
    cfg = WeightOnlyConfig(bits=4, group_size=a.group, calib_samples=a.calib, calib_batch=16,
                           method="gptq", include=["lm_head", r"re:transformer\.h\..*"])
    q, info = quantize(model, data, cfg)
    info["test_perplexity"] = perplexity(q.module, data)
    info["perplexity_increase"] = info["test_perplexity"] / fp32_ppl - 1
    info["bytes"], info["bytes_fp32"] = matmul_bytes(q.module), matmul_bytes(model.module)
    info["lm_head_tied_after"] = (q.module.lm_head.weight
                                  is q.module.get_input_embeddings().weight
                                  if isinstance(q.module.lm_head, nn.Linear) else False)
    return info


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny smoke run; nothing saved")
    for key, value in FULL.items():
        ap.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--group", type=int, default=128, help="group size (<= 128)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (training)")
    ap.add_argument("--ort-threads", type=int, default=1, help="ORT threads (latency)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args()
    for key, value in (QUICK if a.quick else FULL).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    return a


def main() -> None:
    a = parse()
    wall = time.perf_counter()
    torch.set_num_threads(a.threads)
    data = stdlib_corpus(seq_len=a.seq, batch_size=a.batch, max_bytes={
        "train": a.train_bytes, "val": a.val_bytes, "test": a.test_bytes})
    model = build_model(a)
    # The corpus root is a path on this machine: the meta's "python" version names it.
    meta = {k: v for k, v in data.meta.items() if k != "root"}
    result: dict[str, Any] = {"benchmark": "real_lm", "quick": a.quick, "data": meta,
                              "model": {k: getattr(a, k) for k in ("embd", "layers", "heads",
                                                                   "seq")}}
    result["model"]["params"] = sum(p.numel() for p in model.parameters())
    result["training"] = train(model, data, a)
    hf = slimkit.wrap(model)  # as transformers builds it: Conv1D matmuls, tied lm_head
    start = time.perf_counter()
    fp32_ppl = perplexity(model, data)
    result["fp32_test_perplexity"] = fp32_ppl
    result["fp32_eval_seconds"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        result["as_it_comes"] = headline_variant(hf, data, a, Path(tmp), fp32_ppl)
    result["with_head"] = head_variant(hf, data, a, fp32_ppl)
    main_v = result["as_it_comes"]
    result["goals"] = {
        "gptq_ppl_increase_le_5pct": main_v["gptq"]["perplexity_increase"] <= GOAL_PPL_INCREASE,
        "block_matmuls_6x_smaller": main_v["block_matmul_ratio"] >= GOAL_RATIO,
    }
    result["wall_seconds"] = time.perf_counter() - wall
    emit(result)
    if not (a.quick or a.no_save):
        write_json(RESULTS, result)


if __name__ == "__main__":
    main()
