"""A ``torch.export`` archive as a model every command and stage can work on.

``ExportedProgram.module()`` gives a graph whose layers are ``aten.linear`` / ``aten.conv``
calls on parameters, with a guard call that pins the shapes it was exported at (a default
export pins batch 1). Loading here:

- drops the shape guards, then checks that the graph really runs at another batch size and
  gives the same rows (a graph that bakes its batch in is refused, saying how to re-export);
- turns every linear/convolution call back into an ``nn.Linear`` / ``nn.ConvNd`` module at its
  parameters' path (``f.weight`` -> module ``f``), so that pruning and quantization see layers
  under their original names, and the state dict keeps its keys;
- describes every input (name, per-sample shape, dtype, dynamic axes) from the graph.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import fx, nn

from slimkit.core.errors import ModelLoadError
from slimkit.io.model import SlimModel, TensorSpec, set_mode
from slimkit.io.safety import load_exported

_CONVS = {torch.ops.aten.conv1d.default: nn.Conv1d, torch.ops.aten.conv2d.default: nn.Conv2d,
          torch.ops.aten.conv3d.default: nn.Conv3d}


def load_pt2(path: Path, trust_pickle: bool = False) -> SlimModel:
    """Load a ``torch.export`` archive as a batch-agnostic module with real layers.

    Raises:
        ModelLoadError: the archive is invalid, or its graph fixes the batch size (saying how
            to export it with a dynamic batch).
    """
    program = load_exported(str(path), trust_pickle)
    specs = _input_specs(program)
    module = program.module()
    _drop_guards(module)
    modularize(module)
    set_mode(module, False)
    model = SlimModel(module=module, input_shape=specs[0].shape, input_dtype=specs[0].dtype,
                      name=str(path), inputs=specs if len(specs) > 1 or specs[0].dynamic
                      else None, input_style="tuple" if len(specs) > 1 else "tensor")
    _check_batch_free(model, path)
    return model


def _input_specs(program: torch.export.ExportedProgram) -> tuple[TensorSpec, ...]:
    user = program.graph_signature.user_inputs
    vals = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    specs = []
    for i, name in enumerate(user):
        val = vals.get(name)
        if not isinstance(val, torch.Tensor) or val.dim() == 0:
            raise ModelLoadError(f"'{name}', input {i} of the exported graph, is not a batched "
                                 "tensor; slimkit takes tensor inputs with the batch first")
        shape = tuple(int(d) if isinstance(d, int) else int(d.node.hint or 2)
                      for d in val.shape[1:])
        dynamic = {a: f"{name}_dim{a}" for a, d in enumerate(val.shape) if a and
                   not isinstance(d, int)}
        specs.append(TensorSpec(name if len(user) > 1 else "input", shape,
                                str(val.dtype).removeprefix("torch."), dynamic))
    return tuple(specs)


def _drop_guards(gm: fx.GraphModule) -> None:
    """Remove the shape guards torch.export puts on ``module()``: the guard call
    (``_guards_fn``) and the input-constraint pre-hook; :func:`_check_batch_free` then checks
    what the guards only asserted."""
    gm._forward_pre_hooks.clear()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards") and not node.users:
            gm.graph.erase_node(node)
            if hasattr(gm, str(node.target)):
                delattr(gm, str(node.target))
    gm.recompile()


def modularize(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace ``aten.linear`` / ``aten.convNd`` calls on a module's own ``weight``/``bias``
    by calls of an ``nn.Linear`` / ``nn.ConvNd`` holding those same parameters (in place)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        built = _layer(gm, node)
        if built is None:
            continue
        path, layer = built
        _set(gm, path, layer)
        node.op, node.target = "call_module", path
        node.args, node.kwargs = (node.args[0],), {}
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _layer(gm: fx.GraphModule, node: fx.Node) -> tuple[str, nn.Module] | None:
    target = node.target
    if target is not torch.ops.aten.linear.default and target not in _CONVS:
        return None
    args = list(node.args) + [None] * 8
    w, b = args[1], args[2]
    if not (isinstance(w, fx.Node) and w.op == "get_attr" and str(w.target).endswith(".weight")):
        return None
    path = str(w.target).removesuffix(".weight")
    if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"
                              and b.target == f"{path}.bias"):
        return None
    owner = gm.get_submodule(path)
    if type(owner) is not nn.Module or len(w.users) != 1:  # shared or already a layer
        return None
    weight = owner.weight
    if target is torch.ops.aten.linear.default:
        layer: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=b is not None,
                                     device="meta")
    else:
        stride, padding, dilation, groups = (args[3] or 1, args[4] or 0, args[5] or 1,
                                             args[6] or 1)
        if isinstance(padding, str):
            return None
        layer = _CONVS[target](weight.shape[1] * groups, weight.shape[0],
                               tuple(weight.shape[2:]), stride=stride, padding=padding,
                               dilation=dilation, groups=groups, bias=b is not None,
                               device="meta")
    layer.weight = weight
    if b is not None:
        layer.bias = owner.bias
    return path, layer


def _set(gm: nn.Module, path: str, layer: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, child, layer)


def _check_batch_free(model: SlimModel, path: Path) -> None:
    """Run two samples together and one by one: the same rows, or the graph pinned its batch."""
    from slimkit.io import batch as B

    x = model.example_inputs(2)
    try:
        with torch.inference_mode():
            both = B.flatten(B.call(model.module, x))
            one = B.flatten(B.call(model.module, B.take(x, slice(0, 1))))
        same = all(torch.allclose(both[k][:1], one[k], rtol=1e-4, atol=1e-5) for k in one)
    except Exception as exc:  # noqa: BLE001 - any failure at batch 2 means a pinned batch
        same, why = False, (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    else:
        why = "its rows change with the batch"
    if not same:
        raise ModelLoadError(
            f"'{path}' was exported at a fixed batch size and does not run at another "
            f"({why[:120]}); export it with a dynamic batch: torch.export.export(model, "
            "(x,), dynamic_shapes=({0: torch.export.Dim('batch')},))")

