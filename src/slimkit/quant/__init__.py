"""Quantization: pure primitives, fake quantizers and quantized layers, calibration, PTQ, QAT."""

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

__all__ = [
    "FakeQuant",
    "Granularity",
    "QuantLayer",
    "choose_qparams",
    "dequantize",
    "fake_quantize",
    "pack",
    "qrange",
    "quantize",
    "reduce_range",
    "unpack",
]
