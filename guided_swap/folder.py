"""The folder runner behind ``guided-swap explain``: plan, decode in DataLoader workers, explain, write.

One run:

1. rank 0 finds the inputs, checks the layout and sorts the inputs into done (same settings) and to do
   (:mod:`guided_swap.results`), reading only, before any model is built;
2. every rank builds the explainer; rank 0 makes ``OUT`` and removes the temporaries a killed run left there;
   every rank takes its share of the inputs to do (:mod:`guided_swap.distributed`),
   decodes them in ``workers`` DataLoader processes and writes one ``.npz`` and/or ``.png`` per input, each
   atomically, each carrying its record;
3. rank 0 gathers the records and rewrites ``OUT/index.jsonl``, one line per input.

Ctrl-C (or SIGTERM) stops after the current batch; what was written stays, and the same command finishes
the job. A killed process leaves only hidden temporaries, removed by the next run.
"""
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import distributed, results
from .errors import GuidedSwapError
from .model_spec import Preprocessing, Source
from .results import Item, Plan

CAM_METHODS = {"gradcam": "gradient", "guided-gradcam": "guided", "all": "guided"}
INTERRUPTED = "not explained: the run was interrupted; run the same command again to finish"


def rule_names() -> List[str]:
    """The backprop rules the library knows: every registered rule."""
    from .rules import rules

    return list(rules())


def method_names() -> List[str]:
    return rule_names() + list(CAM_METHODS)


def rule_of(method: str) -> str:
    return CAM_METHODS.get(method, method)


def uses_layer(method: str) -> bool:
    return method in CAM_METHODS


class Quiet(Exception):
    """An error another rank reports; this rank exits without printing it."""


@dataclass
class Job:
    """Everything one ``explain`` run needs, checked by the command line."""

    inputs: Sequence[str]
    out: str
    source: Source
    method: str = "all"
    layer: str = "auto"
    target: Optional[int] = None
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    labels: Optional[List[str]] = None
    save: Tuple[str, ...] = ("npz", "png")
    cmap: Optional[str] = None
    scale: Optional[str] = None
    batch_size: int = 8
    workers: int = 0
    force: bool = False
    device: str = "auto"
    report: bool = False

    def settings(self) -> Dict[str, Any]:
        """What makes a result what it is: recorded in each result and compared on a rerun."""
        from . import __version__
        from .model_spec import sha256_text

        p = self.preprocessing
        return results.normalised({
            "library": "guided_swap", "version": __version__, **self.source.settings(),
            "layer": self.layer if uses_layer(self.method) else None, "method": self.method,
            "rule": rule_of(self.method), "target": "auto" if self.target is None else self.target,
            "resize": p.resize, "size": p.crop, "mean": list(p.mean), "std": list(p.std),
            "labels_sha256": None if self.labels is None else sha256_text("\n".join(self.labels)),
            "cmap": self.cmap, "scale": self.scale})


def _say(message: str) -> None:
    print(f"guided-swap: {message}", file=sys.stderr, flush=True)


def _plan(job: Job, settings: Dict[str, Any]) -> Plan:
    return results.plan(results.discover(job.inputs, job.out), job.out, settings, job.save, job.force)


def _prepare(job: Job, group) -> None:
    """Rank 0 makes OUT and removes what killed runs left; the other ranks wait, then all write."""
    from ._files import remove_stale_parts

    if group.main:
        results.prepare(job.out)
        remove_stale_parts(job.out)
    distributed.broadcast(None, group)


def _shared_plan(job: Job, settings: Dict[str, Any], group) -> Plan:
    """Rank 0 plans; every rank gets the plan, or rank 0's error (raised everywhere, printed by rank 0)."""
    plan, error = None, None
    if group.main:
        try:
            plan = _plan(job, settings)
        except (GuidedSwapError, OSError) as caught:
            error = caught
    plan, message = distributed.broadcast((plan, None if error is None else str(error)), group)
    if error is not None:
        raise error
    if message is not None:
        raise Quiet(message)
    return plan


# --- the explainer -------------------------------------------------------------------------------------------

def build_explainer(job: Job, group, say: Callable[[str], None]):
    """Model, explainer on this rank's device, and the model's class count and input channels."""
    from . import convert
    from .model_spec import build

    model = build(job.source, say=lambda m: say(f"warning: {m}"))
    from .capture import input_spec

    channels = (input_spec(model) or (4, 3))[1]
    size = job.preprocessing.crop
    example = torch.zeros(1, channels, size, size)
    explainer = convert(model, layer=job.layer if uses_layer(job.method) else None, rule=rule_of(job.method),
                        example_input=example)
    explainer = explainer.to(group.device)
    with torch.no_grad():
        classes = explainer(example.to(group.device)).shape[-1]
    if job.labels is not None and len(job.labels) != classes:
        raise ValueError(f"--labels has {len(job.labels)} names but the model has {classes} outputs")
    if job.target is not None and job.target >= classes:
        raise ValueError(f"--target {job.target} is not a class of this model (it has {classes} outputs, 0..{classes - 1})")
    return explainer, classes, channels


def summary(explainer, job: Job) -> str:
    """One line: the report's summary (what was swapped, the layer captured, what was left alone), and what
    it means when a rule that needs rectifiers found none."""
    report = explainer.report
    line = f"model {job.source.model or job.source.weights}: {report.summary()}"
    if not report.ordinary_rule and not report.swapped:
        line += f"; no rectifier found, so the {report.rule} map is a plain gradient"
    if report.hidden_in_leaves:
        line += f"; NOT swapped, inside leaf modules: {', '.join(report.hidden_in_leaves)}"
    return line


# --- decoding ------------------------------------------------------------------------------------------------

class Decoded(torch.utils.data.Dataset):
    """Input ``i`` decoded and preprocessed: ``(i, tensor, None)``, or ``(i, None, error)`` if unreadable."""

    def __init__(self, items: Sequence[Item], positions: Sequence[int], preprocessing: Preprocessing, channels: int):
        self.items, self.positions, self.preprocessing, self.channels = items, list(positions), preprocessing, channels

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, k: int):
        from .images import load_image

        index = self.positions[k]
        p = self.preprocessing
        try:
            tensor = load_image(self.items[index].path, resize=p.resize, crop=p.crop, mean=p.mean, std=p.std,
                                channels=self.channels)
            return index, tensor, None
        except (ValueError, TypeError, OSError) as error:
            return index, None, str(error).splitlines()[0] if str(error) else type(error).__name__


def _as_list(batch):
    return batch


def _quiet_worker(_):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when to stop
    one_line_warnings()


def _one_line(message, category, *_, **__) -> str:
    return f"guided-swap: warning: {category.__name__}: {message}\n"


def one_line_warnings() -> None:
    """Show warnings as one line each: ``guided-swap: warning: Category: message``."""
    warnings.formatwarning = _one_line


@contextmanager
def warnings_in_one_line():
    """:func:`one_line_warnings` while inside (the command line's ``main``, also when called in-process)."""
    previous = warnings.formatwarning
    one_line_warnings()
    try:
        yield
    finally:
        warnings.formatwarning = previous


def loader(dataset: Decoded, batch_size: int, workers: int):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       collate_fn=_as_list, worker_init_fn=_quiet_worker if workers else None,
                                       prefetch_factor=2 if workers else None)


# --- one batch -----------------------------------------------------------------------------------------------

def map_names(method: str) -> List[str]:
    """The maps a method computes (``Explanation.to_dict`` names): what is saved and what may be drawn."""
    names = ["logits", "target", "score"]
    if method != "gradcam":
        names.append("gradient")
    if uses_layer(method):
        names += ["cam_raw", "cam"] + (["guided_gradcam"] if method != "gradcam" else [])
    return names


def arrays(explanation, x: torch.Tensor, method: str) -> Dict[str, np.ndarray]:
    """Every map the method computed, and the input as fed: every panel drawn is one of these."""
    maps = explanation.to_dict(map_names(method))
    out = {name: value.detach().cpu().numpy() for name, value in maps.items()}
    out = {name: value.astype(np.int64 if name == "target" else np.float32) for name, value in out.items()}
    return {"input": x.detach().float().cpu().numpy(), **out}


def _record(job: Job, item: Item, maps: Dict[str, np.ndarray], score: float, settings, layer_nodes, group) -> dict:
    logits = maps["logits"].astype(np.float64)
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    target = int(maps["target"])
    name = job.labels[target] if job.labels is not None else None
    outputs = [p[len(job.out):].lstrip("/\\") for p in results.output_paths(job.out, item, job.save).values()]
    return {"input": item.path, "name": item.name, "outputs": outputs, "target": target, "target_name": name,
            "score": score, "probability": float(probabilities[target]),
            "top5": results.top_classes(probabilities, job.labels),
            "cam_peak": results.peak(maps["cam"]) if "cam" in maps else None, "layers": layer_nodes,
            "settings": settings, "source": results.source_stamp(item.path),
            "made_by": {"rank": group.rank, "world": group.world, "device": str(group.device)}, "error": None}


def _figure(job: Job, one, x: torch.Tensor, item: Item, maps: Dict[str, np.ndarray]):
    from . import viz

    p = job.preprocessing
    if job.method == "gradcam":
        return _cam_figure(maps, x, job, item)
    options = {"labels": job.labels, "mean": p.mean, "std": p.std, "notes": [item.name]}
    accepted = _figure_options()
    options.update({k: v for k, v in (("cmap", job.cmap), ("scale", job.scale)) if v is not None and k in accepted})
    return viz.figure(one, x, **options)


def _figure_options():
    import inspect

    from . import viz

    return set(inspect.signature(viz.figure).parameters)


def _cam_figure(maps, x: torch.Tensor, job: Job, item: Item):
    """Input and Grad-CAM only: ``--method gradcam`` computes no other map worth a panel."""
    from matplotlib.figure import Figure

    from . import viz

    p = job.preprocessing
    picture = viz.denormalize(x[0], p.mean, p.std)
    target = int(maps["target"])
    logits = maps["logits"].astype(np.float64)
    probability = float(np.exp(logits[target] - logits.max()) / np.exp(logits - logits.max()).sum())
    name = job.labels[target] if job.labels is not None else target
    fig = Figure(figsize=(5.2, 2.9))
    axes = fig.subplots(1, 2)
    heat = viz.minmax(maps["cam"])
    axes[0].imshow(picture)
    axes[0].set_title(f"{name}: p={probability:.2f}\n{item.name}", fontsize=9)
    axes[1].imshow(viz.overlay(picture, heat, cmap=job.cmap or "jet"))
    axes[1].set_title("Grad-CAM", fontsize=9)
    for axis in axes:
        axis.axis("off")
    fig.tight_layout()
    return fig


def _write(job: Job, item: Item, record: dict, maps: Dict[str, np.ndarray], draw: Callable[[], Any]) -> None:
    paths = results.output_paths(job.out, item, job.save)
    if "npz" in paths:
        results.write_npz(paths["npz"], maps, record)
    if "png" in paths:
        results.write_png(draw(), paths["png"], record)


def explain_batch(explainer, job: Job, batch, plan: Plan, settings, group) -> Dict[int, dict]:
    """Explain one decoded batch and write its results; the records by input index (failures included)."""
    records = {}
    good = [(index, tensor) for index, tensor, error in batch if error is None]
    for index, _, error in batch:
        if error is not None:
            records[index] = results.failure_record(plan.items[index], settings, error)
    if not good:
        return records
    x = torch.stack([tensor for _, tensor in good]).to(group.device)
    explanation = explainer.explain(x, job.target)
    batch_maps = arrays(explanation, x, job.method)
    layer_nodes = dict(explainer.report.layers)
    for i, (index, _) in enumerate(good):
        item = plan.items[index]
        maps = {key: value[i] for key, value in batch_maps.items()}
        record = _record(job, item, maps, float(explanation.score[i]), settings, layer_nodes, group)
        draw = lambda i=i, item=item, maps=maps: _figure(job, explanation[i], x[i:i + 1].cpu(), item, maps)
        _write(job, item, record, maps, draw)
        records[index] = record
    return records


# --- the run -------------------------------------------------------------------------------------------------

class _StopFlag:
    def __init__(self):
        self.raised = False


@contextmanager
def stop_after_batch():
    """While inside: the first SIGINT/SIGTERM sets ``flag.raised``; a second one stops at once."""
    flag = _StopFlag()
    previous = {}

    def handler(number, frame):
        flag.raised = True
        for sig, old in previous.items():
            signal.signal(sig, old)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _progress(total: int, group):
    from tqdm import tqdm

    desc = "explaining" if group.world == 1 else f"rank 0 of {group.world}"
    return tqdm(total=total, desc=desc, unit="img", disable=None if group.main else True, file=sys.stderr,
                dynamic_ncols=True)


def run(job: Job, say: Callable[[str], None] = _say) -> int:
    """Run ``job``; 0 when every input has its result, 1 when some could not be read, 130 when interrupted."""
    group = distributed.start(job.device)
    try:
        return _run(job, group, say if group.main else (lambda message: None))
    finally:
        distributed.stop(group)


def _run(job: Job, group, say) -> int:
    settings = job.settings()
    plan = _shared_plan(job, settings, group)
    if plan.replaced:
        say(f"--force: replacing {plan.replaced} result(s) made with other settings")
    if plan.changed:
        say(f"{plan.changed} input(s) changed since their results were made: explaining them again")
    if plan.done:
        say(f"{len(plan.done)} of {len(plan.items)} input(s) already done with these settings in {job.out}: skipped")
    explainer, _, channels = build_explainer(job, group, say)
    _prepare(job, group)
    say(summary(explainer, job))
    if job.report and group.main:
        print(explainer.report)
    mine = distributed.shard(plan.todo, group)
    records, interrupted, started = {}, False, time.perf_counter()
    with stop_after_batch() as flag, _progress(len(mine), group) as bar:
        for batch in loader(Decoded(plan.items, mine, job.preprocessing, channels), job.batch_size, job.workers):
            records.update(explain_batch(explainer, job, batch, plan, settings, group))
            bar.update(len(batch))
            if flag.raised:
                interrupted = True
                break
    gathered = distributed.gather((records, interrupted, time.perf_counter() - started), group)
    if not group.main:
        return 0
    return _finish(job, plan, settings, gathered, group, say)


def _finish(job: Job, plan: Plan, settings, gathered, group, say) -> int:
    """Rank 0: the index from every rank's records, the failures, one closing line."""
    records: Dict[int, dict] = dict(plan.done)
    for share, _, _ in gathered:
        records.update(share)
    interrupted = any(flag for _, flag, _ in gathered)
    seconds = max(took for _, _, took in gathered)  # the slowest rank ends the run
    lines = [records.get(i) or results.failure_record(item, settings, INTERRUPTED) for i, item in enumerate(plan.items)]
    results.write_index(job.out, lines)
    made = sum(len([r for r in share.values() if r["error"] is None]) for share, _, _ in gathered)
    failed = [r for r in lines if r["error"] is not None and r["error"] != INTERRUPTED]
    for record in failed:
        say(f"could not explain {record['input']}: {record['error']}")
    rate = f"{made / seconds:.1f} images/s" if seconds > 0 and made else "no images"
    where = f"{group.world} processes" if group.world > 1 else f"1 process, {job.workers} decode worker(s)"
    if interrupted:
        say(f"interrupted: stopped after the current batch; {len(plan.done) + made} of {len(plan.items)} input(s) "
            f"done in {job.out}; run the same command again to finish")
        return 130
    say(f"explained {made} image(s) in {seconds:.1f} s ({rate}, {where}) into {job.out}"
        + (f"; {len(plan.done)} already done" if plan.done else "")
        + (f"; {len(failed)} could not be read (see {job.out}/index.jsonl)" if failed else ""))
    return 1 if failed else 0
