"""Safe access into the report dict and human formatting of its values.

The report dict is produced by the pipeline and any optional key may be absent,
``None``, or (in a hand-edited file) of the wrong type. Every accessor here
therefore returns ``None`` instead of raising, and every formatter turns ``None``
into an em dash, so a partial report still renders.

Formatters return plain text; the templates escape it for HTML (jinja2 autoescaping).
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from typing import Any, NamedTuple

DASH = "—"

#: Display names of the runtimes a latency can be measured with.
RUNTIME_NAMES = {"torch": "PyTorch", "onnxruntime": "ONNX Runtime"}


class Cell(NamedTuple):
    """A table cell as its template shows it: the text, and a tone class (``good``, ``worse``,
    ``na``, or none)."""

    text: str
    tone: str = ""


def dig(obj: Any, *keys: Any) -> Any:
    """Return ``obj[k1][k2]...``, or None when a step is missing or not indexable.

    Example:
        >>> dig({"a": {"b": [1, 2]}}, "a", "b", 1)
        2
        >>> dig({"a": None}, "a", "b") is None
        True
    """
    for key in keys:
        if isinstance(obj, Mapping):
            obj = obj.get(key)
        elif isinstance(obj, list | tuple) and isinstance(key, int) and -len(obj) <= key < len(obj):
            obj = obj[key]
        else:
            return None
    return obj


def as_mapping(value: Any) -> Mapping[str, Any]:
    """``value`` when it is a mapping, else an empty dict."""
    return value if isinstance(value, Mapping) else {}


def as_list(value: Any) -> list[Any]:
    """``value`` as a list when it is a list or tuple, else an empty list."""
    return list(value) if isinstance(value, list | tuple) else []


def num(value: Any) -> float | int | None:
    """``value`` when it is a real number (bools excluded), else None."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return value
    return None


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite real number, else None."""
    value = num(value)
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def by_batch(mapping: Any, batch: Any) -> Any:
    """Look up a per-batch-size entry; JSON keys are strings, Python ones may be ints."""
    if not isinstance(mapping, Mapping):
        return None
    for key in (str(batch), batch):
        if key in mapping:
            return mapping[key]
    text = str(batch)
    if text.lstrip("-").isdigit() and int(text) in mapping:
        return mapping[int(text)]
    return None


def batch_sort_key(batch: Any) -> tuple[int, float, str]:
    """Sort batch sizes numerically when they are numbers, otherwise by text."""
    text = str(batch)
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


def _fallback(value: Any) -> str:
    """Text for a value a formatter cannot handle: a dash for None, else its ``str``."""
    return DASH if value is None else str(value)


def fmt_int(value: Any) -> str:
    """``61706`` -> ``61,706``."""
    v = num(value)
    if v is None:
        return _fallback(value)
    if not math.isfinite(v):
        return str(v)
    return f"{round(v):,}"


def fmt_num(value: Any, digits: int = 2) -> str:
    """A number with ``digits`` decimals (integers keep none)."""
    v = num(value)
    if v is None:
        return _fallback(value)
    if isinstance(v, numbers.Integral):
        return f"{int(v):,}"
    return f"{v:,.{digits}f}"


def fmt_bits(value: Any) -> str:
    """Bits per weight: ``8`` -> ``8``, ``4.125`` -> ``4.13`` (a mean over mixed widths)."""
    v = num(value)
    if v is None:
        return _fallback(value)
    if not math.isfinite(v):
        return str(v)
    return f"{int(v)}" if float(v).is_integer() else f"{v:.2f}"


def fmt_bytes(value: Any) -> str:
    """Bytes in binary units: ``246824`` -> ``241.0 KiB``."""
    v = num(value)
    if v is None:
        return _fallback(value)
    if not math.isfinite(v):
        return str(v)
    size = float(v)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # unreachable; keeps type checkers content


def fmt_bytes_full(value: Any) -> str:
    """Exact bytes and the human unit: ``246,824 B (241.0 KiB)``."""
    v = num(value)
    if v is None or not math.isfinite(v) or abs(v) < 1024:
        return fmt_bytes(value)
    return f"{round(v):,} B ({fmt_bytes(v)})"


def fmt_pct(fraction: Any) -> str:
    """A fraction in [0, 1] as a percentage with 2 decimals: ``0.9912`` -> ``99.12%``."""
    v = num(fraction)
    if v is None:
        return _fallback(fraction)
    return f"{v * 100:.2f}%"


def fmt_ms(value: Any) -> str:
    """Milliseconds, with more decimals below 1 ms."""
    v = num(value)
    if v is None:
        return _fallback(value)
    return f"{v:.3f} ms" if abs(v) < 1 else f"{v:,.2f} ms"


def fmt_ratio(value: Any) -> str:
    """A ratio: ``3.9`` -> ``3.90×``."""
    v = num(value)
    if v is None:
        return _fallback(value)
    return f"{v:.2f}×"


def fmt_sci(value: Any) -> str:
    """Scientific notation for small differences: ``1e-6`` -> ``1.00e-06``."""
    v = num(value)
    if v is None:
        return _fallback(value)
    return f"{v:.2e}"


def fmt_seconds(value: Any) -> str:
    """Seconds of wall time: ``3.2`` -> ``3.2 s``, ``95`` -> ``1 min 35 s``."""
    v = num(value)
    if v is None:
        return _fallback(value)
    if v >= 60 and math.isfinite(v):
        minutes, seconds = divmod(round(v), 60)
        return f"{minutes} min {seconds} s"
    return f"{v:.1f} s"


def fmt_unit(value: Any, unit: Any) -> str:
    """A criterion value with its unit: ``x`` -> ``3.10×``, ``points`` -> ``0.40 pts``."""
    if value is None:
        return DASH
    if isinstance(value, Mapping) and "value" in value:
        value = value["value"]
    if num(value) is None:
        return str(value)
    unit = "" if unit is None else str(unit)
    if unit in ("x", "×"):
        return fmt_ratio(value)
    if unit in ("points", "pts", "pp"):
        return f"{fmt_num(value)} pts"
    return f"{fmt_num(value)} {unit}".rstrip()


def fmt_json(value: Any, indent: int | None = 2) -> str:
    """Any JSON-like value as text, never raising on odd objects."""
    try:
        return json.dumps(value, indent=indent, sort_keys=False, default=str, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def fmt_value(value: Any) -> str:
    """Generic text for a free-form value (environment entries, details)."""
    if value is None:
        return DASH
    if isinstance(value, Mapping | list | tuple):
        return fmt_json(value, indent=None)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def quality(measure: Any) -> tuple[str, float] | None:
    """A model's headline quality: ``("top-1 accuracy (%)", 95.1)`` for a classifier, else
    the task's primary (first) metric as it is (``("perplexity", 12.3)``)."""
    top1 = finite(dig(measure, "accuracy", "top1"))
    if top1 is not None:
        return "top-1 accuracy (%)", top1 * 100
    for key, value in as_mapping(dig(measure, "metrics")).items():
        if finite(value) is not None:
            return str(key), float(value)
    return None


def speed_change(speedup: Any, ci: Any = None) -> tuple[str, str]:
    """A latency change as ``(text, tone)``: ``speedup`` is the old time over the new one,
    ``ci`` its 95% interval ``[low, high]``.

    ``3.10× faster [2.90–3.30]`` (tone ``good``), ``1.20× slower [1.10–1.30]`` (``worse``),
    and ``no change [0.97–1.04×]`` (``na``) when the interval holds 1: a difference the
    timing noise could make. Without an interval, the ratio alone, as measured.

    Example:
        >>> speed_change(2.0, [1.8, 2.2])
        ('2.00× faster [1.80–2.20]', 'good')
        >>> speed_change(0.5, [0.4, 0.6])
        ('2.00× slower [1.67–2.50]', 'worse')
        >>> speed_change(1.01, [0.97, 1.04])
        ('no change [0.97–1.04×]', 'na')
    """
    v = finite(speedup)
    if v is None or v <= 0:
        return DASH, "na"
    bounds = [finite(b) for b in as_list(ci)]
    lo, hi = bounds if len(bounds) == 2 and None not in bounds else (None, None)
    if lo is not None and hi is not None and lo > 0:
        if lo <= 1 <= hi:
            return f"no change [{lo:.2f}–{hi:.2f}×]", "na"
        if v >= 1:
            return f"{v:.2f}× faster [{lo:.2f}–{hi:.2f}]", "good"
        return f"{1 / v:.2f}× slower [{1 / hi:.2f}–{1 / lo:.2f}]", "worse"
    if abs(v - 1) < 5e-3:
        return "unchanged", "na"
    return (f"{v:.2f}× faster", "good") if v > 1 else (f"{1 / v:.2f}× slower", "worse")
