"""The ``lowrank`` config: which layers to factorize, how, and at what rank (no torch here:
recipes are validated before torch loads)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from slimkit.core.stages import StageConfig, stage_config
from slimkit.distill.config import FinetuneConfig

LinearMethod = Literal["svd", "none"]
ConvMethod = Literal["tucker2", "cp", "spatial", "svd", "none"]
RankRule = Literal["energy", "ratio", "vbmf", "sensitivity"]


@stage_config
class LowRankConfig(StageConfig):
    """Replace Linear and Conv layers by products of smaller layers (low-rank factorization).

    Linear layers use truncated SVD (Denton et al. 2014); convolutions use Tucker-2
    (Kim et al. 2016), CP (Lebedev et al. 2015), spatially separable filters (Jaderberg et al.
    2014, scheme 2) or a channel SVD of the kernel (Zhang et al. 2015). A layer is only
    factorized when the result is smaller than the dense layer by at least ``margin``.

    Example:
        >>> LowRankConfig(rank="ratio", ratio=0.4, conv="tucker2", exclude=["head"])
    """

    kind: Literal["lowrank"] = "lowrank"
    version: Literal[1] = Field(1, description="Config schema version.")
    linear: LinearMethod = Field(
        "svd", description="Linear layers: svd (two Linear layers, U·V) or none (left alone).")
    conv: ConvMethod = Field(
        "tucker2", description="Conv layers: tucker2 (1x1 -> kxk core -> 1x1), cp (1x1 -> "
        "depthwise kx1 -> depthwise 1xk -> 1x1), spatial (kx1 then 1xk), svd (kxk conv to "
        "rank channels, then 1x1) or none. 1x1 convs always use svd.")
    rank: RankRule = Field(
        "energy", description="How ranks are chosen: energy (keep this fraction of the sum of "
        "squared singular values), ratio (keep this fraction of each layer's weights), vbmf "
        "(empirical variational Bayes, Nakajima et al. 2013) or sensitivity (smallest rank "
        "whose relative output error on a calibration batch is below tolerance).")
    energy: float = Field(0.9, gt=0.0, le=1.0,
                          description="rank=energy: fraction of squared singular values kept.")
    ratio: float = Field(0.5, gt=0.0, lt=1.0,
                         description="rank=ratio: target fraction of each layer's weights kept.")
    tolerance: float = Field(0.05, gt=0.0, lt=1.0,
                             description="rank=sensitivity: largest relative output error "
                                         "||f(x; W_hat) - f(x; W)|| / ||f(x; W)|| allowed.")
    margin: float = Field(0.1, ge=0.0, lt=1.0,
                          description="Never-larger rule: a layer is factorized only when its "
                                      "factors hold fewer than (1 - margin) x its weights.")
    ranks: dict[str, list[int]] = Field(
        default_factory=dict, description="Explicit ranks by exact layer name, overriding "
        "the rank rule: [r] for svd/cp/spatial, [r_out, r_in] for tucker2.")
    include: list[str] = Field(default_factory=list,
                               description="Only these layers (name, re:REGEX or type:Class).")
    exclude: list[str] = Field(default_factory=list,
                               description="Leave these layers alone (name, re:REGEX, type:).")
    calib_samples: int = Field(64, ge=1, description="Training samples used as the calibration "
                                                     "batch (sensitivity, latency check).")
    check_latency: bool = Field(
        False, description="Time each layer dense vs factorized (torch eager, interleaved) and "
                           "keep the dense layer when the factorized one is not faster.")
    latency_batch: int = Field(1, ge=1, description="Batch size of the per-layer latency check.")
    latency_repeats: int = Field(30, ge=3, description="Timed runs per form in the latency check.")
    n_iter: int = Field(100, ge=1, description="Most iterations of CP-ALS and Tucker HOOI.")
    iter_tol: float = Field(1e-6, gt=0.0, lt=1.0, description="CP-ALS and HOOI stop when the "
                            "relative reconstruction error changes by less than this.")
    seed: int = Field(0, description="Seed of the iterative decompositions (CP-ALS, HOOI) "
                                     "and of the calibration sample.")
    finetune: FinetuneConfig | None = Field(
        None, description="Fine-tune afterwards (optionally distilled from the original model).")

    @field_validator("ranks")
    @classmethod
    def _positive_ranks(cls, ranks: dict[str, list[int]]) -> dict[str, list[int]]:
        for name, rank in ranks.items():
            if not 1 <= len(rank) <= 2 or any(r < 1 for r in rank):
                raise ValueError(f"rank of '{name}' must be [r] or [r_out, r_in] with "
                                 f"positive integers, got {rank}")
        return ranks

    def needs_data(self) -> str | None:
        if self.finetune is not None:
            return "finetune needs data"
        if self.rank == "sensitivity" and not self.ranks:
            return "rank 'sensitivity' needs calibration data"
        return None
