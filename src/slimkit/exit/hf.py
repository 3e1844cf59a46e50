"""Cutting Hugging Face ``transformers`` models: a tracer for their forward code.

A transformers model takes named inputs (``pixel_values``, ``input_ids``...) and keyword
options, returns a ``ModelOutput``, and its forward asks things of its tensors that plain
``torch.fx`` proxies cannot answer: ``x.dtype != expected``, ``mask.ndim == 2``, ``batch, seq =
x.shape``, a ``ModelOutput`` built around a proxy. Three things make it traceable without
transformers' own (removed) fx tracer:

- the model is called through :class:`HFCall`, whose forward takes the inputs by name and
  returns the ``ModelOutput``'s tensors as a dict, so the graph's placeholders are the inputs;
- every proxy carries the value it has on an example batch: properties that do not depend
  on the batch (``dtype``, ``ndim``, ``dim()``, ``device``, ``is_floating_point()``, the
  length of a shape) are answered from it, everything else (shapes included) stays symbolic,
  so the segments still take any batch size;
- the attention-mask builders (``transformers.masking_utils``, ``modeling_attn_mask_utils``)
  are kept as single calls run on real tensors (their inside branches on the data), and
  ``ModelOutput`` accepts a proxy as a tensor.

transformers is never imported here: these paths run only for a model whose class comes
from an already loaded transformers.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx, nn

PREFIX = "model."  # where HFCall holds the model: cut names in the trace are prefixed
MASK_MODULES = ("transformers.masking_utils", "transformers.modeling_attn_mask_utils")


def is_hf(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (transformers loaded)."""
    base = getattr(sys.modules.get("transformers"), "PreTrainedModel", None)
    return base is not None and isinstance(model, base)


class HFCall(nn.Module):
    """``model(**inputs, return_dict=True)`` with the inputs as named arguments (the subclass
    :func:`hf_call` makes has a forward with one parameter per input). The ``ModelOutput``
    comes back as a dict of its tensors, from which the judged one is selected as usual."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def _call(self, inputs: dict[str, Any]) -> Any:
        return dict(self.model(**inputs, return_dict=True))


@functools.cache
def _call_class(names: tuple[str, ...]) -> type[HFCall]:
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise ValueError(f"input names {bad} are not Python identifiers")
    params = ", ".join(names)
    body = ", ".join(f"{n!r}: {n}" for n in names)
    scope: dict[str, Any] = {}
    exec(f"def forward(self, {params}):\n    return self._call({{{body}}})\n", scope)  # noqa: S102
    return type("HFCall", (HFCall,), {"forward": scope["forward"]})


def hf_call(model: nn.Module, names: list[str]) -> HFCall:
    """``model`` called with ``names`` as its keyword inputs (see :class:`HFCall`)."""
    return _call_class(tuple(names))(model)


class ValueProxy(fx.Proxy):
    """A proxy that knows its value on the example batch (``node.meta["value"]``) and answers
    the batch-independent questions from it."""

    def _value(self) -> Any:
        return self.node.meta.get("value")

    def _known(self, what: str) -> Any:
        v = self._value()
        if not isinstance(v, torch.Tensor):
            return fx.Proxy.__getattr__(self, what)
        return getattr(v, what)

    @property
    def dtype(self) -> Any:
        return self._known("dtype")

    @property
    def ndim(self) -> Any:
        return self._known("ndim")

    @property
    def device(self) -> Any:
        return self._known("device")

    def dim(self) -> Any:
        v = self._value()
        return v.dim() if isinstance(v, torch.Tensor) else self.tracer.create_proxy(
            "call_method", "dim", (self,), {})

    def is_floating_point(self) -> Any:
        v = self._value()
        return v.is_floating_point() if isinstance(v, torch.Tensor) else \
            self.tracer.create_proxy("call_method", "is_floating_point", (self,), {})


def _values(arg: Any) -> Any:
    return fx.node.map_aggregate(arg, lambda a: a.node.meta.get("value", _MISSING)
                                 if isinstance(a, fx.Proxy) else a)


_MISSING = object()


def _has_missing(arg: Any) -> bool:
    found = []
    fx.node.map_aggregate(arg, lambda a: found.append(a is _MISSING))
    return any(found)


class ValueTracing:
    """Mixin for an ``fx.Tracer``: run every node on example values as it is traced."""

    examples: dict[str, Any]
    _computing = False  # while a value is computed, modules and parameters are plain

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ValueProxy(node, self)  # type: ignore[arg-type]

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict,
                     *rest: Any, **more: Any) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **more)  # type: ignore[misc]
        try:
            value = self._run(kind, target, _values(args), _values(kwargs))
        except Exception:  # a value we cannot compute only costs the concrete answers
            value = _MISSING
        if value is not _MISSING:
            proxy.node.meta["value"] = value
        return proxy

    def _run(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        if kind == "placeholder":
            return self.examples.get(str(target), _MISSING)
        if _has_missing(args) or _has_missing(kwargs):
            return _MISSING
        root: nn.Module = self.root  # type: ignore[attr-defined]
        self._computing = True
        try:
            with torch.no_grad():
                if kind == "call_function":
                    return target(*args, **kwargs)
                if kind == "call_method":
                    return getattr(args[0], target)(*args[1:], **kwargs)
                if kind == "call_module":
                    return root.get_submodule(target)(*args, **kwargs)
                if kind == "get_attr":
                    return functools.reduce(getattr, str(target).split("."), root)
        finally:
            self._computing = False
        return _MISSING

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        if self._computing:  # a value being computed: run the module, record nothing
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)  # type: ignore[misc]

    def getattr(self, attr: str, attr_val: Any, cache: dict) -> Any:
        if self._computing:
            return attr_val
        return super().getattr(attr, attr_val, cache)  # type: ignore[misc]

    def iter(self, obj: fx.Proxy) -> Iterator:
        """``a, b = proxy`` of a tuple or a shape: one ``getitem`` node per element."""
        v = obj.node.meta.get("value")
        if isinstance(v, tuple | list):
            return iter([obj[i] for i in range(len(v))])
        return super().iter(obj)  # type: ignore[misc]


def _leaf(tracer: fx.Tracer, fn: Callable) -> Callable:
    """``fn`` kept as one graph call when a proxy reaches it; its non-tensor arguments (a
    config) are bound into the called function."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        found: list[bool] = []
        fx.node.map_aggregate((args, kwargs), lambda a: found.append(isinstance(a, fx.Proxy)))
        if not any(found):
            return fn(*args, **kwargs)
        const = {k: v for k, v in kwargs.items() if not _graphable(v)}
        live = {k: v for k, v in kwargs.items() if k not in const}

        def bound(*a: Any, **k: Any) -> Any:
            return fn(*a, **k, **const)

        bound.__name__ = bound.__qualname__ = fn.__name__
        return tracer.create_proxy("call_function", bound, args, live)

    return call


def _graphable(v: Any) -> bool:
    ok: list[bool] = []
    fx.node.map_aggregate(v, lambda a: ok.append(
        a is None or isinstance(a, fx.Proxy | torch.Tensor | int | float | bool | str)))
    return all(ok)


@contextlib.contextmanager
def hf_tracing(tracer: fx.Tracer, model: nn.Module) -> Iterator[None]:
    """Within: ``ModelOutput`` takes proxies as tensors, and the mask builders that the
    model's modules call are graph leaves (see the module docstring)."""
    generic = sys.modules["transformers.utils.generic"]
    is_tensor = generic.is_tensor
    patched: list[tuple[dict, str, Any]] = []
    spaces = {id(ns): ns for ns in (vars(sys.modules[type(m).__module__])
                                    for m in model.modules()
                                    if type(m).__module__ in sys.modules)}
    for ns in spaces.values():
        for name, fn in list(ns.items()):
            if callable(fn) and getattr(fn, "__module__", None) in MASK_MODULES \
                    and not isinstance(fn, type):
                patched.append((ns, name, fn))
                ns[name] = _leaf(tracer, fn)
    generic.is_tensor = lambda x: isinstance(x, fx.Proxy) or is_tensor(x)
    try:
        yield
    finally:
        generic.is_tensor = is_tensor
        for ns, name, fn in patched:
            ns[name] = fn
