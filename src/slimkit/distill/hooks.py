"""Capture intermediate outputs by module name with removable forward hooks.

Distillation needs features from inside a model without editing it. :class:`FeatureTaps`
registers one forward hook per named submodule for the duration of a ``with`` block and
removes them on exit, so the model is left exactly as it was (no stray hooks that would break
export, pickling or a later run). Attention probabilities of slimkit's zoo transformers are
recomputed from the tapped ``q``/``k`` projections (:func:`attention_probs`), since the zoo
blocks never return them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from slimkit.core.errors import ConfigError, ModelError, did_you_mean

__all__ = ["FeatureTaps", "attention_probs", "find_attention", "first_tensor", "resolve_module"]


def resolve_module(model: nn.Module, name: str, label: str = "model") -> nn.Module:
    """The submodule called ``name`` (``""`` is the model itself).

    Raises:
        ConfigError: naming the closest existing module name.
    """
    modules = dict(model.named_modules())
    if name not in modules:
        raise ConfigError(
            f"{label} ({type(model).__name__}) has no submodule named '{name}'."
            f"{did_you_mean(name, [n for n in modules if n])} Names are those of "
            f"model.named_modules(), e.g. {', '.join(list(n for n in modules if n)[:4])}.")
    return modules[name]


def first_tensor(output: Any) -> Tensor | None:
    """The output if it is a tensor, else the first tensor in a tuple/list/mapping, depth first."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, tuple | list):
        for item in output:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


class FeatureTaps:
    """Record the outputs of named submodules during forward passes.

    Use as a context manager: hooks are registered on ``__enter__`` and removed on
    ``__exit__`` (also on error). A tuple/list/mapping output is reduced to its first tensor.
    When a module runs several times in one forward (weight sharing), the last output is kept.

    Args:
        model: the model to observe; never modified beyond the temporary hooks.
        names: submodule names as in ``model.named_modules()``.
        label: what to call the model in error messages ("student", "teacher", ...).

    Raises:
        ConfigError: an unknown name, naming the closest existing one.

    Example:
        >>> with FeatureTaps(net, ["layer1", "layer2"]) as taps:
        ...     logits = net(x)
        >>> taps["layer1"].shape
    """

    def __init__(self, model: nn.Module, names: Iterable[str], label: str = "model") -> None:
        self.model = model
        self.label = label
        self.names = list(dict.fromkeys(names))
        self._modules = {n: resolve_module(model, n, label) for n in self.names}
        self._handles: list[RemovableHandle] = []
        self.features: dict[str, Tensor] = {}

    def attach(self) -> FeatureTaps:
        """Register the hooks (idempotent) and clear previously captured features."""
        self.features = {}
        if not self._handles:
            self._handles = [m.register_forward_hook(self._hook(n))
                             for n, m in self._modules.items()]
        return self

    def remove(self) -> None:
        """Remove every hook this object registered."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            tensor = first_tensor(output)
            if tensor is None:
                raise ModelError(f"{self.label} layer '{name}' ({type(module).__name__}) "
                                 "returned no tensor; tap a layer that outputs one")
            self.features[name] = tensor
        return hook

    def __getitem__(self, name: str) -> Tensor:
        """The captured output of ``name``.

        Raises:
            ModelError: when ``name`` did not run in the last forward pass.
        """
        if name not in self.features:
            raise ModelError(f"{self.label} layer '{name}' did not run in the forward pass; "
                             "tap a layer the model's forward actually calls")
        return self.features[name]

    def __enter__(self) -> FeatureTaps:
        return self.attach()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()


def _join(prefix: str, child: str) -> str:
    return f"{prefix}.{child}" if prefix else child


def find_attention(model: nn.Module, block: str, label: str = "model",
                   ) -> tuple[str, str, int]:
    """Locate the self-attention inside ``block`` whose probabilities can be recomputed.

    An attention module here is one with ``nn.Linear`` children ``q`` and ``k`` and an integer
    ``num_heads`` (as :class:`slimkit.zoo.transformer.MultiHeadSelfAttention`); the first one in
    ``block`` (the block itself included) is used.

    Returns:
        The names of its ``q`` and ``k`` linears and its number of heads.

    Raises:
        ConfigError: unknown ``block`` (closest name given) or no such attention inside it.
    """
    root = resolve_module(model, block, label)
    for rel, module in root.named_modules():
        q, k = getattr(module, "q", None), getattr(module, "k", None)
        heads = getattr(module, "num_heads", None)
        if isinstance(q, nn.Linear) and isinstance(k, nn.Linear) and isinstance(heads, int):
            prefix = _join(block, rel)
            return _join(prefix, "q"), _join(prefix, "k"), heads
    raise ConfigError(
        f"{label} layer '{block}' contains no attention with q/k nn.Linear layers and "
        "num_heads (like slimkit.zoo's MultiHeadSelfAttention), so its attention maps cannot "
        "be recomputed; set transformer.attention_weight to 0 to match hidden states only")


def attention_probs(q: Tensor, k: Tensor, num_heads: int) -> Tensor:
    """Recompute ``softmax(q kᵀ / √d)`` per head from the q/k projection outputs.

    Args:
        q: ``[B, T, H*d]`` output of the query linear.
        k: ``[B, T, H*d]`` output of the key linear.
        num_heads: ``H``.

    Returns:
        ``[B, H, T, T]`` attention probabilities (rows sum to 1).
    """
    qh = q.unflatten(-1, (num_heads, -1)).transpose(1, 2)
    kh = k.unflatten(-1, (num_heads, -1)).transpose(1, 2)
    scores = torch.matmul(qh, kh.transpose(-2, -1)) * (qh.shape[-1] ** -0.5)
    return scores.softmax(dim=-1)
