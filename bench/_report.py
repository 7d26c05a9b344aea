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
    model = info["model"]
    part = info["partial_targets"]
    return [
        f"command:  {info['command']}",
        f"date:     {info['date']}",
        f"machine:  {m['nproc']} CPUs ({m['cpu']}), {m['memory_bytes'] / 2**30:.1f} GiB RAM, "
        f"Linux {m['kernel']}, Python {m['python']}",
        f"data dir: {m['data_dir']} ({m['data_dir_free_bytes'] / 2**30:.0f} GiB free)",
        "versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"model:    {model['arrays']} arrays, {mib(model['bytes'])} MiB {model['dtype']}, "
        f"width {model['width']}, largest {model['largest']}",
        f"partial:  variable {part['variable']['name']} ({mib(part['variable']['bytes'])} MiB); "
        f"rows {part['slice']['rows'][0]}:{part['slice']['rows'][1]} of {part['slice']['name']}",
    ]


def mib(nbytes: float) -> str:
    return f"{nbytes / MiB:.1f}"


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ok(record: dict[str, Any], phase: str) -> dict[str, Any] | None:
    result: dict[str, Any] | None = record.get(phase)
    if result is None or "error" in result or "skipped" in result:
        return None
    return result


def summarize(records: list[dict[str, Any]], model_bytes: int) -> dict[str, Any]:
    """Medians over repeats of one method's phases; RSS as extra over the model's bytes."""
    saves = [r for rec in records if (r := _ok(rec, "save"))]
    restores = [r for rec in records if (r := _ok(rec, "restore"))]
    parts = [r for rec in records if (r := _ok(rec, "partial"))]

    def med(results: list[dict[str, Any]], key: str, minus: int = 0) -> float | None:
        value = median([r[key] for r in results])
        return None if value is None else value - minus

    summary: dict[str, Any] = {
        "save_s": med(saves, "seconds"),
        "restore_s": med(restores, "seconds"),
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


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _ratio(value: float | None, floor: float | None) -> str:
    return "-" if value is None or not floor else f"{value / floor:.2f}"


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


MAIN_HEADERS = ["method", "save s", "restore s", "save x raw", "restore x raw",
                "save peak extra MiB (% model)", "restore peak extra MiB (% model)",
                "imports MiB"]


def main_rows(summaries: dict[str, dict[str, Any]], model_bytes: int) -> list[list[str]]:
    raw = summaries.get("raw", {})
    rows = []
    for name, s in summaries.items():
        rows.append([
            name, _cell(s["save_s"], ".2f"), _cell(s["restore_s"], ".2f"),
            _ratio(s["save_s"], raw.get("save_s")), _ratio(s["restore_s"], raw.get("restore_s")),
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
