"""One result per input: the arrays a method computed, its record, its figure, written in this process or in a
pool of writer processes (drawing a figure takes far longer than explaining the image).

>>> map_names("gradcam"), panels("gradcam"), panels("guided")
(['logits', 'target', 'score', 'cam_raw', 'cam'], ('input', 'cam'), ('input', 'gradient'))
"""
import multiprocessing
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Deque, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import results
from ._console import quiet_child
from .results import Item

CAM_METHODS = {"gradcam": "gradient", "guided-gradcam": "guided", "all": "guided"}


def uses_layer(method: str) -> bool:
    return method in CAM_METHODS


def map_names(method: str) -> List[str]:
    """The maps a method computes (``Explanation.to_dict`` names): what is saved, and all a figure may show."""
    names = ["logits", "target", "score"]
    if method != "gradcam":
        names.append("gradient")
    if uses_layer(method):
        names += ["cam_raw", "cam"] + (["guided_gradcam"] if method != "gradcam" else [])
    return names


def panels(method: str) -> Tuple[str, ...]:
    """The figure's panels: the input and the maps the method computed (each an array of the ``.npz``)."""
    if method == "gradcam":
        return ("input", "cam")
    return ("input", "gradient") + (("cam", "guided_gradcam") if uses_layer(method) else ())


def arrays(explanation, x: torch.Tensor, method: str) -> Dict[str, np.ndarray]:
    """Every map the method computed, and the input as fed (batch first)."""
    maps = explanation.to_dict(map_names(method))
    out = {name: value.detach().cpu().numpy() for name, value in maps.items()}
    out = {name: value.astype(np.int64 if name == "target" else np.float32) for name, value in out.items()}
    return {"input": x.detach().float().cpu().numpy(), **out}


def record(job, item: Item, maps: Dict[str, np.ndarray], settings: dict, layer_nodes: Dict[str, str],
           made_by: Dict[str, Any]) -> dict:
    """What the result of ``item`` says about itself (its ``.npz``, its PNG and its index line)."""
    logits = maps["logits"].astype(np.float64)
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    target = int(maps["target"])
    outputs = [p[len(job.out):].lstrip("/\\") for p in results.output_paths(job.out, item, job.save).values()]
    return {"input": item.path, "name": item.name, "outputs": outputs, "target": target,
            "target_name": job.labels[target] if job.labels is not None else None,
            "score": float(maps["score"]), "probability": float(probabilities[target]),
            "top5": results.top_classes(probabilities, job.labels),
            "cam_peak": results.peak(maps["cam"]) if "cam" in maps else None, "layers": layer_nodes,
            "settings": settings, "source": results.source_stamp(item.path), "made_by": made_by, "error": None}


def moments(maps: Dict[str, np.ndarray], method: str) -> Dict[str, List[float]]:
    """Per map panel: count, sum, sum of squares, min and max of its values, so a colour scale shared by many
    results can be made from their records alone (:func:`shared_limits`)."""
    from .viz import _Moments

    out = {}
    for panel in panels(method)[1:]:
        m = _Moments()
        m.add(np.asarray(maps[panel], dtype=np.float64))
        out[panel] = [m.count, m.total, m.squares, m.low, m.high]
    return out


def shared_limits(records: Iterable[dict], method: str) -> Dict[str, List[float]]:
    """One colour range per map panel over every record's maps (as ``viz.shared_limits`` over the maps)."""
    from .viz import _Moments

    merged = {panel: _Moments() for panel in panels(method)[1:]}
    for rec in records:
        for panel, (count, total, squares, low, high) in (rec.get("moments") or {}).items():
            m = merged[panel]
            m.count, m.total, m.squares = m.count + count, m.total + total, m.squares + squares
            m.low, m.high = min(m.low, low), max(m.high, high)
    return {panel: [float(v) for v in m.limits(panel)] for panel, m in merged.items() if m.count}


def figure(job, one, x: torch.Tensor, item: Item, limits: Optional[Dict[str, List[float]]] = None):
    """The figure of one input: its panels (:func:`panels`), titled by what each map is, on ``limits`` (one
    scale shared by the run) or each map on its own range."""
    from . import viz

    p = job.preprocessing
    return viz.figure(one, x, panels(job.method), labels=job.labels, notes=[item.name], mean=p.mean, std=p.std,
                      cmap=job.cmap, scale="shared" if limits else "per-image",
                      limits={k: tuple(v) for k, v in limits.items()} if limits else None)


def write_result(job, item: Item, rec: dict, maps: Dict[str, np.ndarray], one, x: torch.Tensor,
                 kinds: Sequence[str], limits: Optional[Dict[str, List[float]]]) -> None:
    """The ``kinds`` of output (``npz``, ``png``) of one input, each atomic; the PNG's record has its limits."""
    paths = results.output_paths(job.out, item, kinds)
    if "npz" in paths:
        results.write_npz(paths["npz"], maps, rec)
    if "png" in paths:
        results.write_png(figure(job, one, x, item, limits), paths["png"], dict(rec, limits=limits))


class Writers:
    """:func:`write_result` in ``count`` forked processes (0: in this one), at most ``backlog`` waiting."""

    def __init__(self, count: int, backlog: int = 64):
        self.pool = None
        if count:
            self.pool = ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("fork"),
                                            initializer=quiet_child)
        self.pending: Deque[Future] = deque()
        self.backlog = backlog

    def submit(self, *args) -> None:
        if self.pool is None:
            write_result(*args)
            return
        self.pending.append(self.pool.submit(write_result, *args))
        while len(self.pending) > self.backlog:
            self.pending.popleft().result()  # a writer's error is raised here

    def finish(self) -> None:
        """Wait for every write; raise the first error."""
        while self.pending:
            self.pending.popleft().result()

    def close(self) -> None:
        if self.pool is not None:
            for future in self.pending:
                future.cancel()
            self.pool.shutdown(wait=True)

    def __enter__(self) -> "Writers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def explain_batch(explainer, job, batch, items: Sequence[Item], settings: dict, group, writers: Writers,
                  kinds: Sequence[str], limits: Optional[Dict[str, List[float]]] = None) -> Dict[int, dict]:
    """Explain one decoded batch and hand the ``kinds`` of output to the writers; the records by input index
    (an unreadable input's record has its error)."""
    records = {}
    good = [(index, tensor) for index, tensor, error in batch if error is None]
    for index, _, error in batch:
        if error is not None:
            records[index] = results.failure_record(items[index], settings, error)
    if not good:
        return records
    x = torch.stack([tensor for _, tensor in good]).to(group.device)
    explanation = explainer.explain(x, job.target)
    batch_maps = arrays(explanation, x, job.method)
    nodes = dict(explainer.report.layers)
    made_by = {"rank": group.rank, "world": group.world, "device": str(group.device)}
    for i, (index, _) in enumerate(good):
        maps = {key: value[i] for key, value in batch_maps.items()}
        records[index] = dict(record(job, items[index], maps, settings, nodes, made_by), moments=moments(maps, job.method))
        if kinds:
            writers.submit(job, items[index], records[index], maps, _cpu(explanation[i], nodes), x[i:i + 1].cpu(),
                           kinds, limits)
    return records


def _cpu(one, nodes: Dict[str, str]):
    """An explanation row with its tensors on the CPU (what a writer process receives), its layers named by the
    graph node they capture (the title shows the node ``auto`` chose)."""
    from dataclasses import replace

    layers = {nodes.get(name, name): replace(maps, activation=maps.activation.cpu(), grad=maps.grad.cpu())
              for name, maps in one.layers.items()}
    return replace(one, logits=one.logits.cpu(), target=None if one.target is None else one.target.cpu(),
                   score=one.score.cpu(), gradient=one.gradient.cpu(), outputs=None, layers=layers)
