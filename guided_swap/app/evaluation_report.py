"""What ``guided-swap evaluate`` writes from the per-result evaluations: a table per map (Markdown and CSV, one
row per result), a summary (the mean of each metric per map) and a plot of the mean deletion and insertion
curves per map (a PNG drawn with matplotlib's ``Figure``, no pyplot), each written atomically.

>>> rows = [{"result": "a.jpg", "maps": {"cam": {"deletion_auc": 0.25, "deletion_curve": [1.0, 0.0]}}}]
>>> columns(rows, "cam")
['deletion_auc']
>>> summary_markdown(rows, {"steps": 1}).splitlines()[2]
'| cam | 1 | 0.2500 |'
"""
import csv
import io
import os
from typing import Any, Dict, List, Sequence

import numpy as np
from matplotlib.figure import Figure

from .._files import atomic_write

#: The columns of the tables, in this order, when measured; what each means is in docs/metrics.md.
COLUMNS = ("road_combined", "road_morf", "road_lerf", "confidence_change", "drop_in_confidence",
           "increase_in_confidence", "deletion_auc", "insertion_auc")
BETTER = {"road_combined": "higher", "road_morf": "lower", "road_lerf": "higher", "confidence_change": "higher",
          "drop_in_confidence": "lower", "increase_in_confidence": "higher", "deletion_auc": "lower",
          "insertion_auc": "higher"}


def map_names(rows: Sequence[dict]) -> List[str]:
    return list(dict.fromkeys(name for row in rows for name in row["maps"]))


def columns(rows: Sequence[dict], name: str) -> List[str]:
    present = {key for row in rows for key in row["maps"].get(name, {})}
    return [c for c in COLUMNS if c in present]


def _cell(value: Any) -> str:
    return "" if value is None else f"{value:.4f}"


def map_table(rows: Sequence[dict], name: str) -> List[List[Any]]:
    """One row per result holding map ``name``: its name and each metric."""
    keys = columns(rows, name)
    return [[row["result"]] + [row["maps"][name].get(k) for k in keys] for row in rows if name in row["maps"]]


def markdown(header: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(v if isinstance(v, str) else _cell(v) for v in line) + " |" for line in body]
    return "\n".join(lines) + "\n"


def summary_markdown(rows: Sequence[dict], settings: Dict[str, Any]) -> str:
    """The mean of each metric per map over the results (NaN values left out of the mean)."""
    keys = [c for c in COLUMNS if any(c in row["maps"].get(n, {}) for row in rows for n in map_names(rows))]
    body = []
    for name in map_names(rows):
        values = [[row["maps"][name].get(k) for k in keys] for row in rows if name in row["maps"]]
        means = [_mean([v[i] for v in values]) for i in range(len(keys))]
        body.append([name, str(len(values))] + means)
    header = ["map", "results"] + [f"{k} ({BETTER[k]} is better)" for k in keys]
    return markdown(header, body)


def _mean(values: Sequence[Any]):
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _write_text(path: str, text: str) -> str:
    with atomic_write(path) as temporary, open(temporary, "w", encoding="utf-8", newline="") as stream:
        stream.write(text)
    return path


def _csv(header: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in line] for line in body])
    return buffer.getvalue()


def curves_figure(rows: Sequence[dict]):
    """The mean deletion and insertion curves of each map (share of positions changed on x): a ``Figure``."""
    kinds = [k for k in ("deletion", "insertion") if any(f"{k}_curve" in m for r in rows for m in r["maps"].values())]
    fig = Figure(figsize=(4.2 * max(len(kinds), 1), 3.4))
    axes = fig.subplots(1, max(len(kinds), 1), squeeze=False)[0]
    for axis, kind in zip(axes, kinds):
        for name in map_names(rows):
            curves = [r["maps"][name][f"{kind}_curve"] for r in rows if f"{kind}_curve" in r["maps"].get(name, {})]
            if curves:
                mean = np.nanmean(np.array(curves, dtype=float), axis=0)
                area = _mean([r["maps"][name].get(f"{kind}_auc") for r in rows if name in r["maps"]])
                axis.plot(np.linspace(0, 1, mean.size), mean, label=f"{name} (AUC {area:.3f})")
        better = "lower" if kind == "deletion" else "higher"
        axis.set_title(f"{kind} ({better} area is better)", fontsize=9)
        axis.set_xlabel("share of positions " + ("removed" if kind == "deletion" else "inserted"), fontsize=8)
        axis.set_ylabel("target probability", fontsize=8)
        axis.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_report(out: str, rows: Sequence[dict], settings: Dict[str, Any]) -> List[str]:
    """``OUT/summary.md``, ``OUT/metrics.MAP.md`` and ``.csv`` per map, ``OUT/curves.png``; the paths written."""
    rows = [row for row in rows if row is not None]
    written = [_write_text(os.path.join(out, "summary.md"), summary_markdown(rows, settings))]
    for name in map_names(rows):
        header = ["result"] + columns(rows, name)
        body = map_table(rows, name)
        written.append(_write_text(os.path.join(out, f"metrics.{name}.md"), markdown(header, body)))
        written.append(_write_text(os.path.join(out, f"metrics.{name}.csv"), _csv(header, body)))
    fig = curves_figure(rows)
    if fig.axes and fig.axes[0].lines:
        path = os.path.join(out, "curves.png")
        with atomic_write(path) as temporary, open(temporary, "wb") as stream:
            fig.savefig(stream, format="png", dpi=110)
        written.append(path)
    return written
