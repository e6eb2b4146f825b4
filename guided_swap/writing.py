"""One result per input: the arrays a method computed, its record, its figure, written in this process or in a
pool of writer processes (drawing a figure takes far longer than explaining the image).

>>> map_names("gradcam"), panels("gradcam"), panels("guided")
(['logits', 'target', 'score', 'cam_raw', 'cam'], ('input', 'cam'), ('input', 'gradient'))
>>> map_names("gradcam", cams=("layercam",))[-2:], panels("gradcam", cams=("gradcam", "layercam"))
(['cams_raw.layercam', 'cams.layercam'], ('input', 'cam', 'cams.layercam'))
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


def map_names(method: str, cams: Sequence[str] = ()) -> List[str]:
    """The maps a method computes (``Explanation.to_dict`` names): what is saved, and all a figure may show.
    ``cams`` (``--cam``): CAMs of ``guided_swap.cam_methods()`` saved as ``cams_raw.NAME`` (the layer's
    resolution) and ``cams.NAME`` (input size)."""
    names = ["logits", "target", "score"]
    if method != "gradcam":
        names.append("gradient")
    if uses_layer(method):
        names += ["cam_raw", "cam"] + (["guided_gradcam"] if method != "gradcam" else [])
        names += [f"{kind}.{cam}" for cam in cams for kind in ("cams_raw", "cams")]
    return names


def panels(method: str, cams: Sequence[str] = ()) -> Tuple[str, ...]:
    """The figure's panels: the input and the maps the method computed (each an array of the ``.npz``), one
    ``cams.NAME`` per ``--cam`` (Grad-CAM is the ``cam`` panel already)."""
    extra = tuple(f"cams.{cam}" for cam in cams if cam != "gradcam") if uses_layer(method) else ()
    if method == "gradcam":
        return ("input", "cam") + extra
    return ("input", "gradient") + (("cam", "guided_gradcam") if uses_layer(method) else ()) + extra


def arrays(explanation, x: torch.Tensor, method: str, cams: Sequence[str] = ()) -> Dict[str, np.ndarray]:
    """Every map the method computed, and the input as fed (batch first)."""
    maps = explanation.to_dict(map_names(method, cams))
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


def moments(maps: Dict[str, np.ndarray], method: str, cams: Sequence[str] = ()) -> Dict[str, List[float]]:
    """Per map panel: count, sum, sum of squares, min and max of its values, so a colour scale shared by many
    results can be made from their records alone (:func:`shared_limits`)."""
    from .viz import _Moments

    out = {}
    for panel in panels(method, cams)[1:]:
        m = _Moments()
        m.add(np.asarray(maps[panel], dtype=np.float64))
        out[panel] = [m.count, m.total, m.squares, m.low, m.high]
    return out


def shared_limits(records: Iterable[dict], method: str, cams: Sequence[str] = ()) -> Dict[str, List[float]]:
    """One colour range per map panel over every record's maps (as ``viz.shared_limits`` over the maps)."""
    from .viz import _Moments

    merged = {panel: _Moments() for panel in panels(method, cams)[1:]}
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
    return viz.figure(one, x, panels(job.method, job.cams), labels=job.labels, notes=[item.name], mean=p.mean,
                      std=p.std, cmap=job.cmap, scale="shared" if limits else "per-image",
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
    rows = _explain(explainer, job, x)
    nodes = dict(explainer.report.layers)
    made_by = {"rank": group.rank, "world": group.world, "device": str(group.device)}
    for i, (index, _) in enumerate(good):
        one = rows[i]
        maps = {key: value[0] for key, value in arrays(one, x[i:i + 1], job.method, job.cams).items()}
        records[index] = dict(record(job, items[index], maps, settings, nodes, made_by),
                              moments=moments(maps, job.method, job.cams))
        if kinds:
            writers.submit(job, items[index], records[index], maps, _cpu(one, nodes), x[i:i + 1].cpu(), kinds, limits)
    return records


SMOOTHING_SEED = 0


def _explain(explainer, job, x: torch.Tensor) -> list:
    """One explanation (a batch of one) per input. With ``--smooth``, each input is smoothed on its own, its
    noise drawn from a generator seeded with :data:`SMOOTHING_SEED`, so an input's maps do not depend on the
    batch, the process or the run it was explained in."""
    if job.smooth is None:
        explanation = explainer.explain(x, job.target)
        return [explanation[i] for i in range(x.shape[0])]
    out = []
    for i in range(x.shape[0]):
        generator = torch.Generator(device=x.device).manual_seed(SMOOTHING_SEED)
        out.append(explainer.explain(x[i:i + 1], job.target, smooth=job.smooth, noise=job.noise,
                                     generator=generator, chunk=job.batch_size))
    return out


def _cpu(one, nodes: Dict[str, str]):
    """An explanation row with its tensors on the CPU (what a writer process receives), its layers named by the
    graph node they capture (the title shows the node ``auto`` chose)."""
    from dataclasses import replace

    layers = {nodes.get(name, name): replace(maps, activation=maps.activation.cpu(), grad=maps.grad.cpu(),
                                             fixed_cams=None if maps.fixed_cams is None else
                                             {cam: value.cpu() for cam, value in maps.fixed_cams.items()})
              for name, maps in one.layers.items()}
    return replace(one, logits=one.logits.cpu(), target=None if one.target is None else one.target.cpu(),
                   score=one.score.cpu(), gradient=one.gradient.cpu(), outputs=None, layers=layers)
