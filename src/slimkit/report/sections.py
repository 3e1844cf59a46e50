"""The data of the report's prose sections: header, verdict banner, highlights, parity and
fidelity, environment.

Each function takes the whole report dict and returns the view its template
(``templates/<section>.html.j2``) renders: plain text and tone classes, no markup. The
templates autoescape, so text from the report is never trusted as HTML.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from slimkit.report.fmt import (
    DASH,
    RUNTIME_NAMES,
    Cell,
    as_list,
    as_mapping,
    by_batch,
    dig,
    finite,
    fmt_int,
    fmt_json,
    fmt_pct,
    fmt_ratio,
    fmt_sci,
    fmt_unit,
    fmt_value,
    num,
    speed_change,
)

#: Human names of the target criteria the pipeline knows; others show their raw name.
CRITERION_LABELS = {
    "max_accuracy_drop": "Accuracy drop (top-1)",
    "min_size_ratio": "Size reduction",
    "min_speedup": "Speedup",
    "min_onnx_size_ratio": "ONNX size reduction",
    "max_latency_ms": "Latency",
    "max_size_bytes": "Size on disk",
    "max_onnx_diff": "ONNX Runtime vs PyTorch, max |diff|",
}
_CRITERION_UNITS = {"max_accuracy_drop": "points", "min_size_ratio": "x", "min_speedup": "x"}
_ENV_ORDER = ("cpu", "threads", "platform", "python", "torch", "onnxruntime", "onnx", "numpy")
_ENV_LABELS = {
    "cpu": "CPU",
    "threads": "Threads",
    "python": "Python",
    "torch": "PyTorch",
    "onnxruntime": "ONNX Runtime",
    "onnx": "ONNX",
    "numpy": "NumPy",
    "platform": "Platform",
}


def header(report: Mapping[str, Any]) -> dict[str, Any]:
    """The title's model name, and the facts on the data, input and run."""
    name = dig(report, "model", "name")
    facts = []
    data = as_mapping(report.get("data"))
    if data.get("name") is not None:
        sizes = [f"{fmt_int(data[k])} {k[2:]}" for k in ("n_train", "n_test") if k in data]
        facts.append(f"data {data['name']}" + (f" ({' / '.join(sizes)})" if sizes else ""))
    shape = dig(report, "model", "input_shape")
    if shape is not None:
        facts.append(f"input {fmt_value(shape)}")
    if report.get("created") is not None:
        facts.append(f"created {report['created']}")
    if report.get("slimkit_version") is not None:
        facts.append(f"slimkit {report['slimkit_version']}")
    return {"name": str(name if name is not None else "unnamed model"), "facts": facts}


def _criteria(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The verdict's criteria; without a verdict, the target's, with nothing achieved."""
    criteria = [c for c in as_list(dig(report, "verdict", "criteria")) if isinstance(c, Mapping)]
    if criteria:
        return criteria
    return [
        {"name": str(name), "asked": asked, "unit": _CRITERION_UNITS.get(str(name))}
        for name, asked in as_mapping(report.get("target")).items()
    ]


def _overall(report: Mapping[str, Any], criteria: list[Mapping[str, Any]]) -> bool | None:
    met = dig(report, "verdict", "met")
    if isinstance(met, bool):
        return met
    flags = [c.get("met") for c in criteria]
    if flags and all(isinstance(f, bool) for f in flags):
        return all(flags)
    return None


def _criterion_label(report: Mapping[str, Any], criterion: Mapping[str, Any]) -> str:
    name = str(criterion.get("name", DASH))
    label = CRITERION_LABELS.get(name, name)
    runtime = criterion.get("runtime") or dig(report, "target", name, "runtime")
    batch = criterion.get("batch") or dig(report, "target", name, "batch")
    if runtime is not None or batch is not None:
        where = [RUNTIME_NAMES.get(str(runtime), str(runtime))] if runtime is not None else []
        where += [f"batch {batch}"] if batch is not None else []
        label += f" ({', '.join(where)})"
    return label


def _margin_text(criterion: Mapping[str, Any]) -> str:
    margin = num(criterion.get("margin"))
    if margin is None:
        return DASH
    unit = criterion.get("unit")
    met = criterion.get("met")
    if met is True:
        return f"beats it by {fmt_unit(abs(margin), unit)}"
    if met is False:
        return f"short by {fmt_unit(abs(margin), unit)}"
    return fmt_unit(margin, unit)


def _achieved_text(criterion: Mapping[str, Any], unit: Any) -> str:
    """The achieved value, with its 95% interval when it is a timed ratio."""
    text = fmt_unit(criterion.get("achieved"), unit)
    ci = [finite(b) for b in as_list(criterion.get("ci95"))]
    if len(ci) == 2 and None not in ci:
        text += f" [{ci[0]:.2f}–{ci[1]:.2f}]"
    return text


def _flag(value: Any) -> bool | None:
    """A recorded met / ok flag: True or False, anything else unknown (None)."""
    return value if isinstance(value, bool) else None


def _criterion_row(report: Mapping[str, Any], criterion: Mapping[str, Any]) -> dict[str, Any]:
    name = str(criterion.get("name", ""))
    unit = criterion.get("unit") or _CRITERION_UNITS.get(name)
    bound = (
        "at most " if name.startswith("max_") else "at least " if name.startswith("min_") else ""
    )
    asked = criterion.get("asked")
    met = _flag(criterion.get("met"))
    return {
        "label": _criterion_label(report, criterion),
        "asked": Cell(bound + fmt_unit(asked, unit) if asked is not None else DASH),
        "achieved": Cell(_achieved_text(criterion, unit)),
        "margin": Cell(_margin_text({**criterion, "unit": unit}),
                       "good" if met is True else "worse" if met is False else "na"),
        "met": met,
    }


def verdict(report: Mapping[str, Any]) -> dict[str, Any]:
    """The green or red banner: target met or missed, and each criterion asked vs achieved."""
    criteria = _criteria(report)
    met = _overall(report, criteria)
    status, tone = {True: ("Target MET", "ok"), False: ("Target MISSED", "bad")}.get(
        met, ("No verdict", "na")
    )
    flags = [c.get("met") for c in criteria]
    passed = sum(f is True for f in flags)
    if criteria and all(isinstance(f, bool) for f in flags):
        summary = f"{passed} of {len(criteria)} criteria met"
    elif criteria:
        summary = "the criteria below were asked, but no verdict was recorded"
    else:
        summary = "no target was set for this run"
    return {"status": status, "tone": tone, "summary": summary,
            "criteria": [_criterion_row(report, c) for c in criteria]}


def _speedup_key(report: Mapping[str, Any]) -> tuple[str, Any]:
    runtime = dig(report, "target", "min_speedup", "runtime")
    batch = dig(report, "target", "min_speedup", "batch")
    if runtime is not None and batch is not None:
        return str(runtime), batch
    for candidate in ("onnxruntime", "torch"):
        if by_batch(dig(report, "comparison", candidate), 1) is not None:
            return candidate, 1
    return "onnxruntime", 1


def _chips(report: Mapping[str, Any]) -> list[str]:
    """Headline numbers: size ratio, speedup, and the accuracy (or primary metric) change."""
    chips = []
    size_ratio = finite(dig(report, "comparison", "size_ratio"))
    base_size = finite(dig(report, "baseline", "size_bytes"))
    final_size = finite(dig(report, "final", "size_bytes"))
    if size_ratio is None and base_size and final_size:
        size_ratio = base_size / final_size
    if size_ratio is not None:
        chips.append(f"{fmt_ratio(size_ratio)} smaller on disk")
    runtime, batch = _speedup_key(report)
    entry = by_batch(dig(report, "comparison", runtime), batch)
    speedup = finite(dig(entry, "speedup"))
    if speedup is None:
        before, after = finite(dig(entry, "baseline_ms")), finite(dig(entry, "final_ms"))
        speedup = before / after if before and after else None
    if speedup is not None:
        where = f"{RUNTIME_NAMES.get(runtime, runtime)}, batch {batch}"
        chips.append(f"{speed_change(speedup, dig(entry, 'speedup_ci95'))[0]} ({where})")
    before = finite(dig(report, "baseline", "accuracy", "top1"))
    after = finite(dig(report, "final", "accuracy", "top1"))
    if before is not None and after is not None:
        delta = (after - before) * 100
        chips.append(f"top-1 {fmt_pct(before)} → {fmt_pct(after)} ({delta:+.2f} pts)")
    elif dig(report, "baseline", "metrics"):  # another task: its first (primary) metric
        name = next(iter(as_mapping(dig(report, "baseline", "metrics"))))
        b = finite(dig(report, "baseline", "metrics", name))
        f = finite(dig(report, "final", "metrics", name))
        if b is not None and f is not None:
            chips.append(f"{name} {b:.4g} → {f:.4g}")
    return chips


def highlights(report: Mapping[str, Any]) -> dict[str, Any]:
    """The headline chips, and every stage's warning flag."""
    flags = [f for st in as_list(report.get("stages")) for f in as_list(dig(st, "flags"))]
    return {"chips": _chips(report), "warnings": [fmt_value(f) for f in flags]}


def _parity(report: Mapping[str, Any]) -> dict[str, Any] | None:
    check = as_mapping(report.get("parity"))
    if not check:
        return None
    return {
        "max_abs_diff": fmt_sci(check.get("max_abs_diff")),
        "tolerance": fmt_sci(check["atol"]) if num(check.get("atol")) else "",
        "ok": _flag(check.get("ok")),
    }


def _fidelity(report: Mapping[str, Any]) -> list[str]:
    fidelity = as_mapping(report.get("fidelity"))
    if not fidelity:
        return []
    cosine = finite(fidelity.get("cosine"))
    parts = [
        f"cosine {cosine:.4f}" if cosine is not None else f"cosine {DASH}",
        f"top-1 agreement {fmt_pct(fidelity.get('top1_agreement'))}",
        f"max abs diff {fmt_sci(fidelity.get('max_abs_diff'))}",
    ]
    per_output = as_mapping(fidelity.get("per_output"))
    if len(per_output) > 1:  # every output of a multi-output model, by name
        parts += [f"{name}: cosine {fmt_value(dig(v, 'cosine'))}, SQNR "
                  f"{fmt_value(dig(v, 'sqnr_db'))} dB" for name, v in per_output.items()]
    return parts


def checks(report: Mapping[str, Any]) -> dict[str, Any]:
    """The ONNX Runtime vs PyTorch parity check (None when not checked), and the parts of the
    final-vs-baseline fidelity line (empty when not measured)."""
    return {"parity": _parity(report), "fidelity": _fidelity(report)}


def environment(report: Mapping[str, Any]) -> dict[str, Any]:
    """The machine and library versions as (label, value) rows, then the recipe and the
    target as (title, JSON text) to fold away."""
    env = as_mapping(report.get("environment"))
    keys = [k for k in _ENV_ORDER if k in env] + sorted(
        (k for k in env if k not in _ENV_ORDER), key=str
    )
    return {
        "rows": [(str(_ENV_LABELS.get(str(k), k)), fmt_value(env[k])) for k in keys],
        "folded": [(title, fmt_json(report[key]))
                   for key, title in (("recipe", "Recipe"), ("target", "Target as asked"))
                   if report.get(key) is not None],
    }
