"""Residual branch discovery: which adds are removable blocks, which are not, and why."""

from __future__ import annotations

import torch
from torch import nn

from slimkit.graph.branches import find_branches
from slimkit.zoo import build_model
from slimkit.zoo.mobilenet import InvertedResidual

X = (torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)),)
RESNET20_BLOCKS = ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1",
                   "layer3.2"]
BASIC_BRANCH = ["conv1", "bn1", "relu1", "conv2", "bn2"]


def _resnet20() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet20", (1, 28, 28), 10)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_resnet20_identity_blocks_are_branches_and_option_a_blocks_are_not():
    model = _resnet20()
    branches, skipped = find_branches(model, X)
    assert [b.module for b in branches] == RESNET20_BLOCKS  # no layer2.0 / layer3.0 (option A)
    assert skipped == []
    mods = dict(model.named_modules())
    for b in branches:
        assert b.nodes == BASIC_BRANCH and b.shortcut == "shortcut"
        assert b.modules == sorted(f"{b.module}.{n}" for n in BASIC_BRANCH)
        assert b.params == sum(_n_params(mods[m]) for m in b.modules)
    assert branches[0].params == 2 * (16 * 16 * 9 + 2 * 16)
    assert branches[-1].params == 2 * (64 * 64 * 9 + 2 * 64)
    assert branches[1].as_dict()["modules"][2] == "layer1.1.conv1"


def test_mobilenetv2_branches_are_exactly_the_residual_blocks():
    torch.manual_seed(0)
    model = build_model("mobilenetv2", (1, 28, 28), 10, width_mult=0.5)
    branches, skipped = find_branches(model, X)
    blocks = {n: m for n, m in model.named_modules() if isinstance(m, InvertedResidual)}
    residual = [n for n, m in blocks.items() if m.use_residual]
    assert 0 < len(residual) < len(blocks)  # both kinds exist, so the comparison means something
    assert [b.module for b in branches] == residual and skipped == []
    for b in branches:
        assert (b.nodes, b.modules, b.shortcut) == (["conv"], [f"{b.module}.conv"], "x")
        assert b.params == _n_params(blocks[b.module].conv)


class PosTable(nn.Module):
    """x + a learned (1, tokens, dim) table: a constant, not a block (even at batch 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 5, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pos


class Reused(nn.Module):
    """A residual whose branch output is used again after the add."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return (x + h) * h


class TwoPaths(nn.Module):
    """Two parameterized paths added: neither is a shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


class PreLN(nn.Module):
    """Pre-LN transformer sublayer: x + lin(ln(x))."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lin(self.ln(x))


class Gated(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x + self.lin(x)
        return x


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos, self.reused, self.two = PosTable(), Reused(), TwoPaths()
        self.pre, self.gated = PreLN(), Gated()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gated(self.pre(self.two(self.reused(self.pos(x)))))


def test_only_true_residual_adds_count_and_untraceable_modules_are_reported():
    torch.manual_seed(0)
    branches, skipped = find_branches(Mixed(), (torch.randn(1, 5, 8),))
    assert [(b.module, b.add, b.shortcut, b.nodes, b.modules) for b in branches] == [
        ("pre", "add", "x", ["ln", "lin"], ["pre.lin", "pre.ln"])]
    assert branches[0].params == 8 * 8 + 8 + 2 * 8
    assert len(skipped) == 1 and skipped[0]["what"] == "module gated"
    assert "torch.fx" in skipped[0]["why"] and "not searched" in skipped[0]["why"]


def test_each_rejected_add_is_rejected_on_its_own():
    # Alone, as the whole model, so a rejection cannot come from the surrounding graph.
    for batch in (1, 2):  # at batch 1 the table has the input's shape: shapes cannot tell
        x = (torch.randn(batch, 5, 8),)
        for model in (PosTable(), Reused(), TwoPaths()):
            assert find_branches(model, x) == ([], []), (type(model).__name__, batch)
        assert [b.module for b in find_branches(PreLN(), x)[0]] == [""]


def test_find_branches_leaves_the_model_alone():
    model = _resnet20().train()
    model(torch.randn(4, 1, 28, 28))  # non-trivial running statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    find_branches(model, X)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. BN running stats
    assert all(m.training for m in model.modules())
    model.layer1[0].bn1.eval()  # frozen inside a training model: stays frozen
    find_branches(model, X)
    assert [n for n, m in model.named_modules() if not m.training] == ["layer1.0.bn1"]
    model.eval()
    find_branches(model, X)
    assert not any(m.training for m in model.modules())
    assert all(type(m) is not torch.fx.GraphModule for m in model.modules())


class _KeywordResidual(nn.Module):
    """Residual adds in a forward that takes keyword inputs and returns two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 8)
        self.f = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, scale: float = 2.0,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.stem(x)) * bias
        h = h + self.f(h) * scale
        return self.head(h), h


def test_a_forward_called_with_keyword_inputs_is_searched():
    x, bias = torch.randn(2, 6), torch.randn(2, 8)
    for example in ({"x": x, "bias": bias}, (x, bias)):
        branches, skipped = find_branches(_KeywordResidual(), example)
        assert skipped == []
        assert [(b.module, b.nodes, b.modules) for b in branches] == [("", ["f", "mul_1"], ["f"])]
