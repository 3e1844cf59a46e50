"""A search worker process for the shared-storage tests: ``python _worker.py STORAGE OUT N``.

The model (a seeded, briefly trained MLP), the data (sklearn digits) and the recipe are the
same in every worker, so all join one study. With ``SLIMKIT_TEST_SLOW=1`` each trial
sleeps in a stage (a worker to kill mid-trial); the stage is in every worker's recipe.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Literal

import torch
from torch import nn

from slimkit.core.config import SlimConfig
from slimkit.core.record import Record
from slimkit.pipeline import register_stage


class SleepConfig(SlimConfig):
    kind: Literal["test_search_sleep"] = "test_search_sleep"


@register_stage(SleepConfig)
def _sleep(model, cfg, ctx):
    if os.environ.get("SLIMKIT_TEST_SLOW") == "1":
        print("TRIAL-STARTED", flush=True)
        time.sleep(600)
    return model.copy(), Record()


def main() -> None:
    from sklearn.datasets import load_digits

    from slimkit.data.bundle import DataBundle
    from slimkit.io.model import SlimModel
    from slimkit.search.run import search

    torch.set_num_threads(1)
    storage, out, trials = sys.argv[1], sys.argv[2], int(sys.argv[3])
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    data = DataBundle("digits", x[:1400], y[:1400], x[1400:], y[1400:], 10)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    model = SlimModel(module=net, input_shape=(1, 8, 8), name="mlp", num_classes=10)
    recipe = {"stages": [{"kind": "test_search_sleep"}],
              "measure": {"threads": 1},
              "search": {"trials": trials, "heartbeat": 1, "front": 1,
                         "prune": {"ratios": [0.0, 0.25, 0.5, 0.75]},
                         "latency": {"runtime": "torch", "repeats": 3, "warmup": 0}}}
    result = search(model, data, recipe, out, storage=storage, worker=True,
                    log=lambda s: print(s, file=sys.stderr))
    print(json.dumps(dict(result)), flush=True)


if __name__ == "__main__":
    main()
