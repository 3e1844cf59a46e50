"""The ``encode`` config: weight sharing (k-means) and storage coding, Deep Compression style
(no torch here: recipes are validated before torch loads)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from slimkit.core.stages import StageConfig, stage_config
from slimkit.distill.config import FinetuneConfig

CONV_TYPES = ("Conv1d", "Conv2d", "Conv3d")
FC_TYPES = ("Linear",)
Coder = Literal["auto", "huffman", "ans"]
CodebookDtype = Literal["float32", "float16"]


@stage_config
class EncodeConfig(StageConfig):
    """Cluster each layer's non-zero weights into ``2^bits`` shared values, then code them.

    Han et al., "Deep Compression" (ICLR 2016): k-means per layer with linear initialization,
    fine-tuning of the shared centroids, then the sparse positions as relative offsets and the
    cluster indices, both entropy coded. Pruned (zero) weights stay exactly zero.

    Example:
        >>> EncodeConfig(conv_bits=8, fc_bits=5, coder="auto")  # doctest: +ELLIPSIS
        EncodeConfig(kind='encode', ...)
    """

    kind: Literal["encode"] = "encode"
    version: Literal[1] = Field(1, description="Config schema version.")
    conv_bits: int = Field(8, ge=1, le=8,
                           description="Convolutions share 2^conv_bits values per layer.")
    fc_bits: int = Field(5, ge=1, le=8,
                         description="Linear layers share 2^fc_bits values per layer.")
    index_bits_conv: int = Field(
        8, ge=1, le=12, description="Width of a relative position offset in convolutions; "
                                    "a longer gap gets filler entries.")
    index_bits_fc: int = Field(
        5, ge=1, le=12, description="Width of a relative position offset in Linear layers.")
    coder: Coder = Field(
        "auto", description="Entropy coder of the index and offset streams: huffman "
                            "(canonical), ans (constriction), or auto (the smaller one).")
    positions: Literal["auto", "offsets", "mask"] = Field(
        "auto", description="How the sparse positions are stored: offsets (relative, with "
                            "fillers, as in the paper), mask (the keep-mask under an adaptive "
                            "per-column model, ANS coded), or auto (the smaller per tensor; "
                            "offsets only when coder is huffman).")
    codebook_dtype: CodebookDtype = Field(
        "float32", description="How the shared values are stored; with float16 the centroids "
                               "are rounded to float16 so the model and the file agree.")
    max_iter: int = Field(
        100, ge=0, description="Most k-means (Lloyd) iterations per layer, from the linear "
                               "initialization; 0 keeps the linear centroids (a uniform "
                               "quantizer, which entropy codes to fewer bits than k-means).")
    layer_types: list[str] = Field([*FC_TYPES, *CONV_TYPES],
                                   description="Module types whose weights are clustered.")
    include: list[str] = Field(default_factory=list,
                               description="Only these layers (name, re:REGEX or type:Class).")
    exclude: list[str] = Field(default_factory=list,
                               description="Leave these layers alone (name, re:REGEX, type:).")
    finetune: FinetuneConfig | None = Field(
        None, description="Fine-tune the shared centroids (gradients summed per cluster), "
                          "optionally distilled from the model before the stage.")

    def bits_for(self, layer_type: str) -> tuple[int, int]:
        """``(cluster bits, offset index bits)`` for a module type name."""
        if layer_type in CONV_TYPES:
            return self.conv_bits, self.index_bits_conv
        return self.fc_bits, self.index_bits_fc

    def needs_data(self) -> str | None:
        return "finetune needs data" if self.finetune is not None else None
