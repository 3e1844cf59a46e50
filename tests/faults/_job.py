"""A tiny compress job for the fault tests, built the same way in the test and in a child.

Run as a script, ``python tests/faults/_job.py OUT POINT`` compresses into ``OUT`` and kills
itself with SIGKILL at ``POINT`` (one of :data:`KILL_POINTS`): no ``finally`` runs, the output
lock stays behind, as when a user runs ``kill -9``. ``python tests/faults/_job.py OUT POINT
pause`` instead prints ``paused`` there and goes on when its stdin closes: a run in progress.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.data.bundle import DataBundle
from slimkit.io.model import SlimModel
from slimkit.pipeline import load_recipe

# Where a run can die: after the baseline checkpoint, mid-training of a stage (its first
# training checkpoint is on disk), after a stage is recorded, while exporting the final model.
KILL_POINTS = ("baseline", "train-00", "stage-00", "train-01", "stage-01", "export")
FINETUNE = {"epochs": 1, "lr": 3e-3, "batch_size": 32, "checkpoint_every": 2}
MEASURE = {"threads": 1, "batch_sizes": [2], "warmup": 0, "repeats": 1}


def build(structural: bool = False) -> tuple[SlimModel, DataBundle, Any]:
    """A small MLP (a plain module: its artifacts carry a graph, not a zoo spec), 160 real
    digits, and a two-stage recipe that trains in both stages (``structural``: a low-rank
    factorization first, which changes the module structure)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:200], dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target[:200], dtype=torch.int64)
    data = DataBundle("digits-200", x[:160], y[:160], x[160:], y[160:], 10)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)).eval()
    model = SlimModel(module=net, input_shape=(1, 8, 8), name="mlp", num_classes=10)
    first = ({"kind": "lowrank", "linear": "svd", "rank": "ratio", "ratio": 0.5, "margin": 0.0}
             if structural else
             {"kind": "magnitude_prune", "sparsity": 0.5, "finetune": FINETUNE})
    recipe = load_recipe({"stages": [first, {"kind": "magnitude_prune", "sparsity": 0.8,
                                             "finetune": FINETUNE}],
                          "measure": MEASURE})
    return model, data, recipe


@contextmanager
def dying_at(point: str, die: Callable[[], None]) -> Iterator[None]:
    """Call ``die`` right after the run reaches ``point`` (its files for it are on disk)."""
    from slimkit.pipeline import runner
    from slimkit.train import loop

    real_json, real_ckpt, real_export = runner.write_json, loop.save_checkpoint, \
        runner.export_onnx

    def write_json(path: Path, state: dict) -> None:
        real_json(path, state)
        done = len(state.get("stages", []))
        if point == ("baseline" if done == 0 else f"stage-{done - 1:02d}"):
            die()

    def save_checkpoint(path: Path, state: dict) -> None:
        real_ckpt(path, state)
        if point == "train-" + Path(path).parent.name.split("-")[1]:
            die()

    def export_onnx(model: SlimModel, path: Path) -> Path:
        if point == "export" and Path(path).name == "model.onnx":
            die()
        return real_export(model, path)

    runner.write_json, loop.save_checkpoint, runner.export_onnx = \
        write_json, save_checkpoint, export_onnx
    try:
        yield
    finally:
        runner.write_json, loop.save_checkpoint, runner.export_onnx = \
            real_json, real_ckpt, real_export


def _pause() -> None:
    print("paused", flush=True)
    sys.stdin.read()


def main(out: str, point: str, mode: str = "kill") -> None:
    from slimkit.pipeline import compress

    torch.set_num_threads(1)
    model, data, recipe = build()
    stop = _pause if mode == "pause" else lambda: os.kill(os.getpid(), signal.SIGKILL)
    with dying_at(point, stop):
        compress(model, data, recipe, out, progress=False, log=lambda s: None)
    if mode != "pause":
        sys.exit("the run finished: the kill point was never reached")


if __name__ == "__main__":
    main(*sys.argv[1:4])
