"""quant/ is layered: primitives -> modules / calibration / plans / solvers -> techniques.

Techniques (ptq, qat, mixed, weight_only, dynamic) sit on one floor: none imports another, and
nothing below them imports any of them. The import scan reads each module's source with ``ast``
(function-level and ``TYPE_CHECKING`` imports count too).
"""

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest
import torch
from torch import nn

import slimkit.quant
from slimkit.core.stages import STAGES

PKG = "slimkit.quant"
#: technique module -> the stage kind it registers beside its config
TECHNIQUES = {"ptq": "ptq", "qat": "qat", "mixed": "mixed_precision",
              "weight_only": "weight_only_quant", "dynamic": "dynamic_quant"}
MODULES = sorted(m.name for m in pkgutil.iter_modules(slimkit.quant.__path__))
LOWER = [m for m in MODULES if m not in TECHNIQUES]


def quant_imports(module: str) -> set[str]:
    """The ``slimkit.quant`` submodules that ``module``'s source imports, at any scope."""
    path = Path(importlib.import_module(f"{PKG}.{module}").__file__)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            # relative (``from .x import y``) resolves inside the package; none nests deeper
            base = ".".join(filter(None, [PKG, node.module])) if node.level else node.module
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            head, _, rest = name.partition(f"{PKG}.")
            if not head and rest.split(".")[0] in MODULES:
                found.add(rest.split(".")[0])
    found.discard(module)
    return found


def test_every_module_imports_and_the_scan_sees_imports():
    for name in MODULES:
        importlib.import_module(f"{PKG}.{name}")
    assert set(TECHNIQUES) <= set(MODULES)
    assert {"primitives", "packed", "dynamic_linear", "gptq", "calibrate", "plan"} <= set(MODULES)
    # the scan is not vacuous: the known downward imports are found
    assert {"gptq", "packed", "primitives", "calibrate", "plan"} <= quant_imports("weight_only")
    assert {"dynamic_linear", "calibrate", "modules", "plan"} <= quant_imports("dynamic")
    assert {"calibrate", "modules"} <= quant_imports("mixed")


@pytest.mark.parametrize("technique", sorted(TECHNIQUES))
def test_techniques_do_not_import_each_other(technique: str):
    others = set(TECHNIQUES) - {technique}
    assert quant_imports(technique) & others == set()


@pytest.mark.parametrize("module", LOWER)
def test_lower_modules_import_no_technique(module: str):
    assert quant_imports(module) & set(TECHNIQUES) == set()


def test_gptq_is_a_solver_over_primitives():
    deps = quant_imports("gptq")
    assert "weight_only" not in deps
    assert "primitives" in deps
    assert "gptq" in quant_imports("weight_only")


def test_quant_import_graph_has_no_cycle():
    graph = {m: quant_imports(m) for m in MODULES}
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"import cycle: {' -> '.join((*path, node))}"
        if node in done:
            return
        for dep in graph[node]:
            visit(dep, (*path, node))
        done.add(node)

    for m in MODULES:
        visit(m, ())
    assert done == set(MODULES)


def test_primitives_are_pure_tensor_functions():
    prims = importlib.import_module(f"{PKG}.primitives")
    assert quant_imports("primitives") == set()
    for name, obj in vars(prims).items():
        if isinstance(obj, type) and obj.__module__ == prims.__name__:
            assert not issubclass(obj, (nn.Module, torch.autograd.Function)), name
    for name in ("group_qparams", "rtn_quantize", "dequantize_codes", "pack_rows",
                 "unpack_rows", "dequantize_packed", "activation_qparams"):
        assert callable(getattr(prims, name)), name


@pytest.mark.parametrize(("technique", "kind"), sorted(TECHNIQUES.items()))
def test_each_technique_registers_its_stage_beside_its_config(technique: str, kind: str):
    # the configs share one module that imports no torch (recipes are checked before torch)
    spec = STAGES.get(kind)
    assert spec.config.__module__ == f"{PKG}.config"
    assert spec.apply.__module__ == f"{PKG}.{technique}"
