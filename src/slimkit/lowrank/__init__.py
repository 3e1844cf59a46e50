"""Low-rank factorization: SVD for Linear layers; Tucker-2, CP, spatial and SVD for convs.

Plan, then apply: :func:`plan_lowrank` chooses a method and a rank per layer (a JSON plan),
:func:`apply_lowrank` replays it on a copy, and :func:`lowrank` does both, records what changed
and optionally fine-tunes. Factorizers live in ``FACTORIZERS``, rank rules in ``RANK_RULES``.
Names are imported on first use (see :mod:`slimkit.core.lazy`); the config needs no torch.
"""

from slimkit.core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "slimkit.lowrank.base": ("FACTORIZERS", "Factorizer", "relative_error"),
    "slimkit.lowrank.config": ("LowRankConfig",),
    "slimkit.lowrank.plan": ("apply_lowrank", "plan_lowrank"),
    "slimkit.lowrank.ranks": ("RANK_RULES", "RankChoice", "RankRequest"),
    "slimkit.lowrank.run": ("lowrank",),
    "slimkit.lowrank.vbmf": ("EVBMFResult", "evbmf"),
})
