"""Run by torchrun in tests: trains the test MLP data-parallel and saves rank 0's weights."""

import sys

import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from torch import nn

from slimkit.data.bundle import DataBundle
from slimkit.train import TrainConfig, fit
from slimkit.train.distributed import init_from_env, world


def main(out: str) -> None:
    init_from_env()
    torch.set_num_threads(1)
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    data = DataBundle("digits-ddp", x[:1400], y[:1400], x[1400:], y[1400:], 10)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    hist = fit(net, data, TrainConfig(epochs=2, batch_size=100, lr=3e-3, optimizer="sgd"),
               progress=False)
    rank, size = world()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out)
        print(f"world={size} steps={hist['steps']} world_size={hist['world_size']}")


if __name__ == "__main__":
    main(sys.argv[1])
