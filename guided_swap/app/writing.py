"""One result per input: the arrays a method computed, its record, its figure, written in this process or in a
pool of writer processes (so that drawing and writing overlap explaining).

>>> map_names("gradcam"), panels("gradcam"), panels("guided")
(['logits', 'target', 'score', 'cam_raw', 'cam'], ('input', 'cam'), ('input', 'gradient'))
>>> map_names("gradcam", cams=("layercam",))[-2:], panels("gradcam", cams=("gradcam", "layercam"))
(['cams_raw.layercam', 'cams.layercam'], ('input', 'cam', 'cams.layercam'))
"""
import multiprocessing
import os
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import results
from .._files import part_name, remove_if_present
from .._console import tied_child
from ..media import viz
from ..media.viz import _Moments
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
    out = {}
    for panel in panels(method, cams)[1:]:
        m = _Moments()
        m.add(np.asarray(maps[panel], dtype=np.float64))
        out[panel] = [m.count, m.total, m.squares, m.low, m.high]
    return out


def zero_panels(rec: dict) -> List[str]:
    """The map panels of a record whose values are all zero (read from its :func:`moments`)."""
    return [panel for panel, (_, _, _, low, high) in (rec.get("moments") or {}).items() if low == high == 0]


def shared_limits(records: Iterable[dict], method: str, cams: Sequence[str] = ()) -> Dict[str, List[float]]:
    """One colour range per map panel over every record's maps (as ``viz.shared_limits`` over the maps)."""
    merged = {panel: _Moments() for panel in panels(method, cams)[1:]}
    for rec in records:
        for panel, (count, total, squares, low, high) in (rec.get("moments") or {}).items():
            m = merged[panel]
            m.count, m.total, m.squares = m.count + count, m.total + total, m.squares + squares
            m.low, m.high = min(m.low, low), max(m.high, high)
    return {panel: [float(v) for v in m.limits(panel)] for panel, m in merged.items() if m.count}


def figure_names(method: str, cams: Sequence[str] = ()) -> List[str]:
    """The arrays a figure reads: the input as fed, the logits, target and score of its title, and one map per
    panel. What a PNG-only run keeps, in a hidden temporary, until its figure is drawn."""
    return ["input", "logits", "target", "score", *panels(method, cams)[1:]]


@dataclass(frozen=True)
class FigureContext:
    """What a figure says besides its arrays: the rule, how many rectifiers carry it, the node of the captured
    layer (its key in ``Explanation.layers`` as the figure titles it) and the smoothing."""

    rule: str
    swapped: Optional[int]
    layer: Optional[str]
    smoothing: Optional[Dict[str, Any]]


def figure_context(explainer, job, nodes: Dict[str, str]) -> FigureContext:
    """The :class:`FigureContext` of this run's figures; ``nodes``: the record's ``layers`` (the node each layer
    name became, ``auto`` included)."""
    first = explainer.layers[0] if explainer.layers else None
    smoothing = job.smoothing()
    layer = None if first is None else nodes.get(first, first)
    smoothing = None if smoothing is None else {"copies": smoothing["copies"], "noise": float(smoothing["noise"])}
    return FigureContext(explainer.rule.name, len(explainer.swapped), layer, smoothing)


@dataclass
class Saved:
    """One input's saved arrays (a batch of one) as the parts of an ``Explanation`` that ``viz.picture`` reads,
    so a figure drawn from a file is the figure of the explanation that wrote it."""

    logits: torch.Tensor
    target: torch.Tensor
    score: torch.Tensor
    gradient: np.ndarray  # (1, 0) when the method computes none (gradcam): the figure only counts its rows
    layers: Dict[str, None]
    rule: str
    swapped: Optional[int]
    smoothing: Optional[Dict[str, Any]]
    cam: Optional[np.ndarray] = None
    guided_gradcam: Optional[np.ndarray] = None
    cams: Dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def of(cls, maps: Dict[str, np.ndarray], context: FigureContext) -> "Saved":
        def row(name):
            return maps[name][None] if name in maps else None

        return cls(torch.from_numpy(row("logits")), torch.from_numpy(row("target")), torch.from_numpy(row("score")),
                   row("gradient") if "gradient" in maps else np.zeros((1, 0), np.float32),
                   {} if context.layer is None else {context.layer: None}, context.rule, context.swapped,
                   context.smoothing,
                   row("cam"), row("guided_gradcam"),
                   {name[len("cams."):]: row(name) for name in maps if name.startswith("cams.")})


def figure(job, maps: Dict[str, np.ndarray], context: FigureContext, item: Item,
           limits: Optional[Dict[str, List[float]]] = None):
    """The figure of one input from its arrays (:func:`figure_names`): its panels (:func:`panels`), titled by
    what each map is, on ``limits`` (one scale shared by the run) or each map on its own range. Composed with
    numpy and Pillow (``viz.picture``: the panels, titles and colour bars of ``viz.figure``, many times faster)."""
    p = job.preprocessing
    return viz.picture(Saved.of(maps, context), maps["input"][None], panels(job.method, job.cams),
                      labels=job.labels, notes=[item.name], mean=p.mean, std=p.std, cmap=job.cmap,
                      scale="shared" if limits else "per-image",
                      limits={k: tuple(v) for k, v in limits.items()} if limits else None)


def write_result(job, item: Item, rec: dict, maps: Dict[str, np.ndarray], context: FigureContext,
                 kinds: Sequence[str], limits: Optional[Dict[str, List[float]]], stash: Optional[str] = None) -> None:
    """The ``kinds`` of output (``npz``, ``png``) of one input, each atomically; the PNG's record has its
    limits. ``stash``: a hidden temporary path that gets the figure's arrays, for a figure drawn later."""
    paths = results.output_paths(job.out, item, kinds)
    if "npz" in paths:
        results.write_npz(paths["npz"], maps, rec)
    if stash is not None:
        results.write_stash(stash, {name: maps[name] for name in figure_names(job.method, job.cams)}, rec)
    if "png" in paths:
        results.write_png(figure(job, maps, context, item, limits), paths["png"], dict(rec, limits=limits))


def draw_saved(job, item: Item, rec: dict, maps: Dict[str, np.ndarray], context: FigureContext,
               limits: Dict[str, List[float]], stash: Optional[str]) -> None:
    """The PNG of one input from the arrays a file held (its ``.npz``, or the ``stash`` then removed)."""
    write_result(job, item, rec, maps, context, ("png",), limits)
    if stash is not None:
        remove_if_present(stash)


WRITE_ERRORS = (OSError, ValueError, TypeError)  # one input's write failing: recorded, the run goes on


def _one_line(error: BaseException) -> str:
    text = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class Writers:
    """:func:`write_result` (or another ``work``) in ``count`` forked processes (0: in this one), at most
    ``backlog`` waiting.

    One input's write that fails (:data:`WRITE_ERRORS`: a full disk, a name the file system refuses) does not
    stop the others: ``failed`` maps the input (the :class:`Item` among the work's arguments) to one line. The
    processes end with this one, even when it is killed, and on SIGTERM (:func:`~guided_swap._console.tied_child`);
    if one is killed, the writes it held fail (``failed``) and the rest are written in this process.

    ``wrap(item, work)``, if given, is what runs instead of ``work`` for that input (the runner's
    :class:`~guided_swap.app.results.Together`, which places a result's files together)."""

    def __init__(self, count: int, backlog: int = 64,
                 wrap: Optional[Callable[[Optional[Item], Callable[..., None]], Callable[..., None]]] = None):
        self.wrap = wrap
        self.pool = None
        if count:
            self.pool = ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("fork"),
                                            initializer=tied_child, initargs=(os.getpid(),))
        self.pending: Deque[Tuple[Optional[Item], Future]] = deque()
        self.backlog = backlog
        self.failed: Dict[Optional[Item], str] = {}

    def submit(self, *args, work: Callable[..., None] = write_result) -> None:
        key = next((arg for arg in args if isinstance(arg, Item)), None)
        if self.wrap is not None:
            work = self.wrap(key, work)
        if self.pool is not None:
            try:
                self.pending.append((key, self.pool.submit(work, *args)))
            except BrokenProcessPool:
                self._lost(key)
            else:
                while len(self.pending) > self.backlog:
                    self._wait(*self.pending.popleft())
                return
        try:
            work(*args)
        except WRITE_ERRORS as error:
            self.failed[key] = f"could not write its result: {_one_line(error)}"

    def _wait(self, key: Optional[Item], future: Future) -> None:
        try:
            future.result()
        except BrokenProcessPool:
            self._lost(key)
        except WRITE_ERRORS as error:
            self.failed[key] = f"could not write its result: {_one_line(error)}"

    def _lost(self, key: Optional[Item]) -> None:
        """A writer process ended before its write (killed, or out of memory): the write is lost, and the
        rest are written in this process."""
        self.failed[key] = LOST_WRITE
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None

    def finish(self) -> None:
        """Wait for every write (its failure, if any, in ``failed``)."""
        while self.pending:
            self._wait(*self.pending.popleft())

    def close(self) -> None:
        if self.pool is not None:
            for _, future in self.pending:
                future.cancel()
            self.pool.shutdown(wait=True)

    def __enter__(self) -> "Writers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


LOST_WRITE = "not written: a writer process ended before writing it (killed?); run the same command again to finish"


def explain_batch(explainer, job, batch, items: Sequence[Item], settings: dict, group, writers: Writers,
                  kinds: Sequence[str], limits: Optional[Dict[str, List[float]]] = None,
                  stash: bool = False) -> Tuple[Dict[int, dict], Dict[int, str]]:
    """Explain one decoded batch and hand the ``kinds`` of output to the writers: the records by input index
    (an unreadable input's record has its error) and, with ``stash``, the hidden temporary each input's figure
    arrays go to (:func:`figure_names`; OUT/.NAME.maps.PID-TOKEN.part), by input index."""

    records, stashed = {}, {}
    good = [(index, tensor) for index, tensor, error in batch if error is None]
    for index, _, error in batch:
        if error is not None:
            records[index] = results.failure_record(items[index], settings, error)
    if not good:
        return records, stashed
    x = torch.stack([tensor for _, tensor in good]).to(group.device)
    rows = _explain(explainer, job, x)
    nodes = dict(explainer.report.layers)
    context = figure_context(explainer, job, nodes)
    made_by = {"rank": group.rank, "world": group.world, "device": str(group.device)}
    for i, (index, _) in enumerate(good):
        maps = {key: value[0] for key, value in arrays(rows[i], x[i:i + 1], job.method, job.cams).items()}
        records[index] = dict(record(job, items[index], maps, settings, nodes, made_by),
                              moments=moments(maps, job.method, job.cams))
        if stash:
            stashed[index] = part_name(results.stash_base(job.out, items[index]))
        if kinds or stash:
            writers.submit(job, items[index], records[index], maps, context, kinds, limits, stashed.get(index))
    return records, stashed


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
