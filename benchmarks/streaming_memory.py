"""Peak memory of calibration + one fine-tuning epoch + evaluation on streamed data.

Issue 15, item 3: memory must not grow with the dataset's size. Each configuration runs in a
fresh process (peak RSS is per process): a LeNet-5 is calibrated for INT8 PTQ on 512 streamed
samples, fine-tuned for one epoch on the whole stream, and evaluated on a test stream, with
datasets of N and 10·N samples. The same work on an in-memory DataBundle of the same samples
is run beside it, for contrast. Samples are generated batch by batch (deterministic per batch
index), so the stream itself holds one batch at a time.

Prints JSON (``--out`` also writes it). The claim holds when the streamed run's peak RSS above
the imports grows by at most 10% from N to 10·N.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


class Synthetic:
    """``n`` labelled 1x28x28 samples in batches, made on the fly (a sized, re-iterable
    source: what a DataLoader over a lazily decoded dataset looks like to slimkit)."""

    def __init__(self, n: int, batch: int, seed: int) -> None:
        self.n, self.batch, self.seed = n, batch, seed

    def __len__(self) -> int:
        return (self.n + self.batch - 1) // self.batch

    def __iter__(self):
        import torch

        for i in range(len(self)):
            rows = min(self.batch, self.n - i * self.batch)
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            x = torch.randn(rows, 1, 28, 28, generator=gen)
            y = (x[:, 0, :14].mean((1, 2)) > x[:, 0, 14:].mean((1, 2))).long() * 5 + (
                x[:, 0, :, :14].mean((1, 2)) > 0).long()
            yield x, y


def _child(n: int, mode: str) -> dict:
    import torch

    from slimkit.core.stages import STAGES, StageContext
    from slimkit.data.bundle import DataBundle
    from slimkit.data.stream import StreamData
    from slimkit.io.loader import load_zoo
    from slimkit.measure.tasks import get_task
    from slimkit.train.config import TrainConfig
    from slimkit.train.loop import fit

    torch.set_num_threads(1)
    imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train, test = Synthetic(n, 128, 1), Synthetic(max(n // 5, 128), 256, 2)
    if mode == "stream":
        data = StreamData(f"synthetic-{n}", train=train, test=test, num_classes=10,
                          val=Synthetic(256, 128, 3))
    else:
        xs, ys = zip(*train, strict=True)
        xt, yt = zip(*test, strict=True)
        data = DataBundle(f"synthetic-{n}", torch.cat(xs), torch.cat(ys), torch.cat(xt),
                          torch.cat(yt), 10)
    torch.manual_seed(0)
    model = load_zoo("lenet5", input_shape=(1, 28, 28), num_classes=10)
    start = time.perf_counter()
    ptq = STAGES.get("ptq")
    ptq.apply(model.copy(), ptq.config(num_samples=512), StageContext(data=data))
    fit(model.module, data, TrainConfig(epochs=1, batch_size=128, lr=1e-3), progress=False)
    metrics = get_task("classification").evaluate(model.module, lambda: data.batches("test"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"n": n, "mode": mode, "peak_rss_mib": peak / 1024,
            "above_imports_mib": (peak - imported) / 1024, "seconds": time.perf_counter() - start,
            "test_top1": metrics["top1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=6000, help="the smaller dataset's size")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", nargs=2, metavar=("N", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(int(args.child[0]), args.child[1])))
        return
    runs = {}
    for mode in ("stream", "memory"):
        for n in (args.n, 10 * args.n):
            out = subprocess.run([sys.executable, __file__, "--child", str(n), mode],
                                 capture_output=True, text=True, check=True, cwd=ROOT.parent)
            runs[f"{mode}-{n}"] = json.loads(out.stdout.strip().splitlines()[-1])
    small, large = runs[f"stream-{args.n}"], runs[f"stream-{10 * args.n}"]
    growth = large["above_imports_mib"] / small["above_imports_mib"] - 1
    mem_small, mem_large = runs[f"memory-{args.n}"], runs[f"memory-{10 * args.n}"]
    result = {
        "benchmark": "streaming_memory",
        "claim": "peak RSS of calibration + 1 epoch + evaluation stays within 10% when the "
                 "streamed dataset grows 10x",
        "runs": runs,
        "stream_growth": growth,
        "in_memory_growth": mem_large["above_imports_mib"] / mem_small["above_imports_mib"] - 1,
        "met": growth <= 0.10,
        "notes": "peak RSS (ru_maxrss) above the process's RSS after imports; one process per "
                 "run; 1 thread; synthetic 1x28x28 images generated per batch",
    }
    sys.path.insert(0, str(ROOT))
    from _common import emit

    emit(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
