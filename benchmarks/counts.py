"""Counts against published figures: params and MACs of the reference zoo (prints JSON).

He et al. 2016 (ResNet-20, CIFAR-10): 0.27M params, ~41M MACs. Han et al. 2015 (Deep
Compression): LeNet-300-100 266,610 params; LeNet-5 431,080 params.
"""

from __future__ import annotations

import json
import sys

import torch

from slimkit.io.loader import load_zoo
from slimkit.measure import count_flops, count_params

PUBLISHED = {
    "lenet300": {"input_shape": (1, 28, 28), "params": 266_610, "macs": None},
    "lenet5": {"input_shape": (1, 28, 28), "params": 431_080, "macs": None},
    "resnet20": {"input_shape": (3, 32, 32), "params": 270_000, "macs": 41_000_000},
    "resnet56": {"input_shape": (3, 32, 32), "params": 850_000, "macs": 125_000_000},
}


def main() -> int:
    rows = {}
    for name, ref in PUBLISHED.items():
        model = load_zoo(name, input_shape=ref["input_shape"], num_classes=10)
        params = count_params(model.module)["params"]
        macs = count_flops(model.module, (torch.randn(1, *ref["input_shape"]),))["macs"]
        rows[name] = {"params": params, "published_params": ref["params"],
                      "params_rel_err": abs(params - ref["params"]) / ref["params"],
                      "macs": macs, "published_macs": ref["macs"],
                      "macs_rel_err": (abs(macs - ref["macs"]) / ref["macs"]
                                       if ref["macs"] else None)}
    json.dump(rows, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
