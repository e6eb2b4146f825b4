"""The metrics measured on a model trained here: the planted-evidence CNN of :mod:`guided_swap.checks.sanity`.

    python -m guided_swap.checks.metrics.report --out docs   # docs/metrics_results.md, docs/images/metrics_planted.png

The images with a cross (the evidence, class 1) are explained for class 1 by every method of
:func:`~guided_swap.checks.sanity.method_maps`, next to two reference maps: ``random`` (uniform noise, seeded: what
a map that knows nothing scores) and ``evidence box`` (1 on the cross's box, a faint ramp elsewhere: what a map
that knows where the evidence is scores). Every metric of :mod:`guided_swap.checks.metrics` is measured on each.

>>> import torch
>>> maps = reference_maps(torch.tensor([[2, 2, 4, 4]]), 6)
>>> sorted(maps), maps["evidence box"].shape
(['evidence box', 'random'], (1, 6, 6))
"""
import argparse
import os
import sys
from typing import Dict, List

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from ..._files import atomic_write
from ...media.viz import save_png
from ...run.convert import convert
from .. import sanity
from .causal import deletion, insertion
from .confidence import confidence_change
from .road import road

COLUMNS = ("road_combined", "confidence_change", "deletion_auc", "insertion_auc", "insertion_zeros_auc")


def reference_maps(boxes: Tensor, size: int, seed: int = 0) -> Dict[str, np.ndarray]:
    """``random`` and ``evidence box`` maps (B, size, size) for boxes (B, 4) as (top, left, bottom, right)."""
    generator = np.random.default_rng(seed)
    ramp = np.linspace(0, 1e-3, size * size).reshape(size, size)
    box = np.stack([ramp for _ in boxes]).astype(np.float32)
    for b, (top, left, bottom, right) in enumerate(boxes.tolist()):
        box[b, top:bottom, left:right] += 1.0
    return {"random": generator.random((len(boxes), size, size)).astype(np.float32), "evidence box": box}


def measure(model, x: Tensor, target: Tensor, maps: Dict[str, np.ndarray], steps: int = 24) -> Dict[str, dict]:
    """Per map: the mean of each metric over the batch, and the mean deletion and insertion curves."""
    ex = convert(model, layer=None, rule="gradient", example_input=x[:1])
    out = {}
    for name, values in maps.items():
        heat = torch.from_numpy(np.ascontiguousarray(values)).float()
        heat = heat + torch.linspace(0, 1e-6 * float(heat.abs().max()), heat[0].numel()).view(heat.shape[1:])
        deleted, inserted = deletion(ex, x, heat, target, steps), insertion(ex, x, heat, target, steps)
        from_zeros = insertion(ex, x, heat, target, steps, baseline="zeros")
        scores = {"road_combined": road(ex, x, heat, target, generator=torch.Generator().manual_seed(0)),
                  "confidence_change": confidence_change(ex, x, heat / heat.flatten(1).amax(1).view(-1, 1, 1),
                                                         target),
                  "deletion_auc": deleted.auc, "insertion_auc": inserted.auc,
                  "insertion_zeros_auc": from_zeros.auc}
        out[name] = {**{k: float(v.double().nanmean()) for k, v in scores.items()},
                     "deletion_curve": deleted.curve.double().mean(0).tolist(),
                     "insertion_curve": inserted.curve.double().mean(0).tolist(),
                     "insertion_zeros_curve": from_zeros.curve.double().mean(0).tolist()}
    return out


def figure(results: Dict[str, dict]):
    """The mean deletion and insertion curves of every map: a ``matplotlib.figure.Figure`` (no pyplot)."""
    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    panels = (("deletion", "deletion to zeros", "removed"), ("insertion", "insertion from the blur", "put back"),
              ("insertion_zeros", "insertion from zeros", "put back"))
    for axis, (kind, title, done) in zip(axes, panels):
        for name, values in results.items():
            curve = np.array(values[f"{kind}_curve"])
            style = "--" if name in ("random", "evidence box") else "-"
            axis.plot(np.linspace(0, 1, curve.size), curve, style, label=f"{name} ({values[f'{kind}_auc']:.2f})")
        better = "lower" if kind == "deletion" else "higher"
        axis.set_title(f"{title}: AUC in brackets, {better} is better", fontsize=9)
        axis.set_xlabel(f"share of pixels {done}, most relevant first", fontsize=8)
        axis.set_ylabel("probability of the evidence class", fontsize=8)
        axis.legend(fontsize=7)
    fig.tight_layout()
    return fig


def table(results: Dict[str, dict]) -> List[str]:
    lines = ["| map | ROAD combined (higher better) | confidence change (higher better) | deletion AUC (lower "
             "better) | insertion AUC from the blur (higher better) | insertion AUC from zeros (higher better) |",
             "|---|---|---|---|---|---|"]
    return lines + [f"| {name} | " + " | ".join(f"{v[c]:.3f}" for c in COLUMNS) + " |" for name, v in results.items()]


def report(out_dir: str, images: int = 16) -> str:
    """Train the planted-evidence CNN, measure every map on ``images`` fresh images with a cross, write the
    table (``metrics_results.md``) and the curves (``images/metrics_planted.png``) under ``out_dir``."""
    model, accuracy = sanity.train_planted()
    pictures, labels, boxes = sanity.planted_dataset(200, seed=2000)
    chosen = labels == 1
    x, boxes = ((pictures - 0.5) / 0.25)[chosen][:images], boxes[chosen][:images]
    target = torch.ones(x.shape[0], dtype=torch.long)
    maps = {**sanity.method_maps(model, x, target, "auto"), **reference_maps(boxes, x.shape[-1])}
    results = measure(model, x, target, maps)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    save_png(figure(results), os.path.join(out_dir, "images", "metrics_planted.png"))
    text = [f"# Faithfulness metrics on the planted-evidence CNN", "",
            f"Trained here (held-out accuracy {accuracy:.3f}); {x.shape[0]} fresh images with a cross, explained for "
            "the evidence class. Regenerate with `python -m guided_swap.checks.metrics.report --out docs`.", ""]
    text += table(results) + ["", "![deletion and insertion curves](images/metrics_planted.png)", ""]
    path = os.path.join(out_dir, "metrics_results.md")
    with atomic_write(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        handle.write("\n".join(text))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Measure the metrics on the planted-evidence model")
    parser.add_argument("--out", default="docs")
    print(report(parser.parse_args(argv).out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
