"""Quantization: pure primitives, fake quantizers and quantized layers, calibration, PTQ,
dynamic and weight-only (RTN/GPTQ) quantization, QAT (LSQ, binary, ternary), mixed precision."""

from slimkit.quant.dynamic import DynamicQuantConfig, dynamic_quant
from slimkit.quant.mixed import MixedPrecisionConfig, mixed_precision
from slimkit.quant.modules import FakeQuant, QuantLayer
from slimkit.quant.primitives import (
    Granularity,
    choose_qparams,
    dequantize,
    fake_quantize,
    pack,
    qrange,
    quantize,
    reduce_range,
    unpack,
)
from slimkit.quant.ptq import PtqConfig, ptq
from slimkit.quant.qat import QatConfig, qat
from slimkit.quant.weight_only import WeightOnlyConfig, weight_only_quant

__all__ = [
    "DynamicQuantConfig",
    "FakeQuant",
    "Granularity",
    "MixedPrecisionConfig",
    "PtqConfig",
    "QatConfig",
    "QuantLayer",
    "WeightOnlyConfig",
    "choose_qparams",
    "dequantize",
    "dynamic_quant",
    "fake_quantize",
    "mixed_precision",
    "pack",
    "ptq",
    "qat",
    "qrange",
    "quantize",
    "reduce_range",
    "unpack",
    "weight_only_quant",
]
