import pytest
import torch
from tests._stages import stage_on
from torch import nn

from slimkit.core.errors import ConfigError
from slimkit.distill.run import FinetuneConfig
from slimkit.prune.nm import NMPruneConfig, nm_mask, nm_prune


def test_two_of_four_by_hand():
    w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 1.0, -1.0, 0.2],
                      [-0.4, 0.3, 0.2, -0.1, 0.0, 5.0, 0.0, -6.0]])
    expected = torch.tensor([[0, 1, 1, 0, 1, 1, 0, 0],  # tie 1, 1, -1: earlier ones win
                             [1, 1, 0, 0, 0, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(nm_mask(w, 2, 4), expected)


def _groups(w: torch.Tensor, m: int) -> torch.Tensor:
    """Reference grouping: input dim last, then groups of m (independent of nm.py)."""
    if w.dim() == 4:
        w = w.permute(0, 2, 3, 1)
    return w.reshape(-1, m)


@pytest.mark.parametrize("shape", [(6, 16), (4, 8, 3, 3)])
def test_every_group_keeps_exactly_the_n_largest(shape):
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=torch.float64)
    mask = nm_mask(w, 2, 4)
    groups, kept = _groups(w.abs(), 4), _groups(mask, 4)
    assert (kept.sum(1) == 2).all()
    for g, k in zip(groups, kept, strict=True):
        ref = sorted(range(4), key=lambda i: -float(g[i]))[:2]
        assert sorted(torch.nonzero(k).flatten().tolist()) == sorted(ref)


def test_nm_prune_skips_odd_widths_and_finetunes_with_fixed_masks(digits):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10),
                        nn.ReLU(), nn.Linear(10, 10))
    cfg = NMPruneConfig(finetune=FinetuneConfig(max_steps=15, batch_size=64))
    pruned, rec = stage_on(nm_prune, net, cfg, digits)
    assert rec.details["plan"]["layers"] == ["1", "3"]
    assert rec.skipped == [{"what": "5", "why": "input width 10 is not a multiple of m=4 "
                                                 "(not padded)"}]
    for name in ("1", "3"):
        kept = _groups(dict(pruned.named_modules())[name].weight != 0, 4)
        assert (kept.sum(1) == 2).all()
        assert rec.details["layers"][name]["sparsity"] == pytest.approx(0.5)
    assert torch.count_nonzero(pruned[5].weight) == net[5].weight.numel()
    assert "dense speed" in rec.details["speed_note"]
    assert torch.count_nonzero(net[1].weight) == net[1].weight.numel()  # input untouched


def test_config_errors(mlp):
    with pytest.raises(ValueError):
        NMPruneConfig(n=4, m=4)
    with pytest.raises(ConfigError, match="needs data"):
        stage_on(nm_prune, mlp.module, NMPruneConfig(finetune=FinetuneConfig(epochs=1)))
