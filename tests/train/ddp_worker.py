"""Run by torchrun in tests: trains the test MLP data-parallel and saves rank 0's weights."""

import sys

import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from torch import nn

from slimkit.data.bundle import DataBundle
from slimkit.train import TrainConfig, fit
from slimkit.train.distributed import barrier, init_from_env, shutdown, world
from slimkit.train.objective import Objective


class ScaledCE(Objective):
    """Cross-entropy on logits times a learned scale: a parameter outside the DDP module."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, model, x, y):
        logits = model(x) * self.scale
        loss = nn.functional.cross_entropy(logits, y)
        return loss, logits, {}


def main(out: str, uneven: bool = False, stream: bool = False) -> None:
    init_from_env()
    torch.set_num_threads(1)
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    n = 1399 if uneven else 1400  # uneven: the last global batch (99) splits 50 / 49
    data = DataBundle("digits-ddp", x[:n], y[:n], x[1400:], y[1400:], 10)
    if stream:  # the same samples as a stream of batches of 100, read in order by every rank
        from slimkit.data.stream import StreamData

        chunks = [(x[i:i + 100], y[i:i + 100]) for i in range(0, n, 100)]
        data = StreamData("digits-stream", train=chunks, test=[(x[1400:], y[1400:])],
                          num_classes=10, holdout=0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    objective = ScaledCE() if uneven else None
    hist = fit(net, data, TrainConfig(epochs=2, batch_size=100, lr=3e-3, optimizer="sgd"),
               objective=objective, progress=False)
    rank, size = world()
    if rank == 0:
        state = {k: v.contiguous() for k, v in net.state_dict().items()}
        if objective is not None:
            state["objective.scale"] = objective.scale.detach().reshape(1)
        save_file(state, out)
        print(f"world={size} steps={hist['steps']} world_size={hist['world_size']}")
    barrier()
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], uneven="uneven" in sys.argv[2:], stream="stream" in sys.argv[2:])
