import pytest
import torch
from tests._stages import stage_on

from slimkit.core.errors import ConfigError
from slimkit.distill.run import FinetuneConfig
from slimkit.prune.schedule import (
    GradualPruneConfig,
    agp_sparsity,
    gradual_prune,
    magnitude_masks,
    plan_schedule,
)

TRAIN = FinetuneConfig(max_steps=40, batch_size=64, lr=1e-3)


def test_agp_formula_matches_zhu_and_gupta():
    s_i, s_f, t0, dt, n = 0.1, 0.9, 10, 5, 4
    for k in range(n + 1):
        t = t0 + k * dt
        expected = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3
        assert agp_sparsity(t, s_i, s_f, t0, dt, n) == pytest.approx(expected, abs=1e-12)
    assert agp_sparsity(0, s_i, s_f, t0, dt, n) == s_i
    assert agp_sparsity(1000, s_i, s_f, t0, dt, n) == pytest.approx(s_f)


def test_plan_fits_training_or_raises():
    cfg = GradualPruneConfig(final_sparsity=0.8, frequency=10, train=TRAIN)
    planned = plan_schedule(cfg, 40)
    assert [p["step"] for p in planned] == [0, 10, 20, 30]  # 0.75 * 40 // 10 = 3 updates
    assert planned[-1]["target"] == pytest.approx(0.8)
    with pytest.raises(ConfigError, match="schedule ends at step"):
        plan_schedule(cfg.model_copy(update={"num_updates": 10}), 40)


def test_global_masks_keep_the_largest_magnitudes():
    w = {"a": torch.tensor([[0.1, -0.5], [2.0, 0.0]]), "b": torch.tensor([[0.3, -0.2]])}
    masks = magnitude_masks(w, 0.5)  # 3 of 6 zeroed: 0.0, 0.1, -0.2
    assert masks["a"].tolist() == [[False, True], [True, False]]
    assert masks["b"].tolist() == [[True, False]]


def test_gradual_prune_follows_the_schedule_and_holds_masks(mlp, digits):
    cfg = GradualPruneConfig(final_sparsity=0.8, frequency=10, train=TRAIN)
    original = {k: v.clone() for k, v in mlp.module.state_dict().items()}
    pruned, rec = stage_on(gradual_prune, mlp.module, cfg, digits)
    sched = rec.details["schedule"]
    assert [f["step"] for f in sched["followed"]] == [p["step"] for p in sched["planned"]]
    for f in sched["followed"]:
        assert f["achieved"] == pytest.approx(f["target"], abs=1e-3)
    targets = [f["target"] for f in sched["followed"]]
    assert targets == sorted(targets)
    total = sum(m.weight.numel() for m in pruned.modules() if isinstance(m, torch.nn.Linear))
    zeros = sum(int((m.weight == 0).sum()) for m in pruned.modules()
                if isinstance(m, torch.nn.Linear))
    assert zeros / total == pytest.approx(0.8, abs=1e-3)  # held through the last fine-tune steps
    for k, v in mlp.module.state_dict().items():  # input untouched
        torch.testing.assert_close(v, original[k], rtol=0, atol=0)
    x = mlp.example_inputs(4)[0]
    assert torch.isfinite(pruned(x)).all()


def test_layer_scope_with_per_layer_targets(mlp, digits):
    cfg = GradualPruneConfig(final_sparsity=0.5, scope="layer", layer_sparsity={"1": 0.9},
                             frequency=10, train=TRAIN)
    pruned, rec = stage_on(gradual_prune, mlp.module, cfg, digits)
    layers = rec.details["layers"]
    assert layers["1"]["sparsity_after"] == pytest.approx(0.9, abs=1e-3)
    assert layers["3"]["sparsity_after"] == pytest.approx(0.5, abs=1e-3)
    for f in rec.details["schedule"]["followed"]:  # weighted mean of the layers' targets
        assert f["achieved"] == pytest.approx(f["target"], abs=1e-3)
    with pytest.raises(ConfigError, match="unknown layer"):
        stage_on(gradual_prune, mlp.module, cfg.model_copy(update={"layer_sparsity": {"fc9": 0.5}}),
                 digits)
    with pytest.raises(ValueError):
        GradualPruneConfig(final_sparsity=0.5, layer_sparsity={"1": 0.9})  # needs scope=layer


def test_masked_weights_hide_pruned_gradients_but_keep_the_dense_one():
    """Pruned weights get a zero gradient (no optimizer revival); the dense one is kept."""
    from slimkit.prune.magnitude import MaskedWeights

    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 3)
    mask = torch.rand(3, 6) > 0.5
    held = MaskedWeights({"fc": layer}, {"fc": mask})
    held.apply()
    held.attach()
    x = torch.randn(5, 6, dtype=torch.float64)
    layer.double()
    layer(x).pow(2).sum().backward()
    dense = held.dense_grad["fc"]
    torch.testing.assert_close(layer.weight.grad, dense * mask, rtol=0, atol=0)
    assert (dense[~mask] != 0).any() and (layer.weight[~mask] == 0).all()
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    held.apply()
    assert (layer.weight[~mask] == 0).all()
    held.detach()
    assert held.dense_grad == {}


def test_schedule_with_explicit_updates_and_errors(mlp, digits):
    cfg = GradualPruneConfig(final_sparsity=0.7, frequency=5, num_updates=2, train=TRAIN)
    pruned, rec = stage_on(gradual_prune, mlp.module, cfg, digits)
    assert rec.details["schedule"]["followed"][-1]["step"] == 10
    assert rec.details["sparsity"] == pytest.approx(0.7, abs=1e-3)
    assert rec.details["finetune"]["steps"] == 40
    with pytest.raises(ConfigError, match="needs training data"):
        stage_on(gradual_prune, mlp.module, cfg, None)


def test_stage_kinds_parse_from_a_recipe_and_run(mlp, digits):
    from slimkit.core.stages import STAGES, StageContext
    from slimkit.pipeline.recipe import parse_recipe

    train = {"max_steps": 10, "batch_size": 64}
    recipe = parse_recipe({"stages": [
        {"kind": "gradual_prune", "final_sparsity": 0.5, "frequency": 2, "train": train},
        {"kind": "nm_prune", "n": 2, "m": 4},
        {"kind": "sparse_train", "sparsity": 0.75, "update_every": 3, "train": train},
    ]})
    ctx = StageContext(data=digits, teacher=mlp, progress=False)
    model = mlp
    for stage in recipe.stages:
        model, rec = STAGES.get(stage.kind).apply(model, stage, ctx)
        assert rec.changed
    assert rec.details["layers"]["1"]["density"] == pytest.approx(
        rec.details["target_density"]["1"], abs=1e-3)
    with pytest.raises(ConfigError, match="needs training data"):
        STAGES.get("gradual_prune").apply(mlp, recipe.stages[0],
                                          StageContext(data=None, teacher=mlp))


def test_distillation_from_the_unpruned_model(mlp, digits):
    train = FinetuneConfig(max_steps=10, batch_size=64, distill={"logits": {"alpha": 1.0}})
    cfg = GradualPruneConfig(final_sparsity=0.6, frequency=3, train=train)
    pruned, rec = stage_on(gradual_prune, mlp.module, cfg, digits)
    assert rec.details["finetune"]["steps"] == 10
    assert rec.details["sparsity"] == pytest.approx(0.6, abs=1e-3)
