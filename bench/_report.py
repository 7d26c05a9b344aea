"""Run description (machine, versions) and result tables."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from _model import MiB

REFERENCE = "raw8"  # every ratio is a method's seconds over this method's, round by round

PACKAGES = ["numpy", "zarr", "numcodecs", "crc32c", "ml_dtypes", "safetensors", "tensorstore",
            "torch", "psutil", "zarrckpt"]


def versions() -> dict[str, str]:
    found = {}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def _meminfo_bytes(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine(data_dir: Path) -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu": _cpu_model(),
        "memory_bytes": _meminfo_bytes("MemTotal"),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "data_dir": str(data_dir),
        "data_dir_free_bytes": shutil.disk_usage(data_dir).free,
    }


def header_lines(info: dict[str, Any]) -> list[str]:
    m, v = info["machine"], info["versions"]
    return [
        f"command:  {info['command']}",
        f"date:     {info['date']}",
        f"machine:  {m['nproc']} CPUs ({m['cpu']}), {m['memory_bytes'] / 2**30:.1f} GiB RAM, "
        f"Linux {m['kernel']}, Python {m['python']}",
        f"data dir: {m['data_dir']} ({m['data_dir_free_bytes'] / 2**30:.0f} GiB free)",
        "versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"sizes:    {', '.join(info['size_labels'])}; {info['repeat']} round(s); "
        f"ratios against {REFERENCE}",
    ]


def model_lines(size: dict[str, Any]) -> list[str]:
    """The model of one size of the sweep and its partial-read targets."""
    model, part = size["model"], size["partial_targets"]
    return [
        f"model:    {model['arrays']} arrays, {mib(model['bytes'])} MiB {model['dtype']}, "
        f"width {model['width']}, largest {model['largest']}",
        f"partial:  variable {part['variable']['name']} ({mib(part['variable']['bytes'])} MiB); "
        f"rows {part['slice']['rows'][0]}:{part['slice']['rows'][1]} of {part['slice']['name']}",
    ]


def mib(nbytes: float) -> str:
    return f"{nbytes / MiB:.1f}"


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def spread(values: list[float]) -> dict[str, float] | None:
    """Median, min, max and count of a list of values (None when empty)."""
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def _ok(record: dict[str, Any], phase: str) -> dict[str, Any] | None:
    result: dict[str, Any] | None = record.get(phase)
    if result is None or "error" in result or "skipped" in result:
        return None
    return result


def round_ratios(records: list[dict[str, Any]], reference: list[dict[str, Any]] | None,
                 phase: str) -> list[float]:
    """Per round: the method's seconds / the reference's seconds of the same round."""
    if reference is None:
        return []
    ratios = []
    for mine, ref in zip(records, reference, strict=True):
        got, base = _ok(mine, phase), _ok(ref, phase)
        if got and base and base["seconds"] > 0:
            ratios.append(got["seconds"] / base["seconds"])
    return ratios


def summarize(records: list[dict[str, Any]], model_bytes: int,
              reference: list[dict[str, Any]] | None) -> dict[str, Any]:
    """One method's rounds at one size: seconds and ratios to the reference as median
    (min-max), RSS medians as extra over the model's bytes.

    ``records`` and ``reference`` (the reference method's records, or None when it
    did not run) are indexed by round.
    """
    saves = [r for rec in records if (r := _ok(rec, "save"))]
    restores = [r for rec in records if (r := _ok(rec, "restore"))]
    parts = [r for rec in records if (r := _ok(rec, "partial"))]

    def med(results: list[dict[str, Any]], key: str, minus: int = 0) -> float | None:
        value = median([r[key] for r in results])
        return None if value is None else value - minus

    summary: dict[str, Any] = {
        "save_s": spread([r["seconds"] for r in saves]),
        "restore_s": spread([r["seconds"] for r in restores]),
        "save_x_ref": spread(round_ratios(records, reference, "save")),
        "restore_x_ref": spread(round_ratios(records, reference, "restore")),
        "save_extra_rss": med(saves, "peak_rss", model_bytes),
        "restore_extra_rss": med(restores, "peak_rss", model_bytes),
        "import_rss": med(saves + restores, "base_rss"),
        "bytes_on_disk": med(saves, "bytes_on_disk"),
        "files": med(saves, "files"),
        "resident_after_drop": med(restores, "resident_after_drop"),
    }
    for label in ("variable", "slice"):
        summary[f"{label}_s"] = median([p[label]["seconds"] for p in parts])
        summary[f"{label}_files"] = parts[0][label]["files"] if parts else None
    summary["problems"] = sorted({
        f"{phase}: {res.get('error') or 'skipped: ' + res['skipped']}"
        for rec in records for phase, res in rec.items()
        if isinstance(res, dict) and ("error" in res or "skipped" in res)
    })
    return summary


def _median_of(stat: dict[str, float] | None) -> float | None:
    return None if stat is None else stat["median"]


def _over(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else value / base


def sweep(sizes: list[dict[str, Any]]) -> dict[str, Any]:
    """Across the sizes of a run: each method's median ratios per size and how its
    median seconds grow from the smallest to the largest model."""
    methods = list(dict.fromkeys(m for size in sizes for m in size["summary"]))
    per_method: dict[str, Any] = {}
    for name in methods:
        per_method[name] = {}
        for size in sizes:
            s = size["summary"].get(name)
            per_method[name][size["label"]] = None if s is None else {
                "save_x_ref": _median_of(s["save_x_ref"]),
                "restore_x_ref": _median_of(s["restore_x_ref"]),
                "save_s": _median_of(s["save_s"]),
                "restore_s": _median_of(s["restore_s"]),
                "restore_extra_rss": s["restore_extra_rss"],
                "restore_extra_rss_pct": None if s["restore_extra_rss"] is None
                else 100 * s["restore_extra_rss"] / size["model"]["bytes"],
            }
    result: dict[str, Any] = {"reference": REFERENCE, "sizes": [s["label"] for s in sizes],
                              "methods": per_method, "growth": None}
    if len(sizes) > 1:
        small = min(sizes, key=lambda s: s["model"]["bytes"])
        large = max(sizes, key=lambda s: s["model"]["bytes"])
        growth: dict[str, Any] = {
            "smallest": small["label"], "largest": large["label"],
            "size_ratio": large["model"]["bytes"] / small["model"]["bytes"], "methods": {}}
        for name, cells in per_method.items():
            lo, hi = cells[small["label"]] or {}, cells[large["label"]] or {}
            growth["methods"][name] = {phase: _over(hi.get(f"{phase}_s"), lo.get(f"{phase}_s"))
                                       for phase in ("save", "restore")}
        result["growth"] = growth
    return result


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _spread_cell(stat: dict[str, float] | None, fmt: str | None = None) -> str:
    """``median (min-max)``; the median alone for one round. Seconds (fmt None) get 3
    decimals below 1 s, 2 above."""
    if stat is None:
        return "-"
    fmt = fmt or (".3f" if stat["median"] < 1 else ".2f")
    text = format(stat["median"], fmt)
    if stat["n"] > 1:
        text += f" ({stat['min']:{fmt}}-{stat['max']:{fmt}})"
    return text


def _rss(extra: float | None, model_bytes: int) -> str:
    return "-" if extra is None else f"{extra / MiB:.0f} ({100 * extra / model_bytes:.0f}%)"


def markdown(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.rjust(w) if i else c.ljust(w)
                              for i, (c, w) in enumerate(zip(r, widths, strict=True))) + " |"
            for r in rows]
    return "\n".join([line, rule, *body])


MAIN_HEADERS = ["method", "save s", "restore s", f"save x {REFERENCE}", f"restore x {REFERENCE}",
                "save peak extra MiB (% model)", "restore peak extra MiB (% model)",
                "imports MiB"]


def main_rows(summaries: dict[str, dict[str, Any]], model_bytes: int) -> list[list[str]]:
    rows = []
    for name, s in summaries.items():
        rows.append([
            name, _spread_cell(s["save_s"]), _spread_cell(s["restore_s"]),
            _spread_cell(s["save_x_ref"], ".2f"), _spread_cell(s["restore_x_ref"], ".2f"),
            _rss(s["save_extra_rss"], model_bytes), _rss(s["restore_extra_rss"], model_bytes),
            _cell(None if s["import_rss"] is None else s["import_rss"] / MiB, ".0f"),
        ])
    return rows


PARTIAL_HEADERS = ["method", "one variable s", "its chunk files", "row slice s",
                   "slice chunk files"]


def partial_rows(summaries: dict[str, dict[str, Any]]) -> list[list[str]]:
    return [[name, _cell(s["variable_s"], ".3f"), _cell(s["variable_files"], "d"),
             _cell(s["slice_s"], ".3f"), _cell(s["slice_files"], "d")]
            for name, s in summaries.items() if s["variable_s"] is not None]


def sweep_table(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows: per size ``save / restore x reference`` (median ratios), and
    largest-over-smallest median seconds when the sweep has more than one size."""
    headers = ["method", *(f"{label} save / restore x {REFERENCE}" for label in data["sizes"])]
    growth = data["growth"]
    if growth:
        headers.append(f"{growth['largest']}/{growth['smallest']} save, restore s "
                       f"(size x{growth['size_ratio']:.2f})")
    rows = []
    for name, cells in data["methods"].items():
        row = [name]
        for label in data["sizes"]:
            c = cells[label] or {}
            row.append(f"{_cell(c.get('save_x_ref'), '.2f')} / "
                       f"{_cell(c.get('restore_x_ref'), '.2f')}")
        if growth:
            g = growth["methods"][name]
            row.append(f"{_cell(g['save'], '.2f')}, {_cell(g['restore'], '.2f')}")
        rows.append(row)
    return headers, rows


def restore_rss_line(data: dict[str, Any], name: str = "zarrckpt") -> str | None:
    """One method's median restore peak RSS above the model, per size (None if absent)."""
    cells = data["methods"].get(name)
    if cells is None:
        return None
    parts = []
    for label in data["sizes"]:
        c = cells[label]
        extra = None if c is None else c["restore_extra_rss"]
        parts.append(f"{label} " + ("-" if extra is None else
                     f"{extra / MiB:.0f} MiB ({c['restore_extra_rss_pct']:.1f}%)"))
    return f"{name} restore peak RSS above the model (median, % of model): " + "; ".join(parts)
