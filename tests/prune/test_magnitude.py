import numpy as np
import pytest
import torch
from tests._stages import stage_on

from slimkit.core.errors import ConfigError
from slimkit.prune.magnitude import MagnitudePruneConfig, apply_plan, magnitude_prune
from slimkit.train.loop import TrainConfig


def _weights(module):
    return {n: m.weight.detach().clone() for n, m in module.named_modules()
            if isinstance(m, torch.nn.Linear)}


def test_global_prunes_exactly_the_smallest_magnitudes(mlp):
    before = _weights(mlp.module)
    pruned, rec = stage_on(magnitude_prune, mlp.module, MagnitudePruneConfig(sparsity=0.7))
    after = _weights(pruned)
    # numpy reference: one global threshold over all selected weights
    flat = np.concatenate([w.abs().numpy().ravel() for w in before.values()])
    k = round(0.7 * flat.size)
    threshold = np.sort(flat)[k - 1]
    zeros = sum(int((w == 0).sum()) for w in after.values())
    assert zeros == k
    for name, w in before.items():
        kept = after[name] != 0
        assert torch.all(w.abs()[kept] >= threshold)
        torch.testing.assert_close(after[name][kept], w[kept], rtol=0, atol=0)
    assert len(rec.changed) == 3 and rec.details["plan"]["layers"]


def test_layer_scope_prunes_each_layer_equally_and_input_is_untouched(mlp):
    before = _weights(mlp.module)
    pruned, rec = stage_on(magnitude_prune, mlp.module,
                           MagnitudePruneConfig(sparsity=0.5, scope="layer"))
    for w in _weights(pruned).values():
        assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=1 / w.numel())
    for name, w in _weights(mlp.module).items():
        torch.testing.assert_close(w, before[name], rtol=0, atol=0)


def test_zero_sparsity_is_the_identity(mlp):
    pruned, _ = stage_on(magnitude_prune, mlp.module, MagnitudePruneConfig(sparsity=0.0))
    x = mlp.example_inputs(4)
    torch.testing.assert_close(pruned(*x), mlp.module(*x), rtol=0, atol=0)


def test_exclude_and_unknown_layer_names(mlp):
    pruned, rec = stage_on(magnitude_prune, mlp.module,
                           MagnitudePruneConfig(sparsity=0.8, exclude=["5"]))
    assert torch.count_nonzero(pruned[5].weight) == mlp.module[5].weight.numel()
    assert rec.skipped == [{"what": "5", "why": "excluded by the recipe"}]
    with pytest.raises(ConfigError, match="'re:fc.*' matches no layer"):
        stage_on(magnitude_prune, mlp.module,
                 MagnitudePruneConfig(sparsity=0.5, exclude=["re:fc.*"]))
    with pytest.raises(ConfigError, match="no layer of types"):
        stage_on(magnitude_prune, mlp.module,
                 MagnitudePruneConfig(sparsity=0.5, layer_types=["Conv2d"]))


def test_plan_replays_on_a_fresh_copy(mlp):
    import copy

    pruned, rec = stage_on(magnitude_prune, mlp.module, MagnitudePruneConfig(sparsity=0.6))
    fresh = copy.deepcopy(mlp.module)
    apply_plan(fresh, rec.details["plan"])
    for (n, a), b in zip(_weights(pruned).items(), _weights(fresh).values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_finetune_keeps_pruned_weights_at_zero_and_recovers(mlp, digits):
    from slimkit.train.loop import evaluate

    cfg = MagnitudePruneConfig(sparsity=0.9)
    no_ft, _ = stage_on(magnitude_prune, mlp.module, cfg)
    cfg_ft = MagnitudePruneConfig(sparsity=0.9, finetune=TrainConfig(epochs=2, lr=1e-3))
    ft, rec = stage_on(magnitude_prune, mlp.module, cfg_ft, data=digits)
    for a, b in zip(_weights(no_ft).values(), _weights(ft).values(), strict=True):
        assert torch.equal(a == 0, b == 0)
    assert evaluate(ft, digits.x_test, digits.y_test) > evaluate(no_ft, digits.x_test,
                                                                  digits.y_test)
    assert len(rec.details["finetune"]["epochs"]) == 2
    with pytest.raises(ConfigError, match="finetune needs data"):
        stage_on(magnitude_prune, mlp.module, cfg_ft)


def test_sparsity_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="less than 1"):
        MagnitudePruneConfig(sparsity=1.0)
