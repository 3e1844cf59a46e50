"""Weight sharing: zeros stay zero, at most 2^b values, centroid gradients, fine-tuning."""

import copy

import pytest
import torch
from tests._stages import stage_on
from torch import nn

from slimkit.core.errors import ConfigError
from slimkit.distill.run import FinetuneConfig
from slimkit.encode import EncodeConfig, apply_clusters, cluster_weights, share_weights
from slimkit.encode.cluster import plan_clusters
from slimkit.prune.magnitude import MagnitudePruneConfig, magnitude_prune
from slimkit.train import evaluate

LINEARS = ("1", "3", "5")


@pytest.fixture
def pruned(mlp) -> nn.Module:
    module, _ = stage_on(magnitude_prune, mlp.module, MagnitudePruneConfig(sparsity=0.8))
    return module


def _w(module: nn.Module, name: str) -> torch.Tensor:
    return dict(module.named_modules())[name].weight.detach()


@pytest.mark.parametrize("bits", [1, 3, 5])
def test_zeros_stay_zero_and_at_most_2_to_the_bits_values(pruned, bits):
    clustered, rec = cluster_weights(pruned, EncodeConfig(fc_bits=bits))
    for name in LINEARS:
        before, after = _w(pruned, name), _w(clustered, name)
        assert torch.equal(before == 0, after == 0), name
        assert torch.unique(after[after != 0]).numel() <= 2**bits
        assert rec.details["layers"][name]["clusters"] <= 2**bits
        # every weight took its nearest shared value
        values = torch.unique(after[after != 0])
        nearest = values[(before[before != 0, None] - values).abs().argmin(1)]
        torch.testing.assert_close(after[after != 0], nearest, rtol=0, atol=0)
    assert torch.equal(_w(pruned, "1"), _w(copy.deepcopy(pruned), "1"))  # input untouched


def test_plan_replays_and_clustering_twice_is_the_identity(pruned):
    cfg = EncodeConfig(fc_bits=4)
    clustered, rec = cluster_weights(pruned, cfg)
    fresh = copy.deepcopy(pruned)
    apply_clusters(fresh, rec.details["plan"])
    again, _ = cluster_weights(clustered, cfg)
    for name in LINEARS:
        assert torch.equal(_w(fresh, name), _w(clustered, name))
        assert torch.equal(_w(again, name), _w(clustered, name))


def test_centroid_gradient_is_the_per_cluster_sum_of_weight_gradients(pruned, digits):
    clustered, rec = cluster_weights(pruned, EncodeConfig(fc_bits=3))
    shared = copy.deepcopy(clustered)
    assignments = apply_clusters(shared, rec.details["plan"])
    share_weights(shared, assignments)
    x, y = digits.x_train[:64], digits.y_train[:64]
    nn.functional.cross_entropy(shared(x), y).backward()
    nn.functional.cross_entropy(clustered(x), y).backward()
    for name in LINEARS:
        layer = dict(shared.named_modules())[name]
        assert torch.equal(layer.weight, _w(clustered, name))
        idx, mask = assignments[name]
        grad_w = dict(clustered.named_modules())[name].weight.grad
        manual = torch.zeros(int(idx[mask].max()) + 1, dtype=torch.float64)
        manual.index_add_(0, idx[mask], grad_w[mask].double())
        got = layer.parametrizations.weight.original.grad
        torch.testing.assert_close(got.double(), manual, rtol=1e-5, atol=1e-8)


def test_finetuning_centroids_recovers_accuracy_and_keeps_the_structure(pruned, digits):
    plain, _ = cluster_weights(pruned, EncodeConfig(fc_bits=1))
    cfg = EncodeConfig(fc_bits=1, finetune=FinetuneConfig(epochs=1, lr=3e-3))
    tuned, rec = cluster_weights(pruned, cfg, data=digits)
    assert not any("parametrizations" in k for k in tuned.state_dict())
    for name in LINEARS:
        assert torch.equal(_w(pruned, name) == 0, _w(tuned, name) == 0)
        assert torch.unique(_w(tuned, name)[_w(tuned, name) != 0]).numel() <= 2
        assert not torch.equal(_w(plain, name), _w(tuned, name))
    assert (evaluate(tuned, digits.x_test, digits.y_test)
            > evaluate(plain, digits.x_test, digits.y_test))
    assert rec.details["finetune"]["steps"] > 0
    with pytest.raises(ConfigError, match="finetune needs data"):
        cluster_weights(pruned, cfg)


def test_float16_codebook_and_selectors(pruned):
    cfg = EncodeConfig(fc_bits=4, codebook_dtype="float16", exclude=["5"])
    clustered, rec = cluster_weights(pruned, cfg)
    w = _w(clustered, "1")
    assert torch.equal(w.half().float(), w)
    assert torch.equal(_w(clustered, "5"), _w(pruned, "5"))
    assert {"what": "5", "why": "excluded by the recipe"} in rec.skipped
    with pytest.raises(ConfigError, match="no layer of types"):
        plan_clusters(pruned, EncodeConfig(layer_types=["Conv2d"]))
