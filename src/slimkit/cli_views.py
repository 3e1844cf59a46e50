"""Rich tables for the CLI (presentation only; every number comes from measure/ or a report)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from slimkit.report.fmt import fmt_bits, speed_change
from slimkit.report.fmt import fmt_bytes as human_bytes


def _pct(acc: dict | None, key: str = "top1") -> str:
    return f"{100 * acc[key]:.2f}%" if acc else "—"


def _ms(m: dict, rt: str, b: str) -> str:
    try:
        return f"{m['latency'][rt][b]['median_ms']:.3f} ms"
    except (KeyError, TypeError):
        return "—"


def before_after(report: dict[str, Any]) -> Table:
    """The before/after table printed at the end of ``compress`` and ``demo``."""
    base, final, cmp = report["baseline"], report["final"], report["comparison"]
    table = Table(title=f"{report['model']['name']}: baseline vs final (measured in one run)")
    for col in ("", "baseline", "final", "ratio"):
        table.add_column(col, justify="right" if col else "left")

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a and b else "—"

    table.add_row("params", f"{base['params']:,}", f"{final['params']:,}",
                  ratio(base["params"], final["params"]))
    table.add_row("non-zero params", f"{base['nonzero_params']:,}",
                  f"{final['nonzero_params']:,}",
                  ratio(base["nonzero_params"], final["nonzero_params"]))
    if base.get("bits_per_param") and final.get("bits_per_param"):
        table.add_row("bits / parameter", fmt_bits(base["bits_per_param"]),
                      fmt_bits(final["bits_per_param"]),
                      ratio(base["bits_per_param"], final["bits_per_param"]))
    table.add_row("artifact on disk", human_bytes(base["size_bytes"]),
                  human_bytes(final["size_bytes"]), f"{cmp['size_ratio']:.2f}x")
    table.add_row("ONNX file", human_bytes(base["onnx_size_bytes"]),
                  human_bytes(final["onnx_size_bytes"]), f"{cmp['onnx_size_ratio']:.2f}x")
    table.add_row("MACs / sample", f"{base['macs']:,}", f"{final['macs']:,}",
                  ratio(base["macs"], final["macs"]))
    table.add_row("top-1 accuracy", _pct(base["accuracy"]), _pct(final["accuracy"]), "")
    for rt in ("torch", "onnxruntime"):
        for b, r in cmp[rt].items():
            table.add_row(f"latency {rt} b={b}", _ms(base, rt, b), _ms(final, rt, b),
                          speed_change(r["speedup"], r.get("speedup_ci95"))[0])
    return table


def _num(x: float) -> str:
    """Three decimals, or three significant digits for tiny values (parity differences)."""
    return f"{x:.2e}" if 0 < abs(x) < 0.01 else f"{x:.3f}"


def verdict_lines(report: dict[str, Any]) -> list[str]:
    v = report["verdict"]
    head = ("[bold green]target MET[/]" if v["met"] else "[bold red]target MISSED[/]")
    lines = [head if v["criteria"] else "[yellow]no target set[/]"]
    for c in v["criteria"]:
        mark = "[green]met[/]" if c["met"] else "[red]missed[/]"
        got = "—" if c["achieved"] is None else _num(c["achieved"])
        if c.get("ci95"):  # a timed ratio: its 95% interval
            got += f" [95% CI {_num(c['ci95'][0])}-{_num(c['ci95'][1])}]"
        unit = f" {c['unit']}" if c["unit"] else ""
        by = "" if c["margin"] is None else f" (by {_num(abs(c['margin']))}{unit})"
        lines.append(f"  {c['name']}: asked {c['asked']}{unit}, got {got}: {mark}{by}")
    p = report["parity"]
    lines.append(f"ONNX Runtime vs PyTorch max |diff| = {p['max_abs_diff']:.2e} "
                 f"({'ok' if p['ok'] else 'ABOVE'} atol {p['atol']:g})")
    return lines


def layer_rows(layers: list[dict]) -> Table:
    """Per layer: params (every weight, whatever its dtype), non-zeros, bits per weight, MACs."""
    table = Table(title="layers")
    for col in ("layer", "type", "params", "non-zero", "bits", "MACs"):
        table.add_column(col, justify="left" if col in ("layer", "type") else "right")
    for r in layers:
        table.add_row(r["name"], r["type"], f"{r['params']:,}", f"{r['nonzero_params']:,}",
                      fmt_bits(r.get("weight_bits")), f"{r['macs']:,}")
    return table


def compare_table(result: dict[str, Any]) -> Table:
    """``slimkit compare``: run A vs run B, the better value in bold."""
    a, b = result["a"], result["b"]
    table = Table(title=f"A = {a['path']} ({', '.join(a['stages']) or 'no stages'})\n"
                        f"B = {b['path']} ({', '.join(b['stages']) or 'no stages'})")
    for col in ("", "A", "B", "B / A"):
        table.add_column(col, justify="right" if col else "left")

    def cell(v: float | None, bold: bool) -> str:
        if v is None:
            return "—"
        text = f"{v:,}" if isinstance(v, int) else (f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}")
        return f"[bold]{text}[/]" if bold else text

    for r in result["rows"]:
        ratio = "—" if r["ratio_b_to_a"] is None else f"{r['ratio_b_to_a']:.3g}"
        table.add_row(r["name"], cell(r["a"], r["winner"] == "A"),
                      cell(r["b"], r["winner"] == "B"), ratio)
    met = {True: "met", False: "missed", None: "no target"}
    table.add_row("target", met[a["target_met"]], met[b["target_met"]], "")
    return table
