"""The quantization stages' configs, and the checks on their values.

This module imports no torch: recipes are validated against these configs before torch or any
model is loaded. Calibration method and quantizer names are looked up in their registries,
imported when a config names one. The techniques live beside them: ``dynamic``, ``mixed``,
``ptq``, ``qat``, ``weight_only``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from slimkit.core.errors import ConfigError, did_you_mean
from slimkit.core.stages import StageConfig, stage_config
from slimkit.distill.config import FinetuneConfig


def check_group_size(group_size: int) -> int:
    """Validate a group size: 0 (one group per row) or a power of two >= 16.

    Raises:
        ConfigError: any other value.
    """
    if group_size != 0 and (group_size < 16 or group_size & (group_size - 1)):
        raise ConfigError(f"group_size {group_size} must be 0 (one group per output row) or a "
                          "power of two >= 16 (ONNX Runtime's MatMulNBits needs such blocks)")
    return group_size


@stage_config
class DynamicQuantConfig(StageConfig):
    """Dynamic INT8: int8 per-channel weights, activations quantized at run time per row or
    per tensor; sensitive layers can stay float.

    Example:
        >>> DynamicQuantConfig(activations="token", exclude=["head"], keep_worst=1)
    """

    kind: Literal["dynamic_quant"] = "dynamic_quant"
    version: Literal[1] = Field(1, description="Config schema version.")
    activations: Literal["token", "tensor"] = Field(
        "token", description="Activation scale per row/token of the flattened input (token: "
        "closest to float, but its per-row quantization is ~20 elementwise ONNX ops per layer, "
        "so in ONNX Runtime it can be slower than FP32 on small models) or one per tensor "
        "(tensor: ONNX DynamicQuantizeLinear, fused by ONNX Runtime into one kernel; the fast "
        "choice, with reduce_range on CPUs without VNNI).")
    include: list[str] = Field(default_factory=list,
                               description="Only these layers (name, re:REGEX or type:Class).")
    exclude: list[str] = Field(default_factory=list,
                               description="Keep these layers float (name, re:REGEX, type:).")
    keep_worst: int = Field(0, ge=0, description="Keep float the layers with the largest "
                            "relative output error on calibration data (needs data).")
    max_layer_error: float | None = Field(
        None, gt=0.0, description="Keep float every layer whose relative output error "
        "||y_q - y|| / ||y|| on calibration data exceeds this (needs data).")
    reduce_range: bool = Field(
        False, description="7-bit weight codes [-63, 63] (still int8): ONNX Runtime then uses "
        "its faster u8 x s8 kernel, which on CPUs without VNNI saturates with full-range int8 "
        "weights; without it the export runs exact u8 x u8 products.")
    calib_samples: int = Field(64, ge=1, description="Training samples used to measure the "
                               "layers' output errors.")
    calib_batch: int = Field(16, ge=1, description="Batch size of the calibration pass.")
    seed: int = Field(0, description="Seed of the calibration subset.")

    def needs_data(self) -> str | None:
        if self.keep_worst or self.max_layer_error is not None:
            return "keep_worst / max_layer_error need calibration data"
        return None


@stage_config
class MixedPrecisionConfig(StageConfig):
    """Choose a weight width per layer from measured sensitivities.

    Example:
        >>> MixedPrecisionConfig(policy="size", size_ratio=0.15)          # 15% of float bytes
        >>> MixedPrecisionConfig(policy="fallback", max_accuracy_drop=0.5)
    """

    kind: Literal["mixed_precision"] = "mixed_precision"
    version: Literal[1] = Field(1, description="Config schema version.")
    policy: Literal["fallback", "size"] = Field(
        "size", description="fallback: all layers at the highest width, most sensitive ones "
                            "back to float until max_accuracy_drop holds; size: widths under "
                            "a weight byte budget.")
    bits: list[int] = Field([8, 4, 2], description="Candidate weight widths (float is "
                                                   "always a candidate).")
    sensitivity: Literal["mse", "cosine", "accuracy"] = Field(
        "mse", description="Per-layer damage: relative output MSE, 1 - output cosine (on the "
                           "calibration batch) or top-1 drop on the evaluation data.")
    max_accuracy_drop: float = Field(1.0, ge=0, description="fallback: largest top-1 drop "
                                                            "vs float allowed, in points.")
    size_bytes: int | None = Field(None, ge=1, description="size: weight bytes budget.")
    size_ratio: float | None = Field(None, gt=0, le=1, description="size: budget as a "
                                                                   "fraction of float bytes.")
    act_bits: int | None = Field(None, ge=2, le=8, description="Also quantize each quantized "
                                                               "layer's input (per tensor, "
                                                               "min/max); None: weights only.")
    include: list[str] = Field(default_factory=list,
                               description="Only these layers (name, re:REGEX or type:Class).")
    exclude: list[str] = Field(default_factory=list,
                               description="Keep these layers in float (name, re:, type:).")
    calib_samples: int = Field(256, ge=1, description="Training samples for sensitivities and "
                                                      "activation ranges.")
    eval_samples: int | None = Field(None, ge=1, description="Samples of the validation "
                                 "slice (20% of the training split) that choices are made on, "
                                 "and of the test split the result is reported on; all by "
                                 "default.")

    @field_validator("bits")
    @classmethod
    def _widths(cls, bits: list[int]) -> list[int]:
        if not bits or any(b not in (2, 4, 8) for b in bits):
            raise ValueError(f"bits must be a non-empty subset of [8, 4, 2], got {bits}")
        return sorted(set(bits), reverse=True)

    @model_validator(mode="after")
    def _budget(self) -> MixedPrecisionConfig:
        if self.policy == "size" and (self.size_bytes is None) == (self.size_ratio is None):
            raise ValueError("policy 'size' needs exactly one of size_bytes or size_ratio")
        return self

    def needs_data(self) -> str | None:
        return "needs calibration and evaluation data"


@stage_config
class PtqConfig(StageConfig):
    """Static post-training quantization to INT8 (integer kernels in ONNX Runtime).

    Example:
        >>> PtqConfig(calibration="percentile", percentile=99.99, num_samples=256)
    """

    kind: Literal["ptq"] = "ptq"
    version: Literal[1] = Field(1, description="Config schema version.")
    calibration: str = Field("percentile", description="Activation range method: minmax, "
                             "percentile, mse or entropy (the CALIBRATORS registry).")
    percentile: float = Field(99.99, gt=50.0, le=100.0,
                              description="calibration=percentile: clip at this percentile.")
    num_samples: int = Field(512, ge=1, description="Calibration samples (class-stratified "
                                                    "from the training set).")
    batch_size: int = Field(64, ge=1, description="Calibration batch size.")
    weight_bits: int = Field(8, ge=2, le=8, description="Weight code width (ONNX Runtime's "
                             "integer kernels need 8; fewer bits export as float weights).")
    weight_granularity: Literal["channel", "tensor"] = Field(
        "channel", description="Weight scales per output channel or per tensor.")
    weight_narrow: bool = Field(True, description="Symmetric weights in [-127, 127] (no -128).")
    reduce_range: bool = Field(
        True, description="8-bit weights use 7 bits ([-63, 63], still stored as int8) so that "
        "u8 x s8 products never saturate ONNX Runtime's AVX2 kernels (vpmaddubsw) on x86 CPUs "
        "without VNNI; without it those CPUs compute wrong outputs. Turn off for VNNI or ARM "
        "targets.")
    activations: Literal["uint8", "int8"] = Field(
        "uint8", description="Activation codes, asymmetric per tensor: uint8 (ORT's fast x86 "
        "u8s8 path) or int8 (ORT 1.32 on x86 fuses no QLinearConv for int8 activations: convs "
        "then run in float; the stage record's ort_int8 shows it).")
    min_conv_reduction: int = Field(
        64, ge=0, description="Convolutions whose reduction size (in_channels / groups x "
        "kernel area) is below this stay float: ONNX Runtime's integer conv is slower than its "
        "float conv there (measured with ORT 1.32 on x86 AVX2: 2.4x slower at 25 (a first conv "
        "on 1-channel images), 3-5x at 27 (RGB 3x3), 1.1x faster at 72, 2.8x at 144). 0 "
        "quantizes every conv. That rule is per conv: a network of many depthwise and thin "
        "1x1 convs pays more for the float islands (Q/DQ pairs, layout transposes) than it "
        "saves: HF MobileNetV2 at 50% FLOPs ran 1.51x [1.46, 1.52] faster in ORT at batch 32 "
        "with 0 than with 64 (benchmarks/ptq_depthwise.py), so use 0 there.")
    fold_bn: bool = Field(True, description="Fold BatchNorm into the preceding layer first.")
    equalize: bool = Field(False, description="Cross-layer equalization of conv->relu->conv "
                                              "pairs (Nagel et al. 2019) before quantizing.")
    bias_correction: bool = Field(False, description="Subtract the mean output error caused by "
                                                     "weight rounding (Nagel et al. 2019).")
    smoothquant: bool = Field(False, description="Migrate activation outliers into the weights "
                                                 "of LayerNorm->Linear pairs (Xiao et al. 2023).")
    smoothquant_alpha: float = Field(0.5, ge=0.0, le=1.0, description="SmoothQuant strength.")
    include: list[str] = Field(default_factory=list,
                               description="Only these layers (name, re:REGEX or type:Class).")
    exclude: list[str] = Field(default_factory=list,
                               description="Leave these layers in float (name, re:, type:).")
    seed: int = Field(0, description="Seed of the calibration subset.")

    @field_validator("calibration")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from slimkit.quant.observers import CALIBRATORS  # torch: only when a recipe names one

        if v not in CALIBRATORS:
            raise ValueError(f"unknown calibration method '{v}'; known: "
                             f"{', '.join(CALIBRATORS.names())}.{did_you_mean(v, CALIBRATORS)}")
        return v

    def needs_data(self) -> str | None:
        return "needs calibration data"


@stage_config
class QatConfig(StageConfig):
    """Quantization-aware training: fake-quantize, fine-tune, then freeze integer weights.

    Weights are quantized per output channel (symmetric), activations (each quantized
    layer's input) per tensor. With ``weight_quantizer="lsq"`` (Esser et al. 2019) the step
    sizes are learned together with the weights; ``affine`` keeps them fixed at their
    initial value (plain STE QAT); ``binary`` / ``ternary`` train BWN / TWN weights (see
    :mod:`slimkit.quant.extreme`). Fine-tuning runs the shared training loop (distillation
    from the float model with ``finetune.distill``). At the end the learned scales become
    fixed qparams and the weights integer codes, so the result exports like a PTQ model.

    Example:
        >>> QatConfig(weight_bits=4, act_bits=8, finetune={"epochs": 2, "lr": 1e-4})
    """

    kind: Literal["qat"] = "qat"
    version: Literal[1] = Field(1, description="Config schema version.")
    weight_bits: int = Field(4, ge=2, le=8, description="Weight code width (2..8; ignored by "
                                                        "binary and ternary).")
    weight_quantizer: str = Field(
        "lsq", description="Weight quantizer: lsq (learned step), affine (fixed step), "
                           "binary (1 bit, BWN) or ternary (2 bits, TWN).")
    weight_granularity: str = Field("channel", description="tensor or channel[:AXIS] (one "
                                                           "scale per output channel).")
    weight_init: Literal["lsq", "range"] = Field(
        "lsq", description="Initial weight step: lsq (2 mean|w| / sqrt(qmax)) or range "
                           "(min/max, i.e. round-to-nearest).")
    act_bits: int | None = Field(8, ge=2, le=8, description="Activation (layer input) width; "
                                                            "None quantizes weights only.")
    act_quantizer: Literal["lsq", "affine"] = Field(
        "lsq", description="Activation quantizer: lsq (learned step) or affine (fixed).")
    act_symmetric: bool = Field(False, description="Symmetric signed activations (else "
                                                   "asymmetric unsigned with a zero point).")
    first_last_bits: int | None = Field(
        None, ge=2, le=8, description="Quantize the first and last selected layers at this "
                                      "width with LSQ instead (binary/ternary networks keep "
                                      "them at 8 bits).")
    pack: bool = Field(True, description="Store <= 4-bit weight codes bit-packed (two INT4 "
                                         "per byte, four 2-bit codes per byte) instead of one "
                                         "int8 each; binary/ternary are always packed.")
    include: list[str] = Field(default_factory=list,
                               description="Only these layers (name, re:REGEX or type:Class).")
    exclude: list[str] = Field(default_factory=list,
                               description="Leave these layers in float (name, re:, type:).")
    calib_samples: int = Field(256, ge=1, description="Training samples of the activation "
                                                      "range calibration pass.")
    act_calibration: str = Field("minmax", description="How activation ranges start: a "
                                 "calibration method (minmax, percentile, mse, entropy).")
    finetune: FinetuneConfig = Field(
        default_factory=FinetuneConfig,
        description="The QAT fine-tuning (optionally distilled from the float model).")

    @field_validator("weight_quantizer")
    @classmethod
    def _known_quantizer(cls, name: str) -> str:
        from slimkit.quant.plan import QUANTIZERS  # torch: only when a recipe names one

        if name not in QUANTIZERS:
            raise ValueError(f"unknown weight quantizer '{name}'; known: "
                             f"{', '.join(QUANTIZERS.names())}")
        return name

    def needs_data(self) -> str | None:
        return "needs training data"


@stage_config
class WeightOnlyConfig(StageConfig):
    """Weight-only quantization to packed 2..8-bit group-wise codes.

    Activations stay float; each weight row is cut into groups of ``group_size`` input
    columns with their own scale (and zero point). ``method="rtn"`` rounds to nearest;
    ``method="gptq"`` (Frantar et al. 2023) compensates each column's rounding error on the
    remaining columns using the layer's input Hessian from calibration data (Linear layers;
    convolutions and embedding tables are rounded to nearest, and the record says so).
    Linear layers run as ONNX Runtime's ``MatMulNBits``; packed convs and embedding tables
    are unpacked by ONNX Runtime once, when the session loads.

    Example:
        >>> WeightOnlyConfig(bits=4, group_size=128, method="gptq", exclude=["head"])
    """

    kind: Literal["weight_only_quant"] = "weight_only_quant"
    version: Literal[1] = Field(1, description="Config schema version.")
    bits: int = Field(4, ge=2, le=8, description="Code width in bits (2..8); 2 and 4 pack "
                      "4 and 2 codes per byte, 3 is stored in 4-bit and 5..7 in 8-bit slots.")
    group_size: int = Field(128, ge=0, description="Input columns sharing one scale: a power "
                            "of two >= 16, or 0 for one group per output row. A layer whose "
                            "width is not a multiple gets its last group zero-padded "
                            "(reported per layer).")
    symmetric: bool = Field(True, description="Zero point fixed at the middle of the range "
                            "(else per-group zero points covering [min, max]).")
    method: Literal["rtn", "gptq"] = Field("rtn", description="rtn: round to nearest; gptq: "
                                           "second-order error compensation (needs data).")
    scale_dtype: Literal["float16", "float32"] = Field(
        "float16", description="Storage type of the per-group scales and of the layer's "
        "bias (computed in float32 either way).")
    layer_types: list[Literal["Linear", "Conv", "Embedding"]] = Field(
        default_factory=lambda: ["Linear"], min_length=1,
        description="Kinds of layers to pack: Linear, Conv (1/2/3-d, weight seen as "
        "out x in*kernel) and Embedding (tables packed row-wise). Linear only by default: "
        "a 4-bit input layer (a ViT's patch embedding) can cost accuracy; opt in per model.")
    include: list[str] = Field(default_factory=list,
                               description="Only these layers (name, re:REGEX or type:Class).")
    exclude: list[str] = Field(default_factory=list,
                               description="Leave these layers float (name, re:REGEX, type:).")
    calib_samples: int = Field(128, ge=1, description="Training samples used for calibration "
                               "(GPTQ Hessians, output-error report).")
    calib_batch: int = Field(32, ge=1, description="Batch size of the calibration passes.")
    percdamp: float = Field(0.01, ge=0.0, le=1.0, description="GPTQ dampening, as a fraction "
                            "of the Hessian's mean diagonal.")
    gptq_blocksize: int = Field(128, ge=1, description="GPTQ lazy-batch width in columns.")
    act_order: bool = Field(False, description="GPTQ: quantize columns by decreasing Hessian "
                            "diagonal (group qparams then fixed from the original weights).")
    damp_tries: int = Field(4, ge=0, le=10, description="GPTQ: times the dampening is raised "
                            "tenfold when the Hessian is not positive definite, before the "
                            "layer falls back to round-to-nearest.")
    seed: int = Field(0, description="Seed of the calibration subset.")

    @field_validator("group_size")
    @classmethod
    def _valid_group(cls, v: int) -> int:
        try:
            return check_group_size(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    def needs_data(self) -> str | None:
        return "method 'gptq' needs calibration data" if self.method == "gptq" else None
