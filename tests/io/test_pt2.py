"""torch.export archives as first-class models: any batch, real layers, original names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from slimkit.core.errors import ModelLoadError
from slimkit.core.stages import STAGES, StageContext
from slimkit.io.loader import load_model


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3, padding=1, stride=2)
        self.f = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(torch.relu(self.c(x)).flatten(1))


class PinnedBatch(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(torch.relu(self.c(x)).reshape(1, -1))  # the batch baked in


def _save(tmp_path: Path, module: nn.Module, batch: int, dynamic: object = None) -> Path:
    torch.manual_seed(0)
    path = tmp_path / f"{type(module).__name__}-{batch}-{dynamic is not None}.pt2"
    x = torch.randn(batch, 1, 8, 8)
    shapes = ({0: dynamic},) if dynamic is not None else None
    torch.export.save(torch.export.export(module.eval(), (x,), dynamic_shapes=shapes), path)
    return path


@pytest.mark.parametrize("dynamic", [None, torch.export.Dim("batch", max=1024),
                                     torch.export.Dim("batch")],
                         ids=["static-batch-1", "bounded", "unbounded"])
def test_any_export_runs_at_any_batch_with_real_layers(tmp_path: Path, dynamic):
    torch.manual_seed(0)
    net = Net().eval()
    model = load_model(str(_save(tmp_path, net, 1 if dynamic is None else 2, dynamic)))
    assert isinstance(model.module.c, nn.Conv2d) and isinstance(model.module.f, nn.Linear)
    assert model.module.c.stride == (2, 2) and model.module.c.padding == (1, 1)
    assert model.module.state_dict().keys() == net.state_dict().keys()
    x = torch.randn(7, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.module(x), net(x), rtol=0, atol=1e-6)


def test_a_graph_that_bakes_its_batch_in_is_refused_with_what_to_do(tmp_path: Path):
    path = _save(tmp_path, PinnedBatch(), 1)
    with pytest.raises(ModelLoadError, match=r"was exported at a fixed batch size and does not "
                                             r"run at another .*dynamic_shapes=\(\{0: "
                                             r"torch.export.Dim\('batch'\)\},\)"):
        load_model(str(path))


def test_quantization_finds_the_layers_of_an_export(tmp_path: Path):
    from slimkit.data.bundle import DataBundle

    model = load_model(str(_save(tmp_path, Net(), 1)))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1, 8, 8, generator=gen), torch.randint(0, 5, (64,), generator=gen)
    ptq = STAGES.get("ptq")
    out, record = ptq.apply(model, ptq.config(num_samples=32),
                            StageContext(data=DataBundle("toy", x, y, x, y, 5)))
    # Both layers are seen under their own names (the small conv is kept float, saying why).
    assert [line.split(":")[0] for line in record.changed] == ["f"]
    assert [s["what"] for s in record.skipped] == ["c"]
    with torch.no_grad():
        ref, got = model.module(x), out.module(x)
    assert torch.nn.functional.cosine_similarity(ref, got).mean() > 0.99
