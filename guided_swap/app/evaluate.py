"""``guided-swap evaluate RESULTS``: the faithfulness metrics (:mod:`guided_swap.checks.metrics`) of every map a
run of ``guided-swap explain`` saved, from its ``.npz`` files and the settings recorded in them.

For each result (``RESULTS/NAME.npz``) and each map it holds (``cam``, ``cams.NAME``, and ``gradient`` /
``guided_gradcam`` as the largest absolute value over channels), with the target the result explained:
ROAD (combined, MoRF, LeRF), confidence change (and its drop and increase; the input multiplied by the map
min-max scaled to [0, 1], as pytorch-grad-cam scales its CAMs), and the deletion and insertion
curves with their areas. What one result gives goes to ``OUT/NAME.json`` (default ``OUT`` =
``RESULTS/evaluation``), written atomically with the evaluation's settings and the fingerprint of the result it
measured, so a rerun skips the results already evaluated with the same settings and finishes an interrupted
run. Then :mod:`guided_swap.app.evaluation_report` writes the tables and the plot.

ROAD's noise is drawn per result from a generator seeded with ``--seed``: a result's numbers do not depend on
the batch it was evaluated in, nor on the run. ROAD ranks the positions with their ties broken in position order
(:func:`~guided_swap.checks.metrics.tie_broken`, as deletion and insertion rank them): a CAM's flat zeros would
otherwise leave nothing kept at the percentiles below their share, and ROAD would be NaN.

>>> evaluation_settings(Options(metrics=("deletion",), steps=8))["steps"]
8
"""
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .._files import atomic_write
from .._version import __version__
from ..checks import metrics as measures
from ..core.errors import CommandError
from ..run.convert import convert
from . import results
from .evaluation_report import write_report
from .model_spec import build

METRICS = ("road", "confidence", "deletion", "insertion")
OUT = "evaluation"
MODEL_KEYS = ("model", "weights", "weights_sha256", "weights_url")


@dataclass(frozen=True)
class Options:
    """What the evaluation measures (its settings, recorded in every output)."""

    metrics: Tuple[str, ...] = METRICS
    percentiles: Tuple[float, ...] = measures.PERCENTILES
    noise: float = 0.01
    seed: int = 0
    steps: int = measures.causal.DEFAULT_STEPS
    deletion_baseline: str = "zeros"
    insertion_baseline: str = "blur"
    batch_size: int = 8
    chunk: int = 32


@dataclass
class Found:
    """One ``.npz`` result: its name under RESULTS, its path, its record."""

    name: str
    path: str
    record: Dict[str, Any] = field(default_factory=dict)


def evaluation_settings(options: Options) -> Dict[str, Any]:
    """What makes an evaluation what it is: recorded in each output, compared on a rerun."""
    return results.normalised({
        "library": "guided_swap", "version": __version__, "metrics": list(options.metrics),
        "percentiles": list(options.percentiles), "noise": options.noise, "seed": options.seed,
        "steps": options.steps, "deletion_baseline": options.deletion_baseline,
        "insertion_baseline": options.insertion_baseline, "score": "softmax",
        "confidence_maps": "min-max scaled to [0, 1] per map", "road_ties": "position order"})


def find_results(folder: str, out: str) -> List[Found]:
    """Every ``.npz`` guided-swap wrote under ``folder`` (hidden files and ``out`` skipped), sorted by name."""
    if not os.path.isdir(folder):
        raise CommandError(f"no such results folder: {folder!r}")
    out_real, found = os.path.realpath(out), []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and
                         os.path.realpath(os.path.join(root, d)) != out_real)
        for file in sorted(f for f in files if f.endswith(".npz") and not f.startswith(".")):
            path = os.path.join(root, file)
            record = results.read_record(path)
            if record is not None and record.get("error") is None:
                name = os.path.relpath(path, folder).replace(os.sep, "/")[:-len(".npz")]
                found.append(Found(name, path, record))
    if not found:
        raise CommandError(f"no guided-swap .npz results in {folder!r}: explain with --save npz (the default) first")
    return found


def check_model(found: Sequence[Found], model_settings: Dict[str, Any]) -> None:
    """Refuse to evaluate results another model made (the maps explain that model, not this one)."""
    for result in found:
        recorded = {key: (result.record.get("settings") or {}).get(key) for key in MODEL_KEYS}
        if recorded != {key: model_settings.get(key) for key in MODEL_KEYS}:
            raise CommandError(f"{result.name} was made by model {recorded['model']!r} with weights "
                               f"{recorded['weights']!r}; evaluate it with the same --model and --weights "
                               f"(given: {model_settings.get('model')!r}, {model_settings.get('weights')!r})")


def output_path(out: str, name: str) -> str:
    return os.path.join(out, *name.split("/")) + ".json"


def to_do(found: Sequence[Found], out: str, settings: Dict[str, Any], force: bool) -> List[Found]:
    """The results without an evaluation of these settings of this very result (all of them with ``force``)."""
    pending = []
    for result in found:
        old = read_evaluation(output_path(out, result.name))
        if force or old is None or old.get("settings") != settings or \
                old.get("fingerprint") != results.fingerprint(result.record):
            pending.append(result)
    return pending


def read_evaluation(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as stream:
            return json.load(stream)
    except (OSError, ValueError):
        return None


def map_names(arrays: Dict[str, np.ndarray]) -> List[str]:
    """The maps of a result that metrics rank positions by, in a fixed order."""
    names = [n for n in ("cam", "gradient", "guided_gradcam") if n in arrays]
    return names + sorted(n for n in arrays if n.startswith("cams.") and n != "cams.gradcam")


def position_map(name: str, value: np.ndarray) -> np.ndarray:
    """One value per position: a CAM as it is, a pixel map's largest absolute value over its channels."""
    return value if name == "cam" or name.startswith("cams.") else np.abs(value).max(axis=0)


def load(result: Found) -> Tuple[torch.Tensor, int, Dict[str, np.ndarray]]:
    """A result's input as fed (C, H, W), its target, and its position maps by name."""
    with np.load(result.path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files if name != "record"}
    maps = {name: position_map(name, arrays[name]).astype(np.float32) for name in map_names(arrays)}
    return torch.from_numpy(arrays["input"]).float(), int(arrays["target"]), maps


def evaluate_batch(ex, batch: Sequence[Found], options: Options, device) -> Dict[str, dict]:
    """``{result name: {map name: values}}`` for one batch of results of one input shape."""
    loaded = [load(result) for result in batch]
    x = torch.stack([item[0] for item in loaded]).to(device)
    target = torch.tensor([item[1] for item in loaded], device=device)
    names = [n for n in map_names({n: None for n in loaded[0][2]}) if all(n in item[2] for item in loaded)]
    out: Dict[str, dict] = {result.name: {} for result in batch}
    for name in names:
        maps = torch.from_numpy(np.stack([item[2][name] for item in loaded])).to(device)
        for result, values in zip(batch, _measure(ex, x, maps, target, options)):
            out[result.name][name] = values
    return out


def _measure(ex, x, maps, target, options: Options) -> List[dict]:
    rows: List[dict] = [{} for _ in range(x.shape[0])]
    if "confidence" in options.metrics:
        change = measures.confidence_change(ex, x, measures.unit_range(maps), target)
        for row, value in zip(rows, change.tolist()):
            row.update(confidence_change=value, drop_in_confidence=0.0 if value >= 0 else -value,
                       increase_in_confidence=float(value > 0))
    if "road" in options.metrics:
        for i, row in enumerate(rows):  # one generator per result: its numbers do not depend on the batch
            generator = torch.Generator().manual_seed(options.seed)
            ranked = measures.tie_broken(maps[i:i + 1])  # a CAM's flat zeros would leave nothing kept (NaN)
            curves = measures.road_curves(ex, x[i:i + 1], ranked, target[i:i + 1], options.percentiles,
                                         "combined", options.noise, generator, options.chunk)
            morf, lerf = (float(curves[k].double().mean()) for k in ("morf", "lerf"))
            row.update(road_combined=(lerf - morf) / 2, road_morf=morf, road_lerf=lerf)
    for kind, baseline in (("deletion", options.deletion_baseline), ("insertion", options.insertion_baseline)):
        if kind in options.metrics:
            curve = getattr(measures, kind)(ex, x, maps, target, options.steps, baseline, options.chunk)
            for row, area, points in zip(rows, curve.auc.tolist(), curve.curve.tolist()):
                row.update({f"{kind}_auc": area, f"{kind}_curve": points})
    return rows


def write_evaluation(out: str, result: Found, settings: Dict[str, Any], values: Dict[str, dict]) -> None:
    """One result's evaluation, atomically."""
    path = output_path(out, result.name)
    content = {"result": result.name, "input": result.record.get("input"), "target": result.record.get("target"),
               "fingerprint": results.fingerprint(result.record), "settings": settings, "maps": values}
    with atomic_write(path) as temporary, open(temporary, "w", encoding="utf-8") as stream:
        json.dump(content, stream)


def batches(pending: Sequence[Found], size: int) -> List[List[Found]]:
    """The pending results in batches of ``size`` that share an input shape."""
    by_shape: Dict[Tuple[int, ...], List[Found]] = {}
    for result in pending:
        with np.load(result.path, allow_pickle=False) as data:
            by_shape.setdefault(tuple(data["input"].shape), []).append(result)
    return [group[i:i + size] for group in by_shape.values() for i in range(0, len(group), size)]


def explainer_for(model, shape: Tuple[int, ...], device):
    """An explainer of ``model`` for its forward only (no layer captured)."""
    return convert(model, layer=None, rule="gradient", example_input=torch.zeros((1,) + shape)).to(device)


def device_for(choice: str) -> torch.device:
    """``--device`` as a device: ``auto`` is CUDA when present, else the CPU; one that is not here is refused."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError(f"--device {choice}: CUDA is not available here; use --device cpu")
    if choice.startswith("cuda:") and int(choice[5:]) >= torch.cuda.device_count():
        raise CommandError(f"--device {choice}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                           f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if choice == "mps" and not torch.backends.mps.is_available():
        raise CommandError("--device mps: MPS is not available here; use --device cpu")
    return torch.device(choice)


def run(folder: str, model_source, options: Options, out: Optional[str] = None, force: bool = False,
        device: str = "auto", say: Callable[[str], None] = print) -> int:
    """Evaluate every result of ``folder``; 0 when all are evaluated, 130 when interrupted."""
    out = out or os.path.join(folder, OUT)
    where = device_for(device)
    found = find_results(folder, out)
    check_model(found, model_source.settings())
    settings = evaluation_settings(options)
    pending = to_do(found, out, settings, force)
    say(f"guided-swap: {len(found) - len(pending)} of {len(found)} result(s) already evaluated with these settings")
    if pending:
        model = build(model_source, say=lambda m: say(f"guided-swap: warning: {m}"))
        explainers: Dict[Tuple[int, ...], Any] = {}
        try:
            for batch in batches(pending, options.batch_size):
                shape = tuple(np.load(batch[0].path, allow_pickle=False)["input"].shape)
                if shape not in explainers:
                    explainers[shape] = explainer_for(model, shape, where)
                ex = explainers[shape]
                values = evaluate_batch(ex, batch, options, where)
                for result in batch:
                    write_evaluation(out, result, settings, values[result.name])
        except KeyboardInterrupt:
            say("guided-swap: interrupted; run the same command again to finish")
            return 130
    for path in write_report(out, [read_evaluation(output_path(out, r.name)) for r in found], settings):
        say(path)
    return 0
