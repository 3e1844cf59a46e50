"""Quantization: pure primitives, fake quantizers and quantized layers, calibration, PTQ,
dynamic and weight-only (RTN/GPTQ) quantization, QAT (LSQ, binary, ternary), mixed precision.

Names are imported on first use (see :mod:`slimkit.core.lazy`); the configs need no torch.
"""

from slimkit.core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "slimkit.quant.config": ("DynamicQuantConfig", "MixedPrecisionConfig", "PtqConfig",
                             "QatConfig", "WeightOnlyConfig"),
    "slimkit.quant.dynamic": ("dynamic_quant",),
    "slimkit.quant.mixed": ("mixed_precision",),
    "slimkit.quant.modules": ("FakeQuant", "QuantLayer"),
    "slimkit.quant.primitives": ("Granularity", "choose_qparams", "dequantize", "fake_quantize",
                                 "pack", "qrange", "quantize", "reduce_range", "unpack"),
    "slimkit.quant.ptq": ("ptq",),
    "slimkit.quant.qat": ("qat",),
    "slimkit.quant.weight_only": ("weight_only_quant",),
})
