"""Where the exits go, and the plan that builds them (heads sized from traced shapes)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimkit.core.errors import ModelError
from slimkit.exit.model import PLAN_FORMAT
from slimkit.exit.segments import check_names, check_state, hf_spec, split, trace
from slimkit.io import batch as B
from slimkit.io.model import modes_kept, set_mode


def _is_block(module: nn.Module) -> bool:
    """A block of a stack: a module of the user's (or zoo's) own class, not a torch layer."""
    return not type(module).__module__.startswith("torch.")


def block_stacks(model: nn.Module) -> list[list[str]]:
    """Every ``nn.Sequential`` / ``nn.ModuleList`` holding at least two blocks: the residual
    blocks of a CNN stage, the layers of a transformer (each as its blocks' names). A stack
    inside a block of another stack (the conv layers inside a transformers ResNet's stage) is
    a part of that block, not a stack of its own."""
    stacks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Sequential | nn.ModuleList):
            kids = [(f"{name}.{k}" if name else k, c) for k, c in m.named_children()]
            if sum(_is_block(c) for _, c in kids) >= 2:
                stacks.append([n for n, c in kids if _is_block(c)])
    blocks = [b for stack in stacks for b in stack]
    return [stack for stack in stacks
            if not any(stack[0].startswith(b + ".") for b in blocks)]


def default_exits(model: nn.Module, x: B.Inputs) -> tuple[list[str], str | None]:
    """Every residual stage: in each block stack, the last block before the feature's shape
    changes (a CNN's resolution stages), or every block when no shape changes (transformer
    layers); never the model's last block. Returns the names, or ``[]`` and why none."""
    blocks = [b for stack in block_stacks(model) for b in stack]
    if len(blocks) < 2:
        return [], ("found no stack of two or more blocks (nn.Sequential/nn.ModuleList of "
                    "residual or transformer blocks) to put exits after; name blocks in exits")
    shapes: dict[str, tuple[int, ...]] = {}
    def hook(name: str) -> Any:
        def record(_m: nn.Module, _i: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                shapes.setdefault(name, tuple(out.shape[1:]))
        return record

    hooks = [model.get_submodule(b).register_forward_hook(hook(b)) for b in blocks]
    try:
        with torch.no_grad(), modes_kept(model):
            set_mode(model, False)
            B.call(model, x)
    finally:
        for h in hooks:
            h.remove()
    ran = list(shapes)  # first calls, in execution order
    if len(ran) < 2:
        return [], "fewer than two blocks of the model's block stacks ran on a sample"
    if len({shapes[b] for b in ran}) == 1:
        return ran[:-1], None
    return [a for a, b in zip(ran, ran[1:], strict=False) if shapes[a] != shapes[b]], None


def _pool(model: nn.Module, block: str, feat: torch.Tensor, pooling: str,
          head: str = "linear") -> dict[str, Any]:
    """How a head reads ``feat``: its pooling (``grid`` for 2-D conv maps, ``spatial`` for
    1-D ones, ``mean``/``cls`` for tokens, ``none`` for vectors), its Linear's input width
    and, for a ``conv`` head on a 2-D map, the convolution's ``[in, out]`` channels."""
    from slimkit.distill.projectors import resolve_layout

    if feat.dim() == 2:
        return {"pool": "none", "channels": int(feat.shape[1])}
    layout = resolve_layout(model, block, feat.dim(), "auto")
    if layout == "channels_first":
        c, size = int(feat.shape[1]), list(feat.shape[2:])
        row: dict[str, Any] = {}
        if head == "conv" and feat.dim() == 4:  # twice the channels at half the resolution
            row["conv"] = [c, 2 * c]
            c, size = 2 * c, [(n + 1) // 2 for n in size]
        if feat.dim() == 4 and min(size) >= 2:  # a 1-pixel map has no quarters
            return {"pool": "grid", "channels": 4 * c, **row}
        return {"pool": "spatial", "channels": c, **row}
    if pooling == "auto":
        pooling = "cls" if _reads_first_token(model) else "mean"
    return {"pool": pooling, "channels": int(feat.shape[-1])}


def _reads_first_token(model: nn.Module) -> bool:
    """Whether the model's own head reads a class token: it holds a ``cls_token`` parameter
    (a ViT), or a transformers pooler (BERT's reads the first token)."""
    from slimkit.exit.hf import is_hf

    if any(n.rsplit(".", 1)[-1] == "cls_token" for n, _ in model.named_parameters()):
        return True
    return is_hf(model) and any(n.rsplit(".", 1)[-1] == "pooler" and
                                type(m).__name__.endswith("Pooler")
                                for n, m in model.named_modules())


def build_plan(model: nn.Module, exits: list[str], x: B.Inputs, num_classes: int,
               confidence: str, pooling: str, head: str = "linear") -> dict[str, Any]:
    """The plan of exits after ``exits`` (any order; the plan holds them in execution
    order), with heads sized from one traced pass on ``x`` (at least two samples);
    ``head``: ``linear`` or ``conv`` (a convolution first on conv maps).

    Raises:
        ConfigError: an unknown block, or one that does not run exactly once.
        ModelError: the forward cannot be cut there, or a block's output cannot feed a head.
    """
    check_names(model, exits)
    hf = hf_spec(model, x)
    with modes_kept(model):
        set_mode(model, False)
        segments, order = split(trace(model, exits, hf), exits)
        feats = check_state(segments, order, x)
        with torch.no_grad():
            out = B.select(B.call(model, x))
    if out.dim() != 2 or out.shape[1] != num_classes:
        raise ModelError(f"early_exit: the model's judged output has shape {tuple(out.shape)}; "
                         f"exits need [batch, classes] logits ({num_classes} classes)")
    rows = []
    for block, feat in zip(order, feats, strict=True):
        rows.append({"block": block, **_pool(model, block, feat, pooling, head),
                     "feature_shape": list(feat.shape[1:])})
    plan = {"format": PLAN_FORMAT, "exits": rows, "num_classes": num_classes,
            "confidence": confidence, "thresholds": None}
    if hf is not None:  # a transformers model: how its forward is traced (segments.trace)
        plan["hf"] = hf
    return plan
