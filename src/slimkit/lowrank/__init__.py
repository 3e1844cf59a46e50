"""Low-rank factorization: SVD for Linear layers; Tucker-2, CP, spatial and SVD for convs.

Plan, then apply: :func:`plan_lowrank` chooses a method and a rank per layer (a JSON plan),
:func:`apply_lowrank` replays it on a copy, and :func:`lowrank` does both, records what changed
and optionally fine-tunes. Factorizers live in ``FACTORIZERS``, rank rules in ``RANK_RULES``.
"""

from slimkit.lowrank.base import FACTORIZERS, Factorizer, relative_error
from slimkit.lowrank.config import LowRankConfig
from slimkit.lowrank.plan import apply_lowrank, plan_lowrank
from slimkit.lowrank.ranks import RANK_RULES, RankChoice, RankRequest
from slimkit.lowrank.run import lowrank
from slimkit.lowrank.vbmf import EVBMFResult, evbmf

__all__ = [
    "FACTORIZERS",
    "RANK_RULES",
    "EVBMFResult",
    "Factorizer",
    "LowRankConfig",
    "RankChoice",
    "RankRequest",
    "apply_lowrank",
    "evbmf",
    "lowrank",
    "plan_lowrank",
    "relative_error",
]
