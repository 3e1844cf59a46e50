"""Layers as the techniques that select them by type expect: Conv1D as Linear, tied weights.

Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2, GPT, ImageGPT...) computes
``y = x @ W + b`` with ``W`` stored ``[in, out]``: the math of ``nn.Linear`` with the weight
transposed. Quantizers, factorizers and pruners select ``nn.Linear``, so a GPT-2 as it comes
would lose every attention and MLP matrix to them. :func:`conv1d_to_linear` swaps each Conv1D
for an ``nn.Linear`` holding ``W.T`` (the same function, the same module path, so selectors by
name still match), and the structural transform ``conv1d_to_linear`` replays it when an
artifact is rebuilt.

:func:`prepare_layers` is what such a stage runs first: it converts the model's Conv1D layers
(on a copy), turns ``type:Conv1D`` selectors into the names they matched, and leaves out layers
whose weight another module also holds (a tied LM head: packing it would keep the embedding's
float matrix and grow the model), unless the recipe names them exactly. :meth:`Prepared.finish`
then puts what it did in the stage's record.

Stages that change weight values in place (pruning, clustering) leave tied layers out too,
for another reason: the tied matrix is one tensor, so pruning the LM head would prune the
embedding with it, which a recipe selecting ``Linear`` does not ask for. Named exactly in
``include``, the layer is changed anyway and the record says the other holder changed with it.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimkit.core.record import Record
from slimkit.core.stages import register_rebuilder
from slimkit.io.model import SlimModel, replace_module

TRANSFORM = "conv1d_to_linear"


def _conv1d_class() -> type | None:
    """transformers' Conv1D, when transformers is loaded (a model holding one imported it)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None)


def conv1d_layers(model: nn.Module) -> list[str]:
    """Names of the transformers ``Conv1D`` layers of ``model``, in model order."""
    cls = _conv1d_class()
    if cls is None:
        return []
    return [n for n, m in model.named_modules() if n and type(m) is cls]


def as_linear(layer: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing what ``layer`` (a Conv1D, weight ``[in, out]``) computes.

    Built on the layer's device and dtype (on ``meta`` when an artifact checks shapes).
    """
    w = layer.weight
    bias = getattr(layer, "bias", None)
    lin = nn.Linear(w.shape[0], w.shape[1], bias=bias is not None, device=w.device,
                    dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w.detach().t())
        if bias is not None:
            lin.bias.copy_(bias.detach())
    lin.train(layer.training)
    return lin


def conv1d_to_linear(model: nn.Module, names: list[str]) -> nn.Module:
    """Replace (in place) each named Conv1D layer of ``model`` by the same-math ``nn.Linear``.

    Raises:
        ValueError: a name is not a Conv1D layer of the model.
    """
    cls = _conv1d_class()
    modules = dict(model.named_modules())
    for name in names:
        layer = modules.get(name)
        if cls is None or type(layer) is not cls:
            raise ValueError(f"layer '{name}' is not a transformers Conv1D "
                             f"({type(layer).__name__ if layer is not None else 'missing'})")
        replace_module(model, name, as_linear(layer))
    return model


@register_rebuilder(TRANSFORM)
def _rebuild(model: nn.Module, plan: dict) -> nn.Module:
    """Artifact loading: the planned Conv1D layers become Linear (their weights load later)."""
    return conv1d_to_linear(model, list(plan["layers"]))


def shared_weights(model: nn.Module) -> dict[str, list[str]]:
    """Layers whose ``weight`` is the very tensor another module also holds (a tied LM head
    and its embedding), each with the other holders.

    Quantizing or factorizing one holder leaves the float matrix in place for the others, so
    the model grows instead of shrinking.

    Example:
        >>> shared_weights(gpt2)
        {'transformer.wte': ['lm_head'], 'lm_head': ['transformer.wte']}
    """
    holders: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            if name and name not in holders.setdefault(id(p), []):
                holders[id(p)].append(name)
    out: dict[str, list[str]] = {}
    for name, mod in model.named_modules():
        w = mod._parameters.get("weight") if name else None
        others = [] if w is None else [n for n in holders[id(w)] if n != name]
        if others:
            out[name] = others
    return out


def _exact_names(selectors: list[str], modules: dict[str, nn.Module]) -> set[str]:
    return {s for s in selectors if s in modules}


@dataclass
class Prepared:
    """What :func:`prepare_layers` did, for the stage's record.

    Attributes:
        converted: the Conv1D layers now Linear.
        tied: layers left out because their weight is another module's too (name -> holders).
        named_tied: tied layers the recipe names exactly, kept in (name -> holders).
    """

    stage: str
    converted: list[str] = field(default_factory=list)
    tied: dict[str, list[str]] = field(default_factory=dict)
    named_tied: dict[str, list[str]] = field(default_factory=dict)
    #: For stages that edit weights in place: what they do to a weight ("pruned").
    in_place: str | None = None
    #: Named tied layers left out because another name of the same matrix is kept (edited
    #: once, through that one): name -> the kept holder.
    same_matrix: dict[str, str] = field(default_factory=dict)

    def finish(self, record: Record) -> Record:
        """Put the conversion first in ``record`` (change line, details, transform, so an
        artifact replays it before the stage's own transform) and give tied layers their
        reason instead of "excluded by the recipe"."""
        if self.converted:
            record.changed.insert(0, f"converted {len(self.converted)} Conv1D layers to Linear "
                                     "(same math: weight transposed)")
            record.details[TRANSFORM] = list(self.converted)
            record.transforms.insert(0, (TRANSFORM, {"layers": list(self.converted)}))
        for row in record.skipped:
            what = row.get("what", "")
            others = self.tied.get(what)
            if row.get("why") != "excluded by the recipe":
                continue
            if what in self.same_matrix:
                row["why"] = (f"the same matrix as {self.same_matrix[what]} (tied), also named "
                              f"in include: {self.in_place} once, through "
                              f"{self.same_matrix[what]}")
            elif others and self.in_place:
                row["why"] = (f"weight shared with {', '.join(others)} (tied): {self.stage} "
                              f"would change {others[0]} too (one matrix); left unchanged "
                              f"(name the layer in include to have both {self.in_place})")
            elif others:
                row["why"] = (f"weight shared with {', '.join(others)} (tied): {self.stage} "
                              f"would keep the float matrix for {others[0]} and grow the model; "
                              "left float (name the layer in include to do it anyway)")
        left = {row.get("what") for row in record.skipped}  # named, but the stage left it
        for name, others in self.named_tied.items():
            if name in self.same_matrix or name in left:
                continue
            if self.in_place:
                record.changed.append(
                    f"{name}: weight shared with {', '.join(others)} (tied) and named in "
                    f"include: {', '.join(others)} {'is' if len(others) == 1 else 'are'} "
                    f"{self.in_place} with it (one matrix)")
            else:
                record.changed.append(
                    f"{name}: weight shared with {', '.join(others)} (tied) and named in "
                    f"include: the float matrix stays for {others[0]}, so this layer adds "
                    "bytes instead of saving them")
        return record


def prepare_layers(model: SlimModel, cfg: Any, stage: str, convert: bool = True,
                   skip_tied: bool = True, in_place: str | None = None,
                   ) -> tuple[SlimModel, Any, Prepared]:
    """Ready ``model`` and ``cfg`` for a stage that selects layers by type.

    Args:
        model: the stage's input (not modified; a copy is converted when it holds Conv1D).
        cfg: the stage's config; its ``include`` / ``exclude`` are rewritten on a copy
            (``type:Conv1D`` -> the converted names; tied layers added to ``exclude``).
        stage: the stage kind, for the record.
        convert: convert Conv1D layers (False when the stage does not select Linear layers).
        skip_tied: leave out layers whose weight another module holds, unless named exactly
            in ``include`` (quantizers and factorizers: the float matrix would stay).
        in_place: for stages that change weight values in place, what they do ("pruned",
            "clustered"): a tied layer is then left out because its other holders would
            change with it, and one named exactly is changed with the record saying so (a
            second name of the same matrix is left out: it is changed once).

    Returns:
        The model to work on, the config to use, and what was done (see :meth:`Prepared.finish`).

    Example:
        >>> model, cfg, prep = prepare_layers(model, cfg, "weight_only_quant")
        >>> module, record = run(model.module, cfg)
        >>> prep.finish(record)
    """
    prep = Prepared(stage, in_place=in_place)
    include, exclude = list(getattr(cfg, "include", [])), list(getattr(cfg, "exclude", []))
    names = conv1d_layers(model.module) if convert else []
    if names:
        module = conv1d_to_linear(copy.deepcopy(model.module), names)
        model = model.copy(module)
        prep.converted = names

        def expand(sels: list[str]) -> list[str]:
            return [n for s in sels for n in (names if s == "type:Conv1D" else [s])]

        include, exclude = expand(include), expand(exclude)
    if skip_tied:
        modules = dict(model.module.named_modules())
        named = _exact_names(include, modules)
        types = getattr(cfg, "layer_types", None)

        def selects(o: str) -> bool:  # a layer of a type the stage selects
            return types is None or type(modules[o]).__name__ in types

        for name, others in shared_weights(model.module).items():
            if name in named and selects(name):
                prep.named_tied[name] = others
                # Another name of this matrix already kept: edit it once, through that one.
                kept = [o for o in others if o in prep.named_tied and o not in prep.same_matrix]
                if in_place and kept and name not in exclude:
                    prep.same_matrix[name] = kept[0]
                    exclude.append(name)
            elif name not in exclude:
                prep.tied[name] = others
                exclude.append(name)
    if hasattr(cfg, "include") and (include != cfg.include or exclude != cfg.exclude):
        cfg = cfg.model_copy(update={"include": include, "exclude": exclude})
    return model, cfg, prep

