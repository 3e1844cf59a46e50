"""Run an early-exit model exported as a chain of ONNX steps, stopping at the first exit
whose confidence reaches its threshold.

This file depends on numpy and onnxruntime only: :func:`slimkit.exit.onnx.export_exit_onnx`
copies it next to the steps, so the folder runs without slimkit::

    from runner import EarlyExitRunner
    logits, exits = EarlyExitRunner("model.exits").run({"input": x})

The folder holds ``early_exit.json`` (the steps in order, their input and output names, the
thresholds) and ``step_<k>.onnx``. Step ``k`` before the last takes the state (the first
step: the model's inputs) and returns the next state, the exit's logits and confidence; the
last step returns the final logits. In a batch, rows that exited are dropped from the state,
so the later steps run on the others only. ``early_exit.onnx`` (when the spec names a
``graph``) is the same chain nested under ``If`` nodes: one ONNX Runtime call, stopping at
the first exit where every row of the batch is confident; the runner uses it for a batch of
one, where that is each sample's own exit, and saves the chain's per-step calls.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

SPEC = "early_exit.json"


class EarlyExitRunner:
    """ONNX Runtime sessions of an exported early-exit chain.

    Args:
        folder: the folder :func:`slimkit.exit.onnx.export_exit_onnx` wrote.
        threads: intra-op threads of every session.
    """

    def __init__(self, folder: str | Path, threads: int = 1) -> None:
        import onnxruntime as ort

        folder = Path(folder)
        self.spec = json.loads((folder / SPEC).read_text(encoding="utf-8"))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.sessions = [ort.InferenceSession(str(folder / s["file"]), sess_options=opts,
                                              providers=["CPUExecutionProvider"])
                         for s in self.spec["steps"]]
        graph = self.spec.get("graph")
        self.graph = None if graph is None else ort.InferenceSession(
            str(folder / graph), sess_options=opts, providers=["CPUExecutionProvider"])
        self.thresholds = [None if t is None else np.float32(t)
                           for t in self.spec["thresholds"]]

    @property
    def input_names(self) -> list[str]:
        return list(self.spec["steps"][0]["inputs"])

    def run(self, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Logits ``[N, classes]`` and the exit each row took (``len(thresholds)``: the final
        head), for the model's inputs by name."""
        steps = self.spec["steps"]
        state: list[Any] = [np.asarray(feed[n]) for n in steps[0]["inputs"]]
        n = len(state[0])
        if n == 1 and self.graph is not None:
            logits, k = self.graph.run(None, dict(zip(steps[0]["inputs"], state, strict=True)))
            return logits, np.asarray(k, dtype=np.int64).reshape(1)
        rows = np.arange(n)
        where = np.full(n, len(steps) - 1, dtype=np.int64)
        out: np.ndarray | None = None
        for k, session in enumerate(self.sessions[:-1]):
            *state, logits, conf = session.run(None, dict(zip(steps[k]["inputs"], state,
                                                              strict=True)))
            if out is None:
                out = np.empty((n, logits.shape[1]), dtype=logits.dtype)
            t = self.thresholds[k]
            if t is None:
                continue
            done = conf >= t
            if done.any():
                out[rows[done]] = logits[done]
                where[rows[done]] = k
                if done.all():
                    return out, where
                keep = ~done
                rows = rows[keep]
                state = [s[keep] for s in state]
        final = self.sessions[-1].run(None, dict(zip(steps[-1]["inputs"], state,
                                                     strict=True)))[0]
        if out is None:
            return final, where
        out[rows] = final
        return out, where
