"""Should PTQ quantize depthwise convs? ONNX Runtime latency of three PTQ settings on the same
structurally pruned (50% FLOPs) Hugging Face MobileNetV2 at 3x224x224.

* ``min_conv_reduction_64``: the PtqConfig default; convs whose reduction size (in_channels /
  groups x kernel area) is below 64 stay float: every 3x3 depthwise conv (9) and the RGB stem
  conv (27) sit as float islands between quantized 1x1 convs;
* ``min_conv_reduction_0``: every conv quantized: one integer chain (QLinearConv, QLinearAdd);
* ``min_conv_reduction_0_stem_float``: the same with only the stem conv left float.

Each variant is exported to ONNX; the optimized graph's op counts (ONNX Runtime's
``optimized_model_filepath``) show the float islands' extra QuantizeLinear/DequantizeLinear,
layout Reorder and Transpose nodes. Latency: one thread, batch 32, the FP32 baseline and the
variants timed interleaved in one process; speedups are median paired ratios against the FP32
baseline with a distribution-free 95% interval (``slimkit.measure.latency.ratio_ci``). Random
weights (BatchNorm statistics estimated on random images, as in real_vision.py): speed only.

Run it alone (``flock /tmp/slimkit-bench.lock``); saves benchmarks/results/ptq_depthwise.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import emit  # noqa: I001
from real_vision import hf_mobilenetv2, random_images

from slimkit.core.files import write_json
from slimkit.core.stages import STAGES, StageContext
from slimkit.export.onnx import export_onnx
from slimkit.export.qdq import int8_ops
from slimkit.measure.latency import ratio_ci
from slimkit.train.bn import recalibrate_batchnorm

RESULTS = Path(__file__).parent / "results" / "ptq_depthwise.json"
STEM = "mobilenet_v2.conv_stem.first_conv.convolution"
VARIANTS = {"min_conv_reduction_64": {"min_conv_reduction": 64},
            "min_conv_reduction_0": {"min_conv_reduction": 0},
            "min_conv_reduction_0_stem_float": {"min_conv_reduction": 0, "exclude": [STEM]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--size", type=int, default=224, help="image size (smoke runs: 32)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import onnxruntime as ort

    torch.manual_seed(0)
    size = args.size
    model, _ = hf_mobilenetv2(size)
    data = random_images(size, 32, 32, named=True)
    recalibrate_batchnorm(model.module, data.head("train", 32)[0], batch_size=16)
    prune = STAGES.get("structured_prune")
    cfg = prune.config(kind="structured_prune", target={"flops": 0.5}, round_to=8)
    pruned, _ = prune.apply(model, cfg, StageContext(data=data, progress=False))
    ptq = STAGES.get("ptq")
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    sessions, ops = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        sessions["fp32"] = ort.InferenceSession(str(export_onnx(model, Path(tmp) / "b.onnx")),
                                                so, providers=["CPUExecutionProvider"])
        for name, over in VARIANTS.items():
            cfg = ptq.config(kind="ptq", num_samples=args.calib, batch_size=16, **over)
            q, _ = ptq.apply(pruned, cfg, StageContext(data=data, progress=False))
            path = export_onnx(q, Path(tmp) / f"{name}.onnx")
            ops[name] = int8_ops(path)["op_counts"]
            sessions[name] = ort.InferenceSession(str(path), so,
                                                  providers=["CPUExecutionProvider"])
    x = {"pixel_values": np.random.default_rng(0).standard_normal((32, 3, size, size),
                                                                  dtype=np.float32)}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, x)  # warm-up
    for _ in range(args.rounds):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, x)
            times[k].append(time.perf_counter() - t)
    variants: dict[str, Any] = {}
    for name in VARIANTS:
        med, lo, hi = ratio_ci(times["fp32"], times[name])
        variants[name] = {"ptq": VARIANTS[name], "ort_ms_median": 1e3 * float(np.median(
            times[name])), "speedup_vs_fp32": med, "speedup_ci95": [lo, hi],
            "ort_optimized_op_counts": ops[name]}
    a, b = times["min_conv_reduction_0"], times["min_conv_reduction_64"]
    d0_vs_d64 = ratio_ci(b, a)
    s0, s1 = times["min_conv_reduction_0"], times["min_conv_reduction_0_stem_float"]
    stem = ratio_ci(s1, s0)
    result = {"benchmark": "ptq_depthwise", "model": "HF MobileNetV2 (random weights), "
              "structured_prune flops 0.5 round_to 8", "input_shape": [3, size, size],
              "batch": 32, "threads": 1, "rounds": args.rounds,
              "fp32_ort_ms_median": 1e3 * float(np.median(times["fp32"])),
              "variants": variants,
              "reduction_0_vs_64_speedup": {"value": d0_vs_d64[0], "ci95": list(d0_vs_d64[1:])},
              "stem_int8_vs_float_speedup": {"value": stem[0], "ci95": list(stem[1:]),
                                             "within_noise": stem[1] <= 1 <= stem[2]}}
    emit(result)
    if size == 224:
        write_json(RESULTS, result)


if __name__ == "__main__":
    main()
