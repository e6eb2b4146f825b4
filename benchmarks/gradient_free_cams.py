"""Score-CAM, Ablation-CAM, EigenCAM and FullGrad against pytorch-grad-cam (and torch-cam's Score-CAM): one run.

    nice -n 10 python benchmarks/gradient_free_cams.py                 # the rows in benchmarks/results/
    nice -n 10 python benchmarks/gradient_free_cams.py --quick         # a look in a few minutes (64 px, not written)

For each model (resnet18, resnet50 at ``layer4``, 224 px, random seeded weights) and batch size (1, 4), on the CPU:

- ``input gradient``: one forward and backward of the model to the input, the unit of the ``ours in input
  gradients`` column (timed again in every row's rounds, and that row's median is the unit);
- ``scorecam``: ``explain(x, t, cams="scorecam")`` against ``ScoreCAM(model, [layer])(x, targets)`` and torch-cam's
  ``ScoreCAM`` (batched too; its map differs slightly: it upsamples without aligned corners);
- ``ablationcam``: ``explain(x, t, cams="ablationcam")`` (the model from ``layer4`` on only) against
  ``AblationCAM`` (which runs the whole model for each ablated channel);
- ``eigencam``: ``explain(x, t).cams_raw["eigencam"]`` (a forward and a backward) against ``EigenCAM`` (a forward);
- ``fullgrad``: ``explain(x, t, cams="fullgrad")`` against ``FullGrad``.

Each row's calls run interleaved (a slow spell of the shared machine falls on all of them), the time is the median
over the rounds. Score-CAM and pytorch-grad-cam's Ablation-CAM make ``B x K`` forwards of the whole model
(K = 512 or 2048 channels): minutes to an hour a call here, so they run ``--heavy-rounds`` rounds without a
warm-up (a warm-up is one forward among thousands), and rows whose heavy calls would make more than
``--max-forwards`` forwards of resnet50-sized work are not run (the table says so). ``max diff``: ours through
pytorch-grad-cam's scaling (``scale_cam_image`` twice) against its output.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torchvision

import guided_swap as gs
import pytorch_grad_cam as pgc
from guided_swap._files import atomic_write
from guided_swap.checks.benchmark import interleaved
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

try:
    from torchcam.methods import ScoreCAM as TorchCamScoreCAM
except ImportError:  # torch-cam is optional
    TorchCamScoreCAM = None

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LIBRARY = {"scorecam": pgc.ScoreCAM, "ablationcam": pgc.AblationCAM, "eigencam": pgc.EigenCAM,
           "fullgrad": pgc.FullGrad}
HEAVY = ("scorecam", "ablationcam")
CHANNELS = {"resnet18": 512, "resnet50": 2048}
COST = {"resnet18": 0.45, "resnet50": 1.0}  # forward cost relative to resnet50's, for --max-forwards


def _quiet(fn: Callable) -> Callable:
    """``fn`` with pytorch-grad-cam's progress bars and warnings silenced."""
    def call():
        with warnings.catch_warnings(), open(os.devnull, "w") as null:
            warnings.simplefilter("ignore")
            stderr, sys.stderr = sys.stderr, null
            try:
                return fn()
            finally:
                sys.stderr = stderr
    return call


def _library(name: str, model, layer, x, targets) -> Callable:
    def call():
        tool = LIBRARY[name](model, [] if name == "fullgrad" else [layer])
        try:
            return tool(input_tensor=x, targets=targets)
        finally:
            tool.activations_and_grads.release()
    return _quiet(call)


def _torchcam(model, layer_name: str, x, target) -> Callable:
    def call():
        with TorchCamScoreCAM(model, layer_name, batch_size=32, input_shape=tuple(x.shape[1:])) as extractor:
            with torch.no_grad():
                scores = model(x)
            return extractor(class_idx=target.tolist(), scores=scores)[0]
    return _quiet(call)


def _ours(explainer, name: str, x, target) -> Callable:
    if name == "eigencam":
        return lambda: explainer.explain(x, target).cams_raw["eigencam"]
    return lambda: explainer.explain(x, target, cams=name).cams_raw[name]


def _input_gradient(model, x, target) -> Callable:
    def call():
        leaf = x.detach().requires_grad_(True)
        model(leaf).gather(1, target.view(-1, 1)).sum().backward()
        return leaf.grad
    return call


def _max_diff(name: str, ours: torch.Tensor, theirs: np.ndarray, x: torch.Tensor) -> float:
    size = None if name == "fullgrad" else (x.shape[-1], x.shape[-2])
    return float(np.abs(scale_cam_image(scale_cam_image(ours.numpy(), size)) - theirs).max())


def _timed(calls: Dict[str, Callable], rounds: int, warmup: int) -> Dict[str, dict]:
    """Median seconds of each call over interleaved rounds, and the last result of each."""
    last: Dict[str, object] = {}
    wrapped = {key: (lambda key=key, call=call: last.__setitem__(key, call())) for key, call in calls.items()}
    times = interleaved(wrapped, rounds, warmup)
    return {key: {"s": statistics.median(values), "all_s": values, "result": last[key]} for key, values in times.items()}


def model_rows(model_name: str, batch: int, size: int, args) -> List[dict]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, weights=None).eval()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = model(x).argmax(dim=1)
    targets = [ClassifierOutputTarget(int(t)) for t in target]
    explainer = gs.convert(model, layer="layer4")
    layer = model.get_submodule("layer4")
    measured = {"measured": time.strftime("%Y-%m-%d %H:%M"), "load": round(os.getloadavg()[0], 1)}
    gradient = _input_gradient(model, x, target)
    unit = _timed({"gradient": gradient}, args.rounds, 1)["gradient"]["s"]
    rows = [{"model": model_name, "batch": batch, "size": size, "method": "input gradient", "guided_swap_s": unit,
             "x_grad": 1.0, **measured}]
    forwards = batch * CHANNELS[model_name] * COST[model_name] * (size / 224) ** 2
    for name in ("eigencam", "fullgrad", "ablationcam", "scorecam"):
        calls = {"guided_swap": _ours(explainer, name, x, target),
                 "pytorch_grad_cam": _library(name, model, layer, x, targets), "gradient": gradient}
        if name == "scorecam" and TorchCamScoreCAM is not None:
            calls["torchcam"] = _torchcam(model, "layer4", x, target)
        heavy = name in HEAVY
        if heavy and forwards > args.max_forwards:
            rows.append({"model": model_name, "batch": batch, "size": size, "method": name, **measured, "skipped":
                         f"{batch * CHANNELS[model_name]} forwards of {model_name} per call: over --max-forwards"})
            print(json.dumps(rows[-1]), flush=True)
            continue
        if name == "ablationcam" and heavy:  # ours is not heavy: time it with the light rounds, then theirs
            timed = _timed({"guided_swap": calls["guided_swap"], "gradient": gradient}, args.rounds, 1)
            timed.update(_timed({"pytorch_grad_cam": calls["pytorch_grad_cam"]}, args.heavy_rounds, 0))
        else:
            timed = _timed(calls, args.heavy_rounds if heavy else args.rounds, 0 if heavy else 1)
        row = {"model": model_name, "batch": batch, "size": size, "method": name, **measured,
               "rounds": {key: len(value["all_s"]) for key, value in timed.items()},
               "max_diff": _max_diff(name, timed["guided_swap"]["result"], timed["pytorch_grad_cam"]["result"], x)}
        for key, value in timed.items():
            row[f"{key}_s"] = value["s"]
        row["ratio"] = row["pytorch_grad_cam_s"] / row["guided_swap_s"]
        row["x_grad"] = row["guided_swap_s"] / row["gradient_s"]  # the gradient timed in this row's rounds
        if "torchcam_s" in row:
            row["torchcam_ratio"] = row["torchcam_s"] / row["guided_swap_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(result: dict) -> str:
    lines = ["| model | batch | method | guided_swap | pytorch-grad-cam | ratio | torch-cam (ratio) | ours in input "
             "gradients | max diff | measured (load) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        head = f"| {r['model']} | {r['batch']} | {r['method']} |"
        when = f" {r.get('measured', '?')} ({r.get('load', '?')}) |"
        if "skipped" in r:
            lines.append(f"{head} not run: {r['skipped']} | | | | | |{when}")
        elif r["method"] == "input gradient":
            lines.append(f"{head} {r['guided_swap_s']:.3f} s (plain autograd) | | | | 1 | |{when}")
        else:
            torchcam = f"{r['torchcam_s']:.2f} s ({r['torchcam_ratio']:.2f}x)" if "torchcam_s" in r else ""
            lines.append(f"{head} {r['guided_swap_s']:.3f} s | {r['pytorch_grad_cam_s']:.3f} s | {r['ratio']:.2f}x | "
                         f"{torchcam} | {r['x_grad']:.1f} | {r['max_diff']:.1e} |{when}")
    env = result["environment"]
    lines += ["", f"resnet18 and resnet50 (random seeded weights) at layer4, {result['size']} px, CPU: {env['cpu']}, "
              f"{env['threads']} threads, {env['cores']} cores, torch {env['torch']}, pytorch-grad-cam "
              f"{env['pytorch_grad_cam']}, torch-cam {env['torchcam']}, {env['date']}, niceness {env['nice']}; "
              "measured (load): when each model and batch was measured, and the 1-minute load average then (the "
              "machine is shared with other jobs: the ratios are the result, not the absolute times). ratio: pytorch-grad-cam's time over guided_swap's; torch-cam: its Score-CAM's "
              "time (and its time over ours; its map differs slightly: no aligned corners in its upsampling). ours in "
              "input gradients: guided_swap's time over one plain input gradient of the model (forward and backward, "
              f"timed in the same interleaved rounds as the row). Medians of {result['rounds']} interleaved rounds after a warm-up; Score-CAM "
              f"and pytorch-grad-cam's Ablation-CAM (B x K whole-model forwards a call): {result['heavy_rounds']} "
              "round(s) without a warm-up. max diff: ours through pytorch-grad-cam's scaling (scale_cam_image "
              "twice) against its output (EigenCAM: its SVD sign is arbitrary there, and a flipped sign shows as a "
              "large difference)."]
    return "\n".join(lines) + "\n"


def _versions() -> Dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for key, package in (("pytorch_grad_cam", "grad-cam"), ("torchcam", "torchcam")):
        try:
            found[key] = version(package)
        except PackageNotFoundError:
            found[key] = "not installed"
    return found


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--heavy-rounds", type=int, default=1)
    parser.add_argument("--max-forwards", type=float, default=2048,
                        help="skip heavy rows above this many resnet50-sized 224 px forwards a call")
    parser.add_argument("--quick", action="store_true", help="64 px inputs, for a smoke run (not written)")
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--update", action="store_true",
                        help="measure only --models x --batches again, keeping the other rows of the results file")
    args = parser.parse_args(argv)
    size = 64 if args.quick else 224
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    rows = []
    for model_name in args.models.split(","):
        for batch in map(int, args.batches.split(",")):
            rows += model_rows(model_name, batch, size, args)
    if args.update:
        with open(os.path.join(RESULTS, "gradient_free_cams.json")) as handle:
            old = json.load(handle)
        kept = [r for r in old["rows"] if not any(r["model"] == n["model"] and r["batch"] == n["batch"] for n in rows)]
        for row in kept:
            row.setdefault("measured", old["environment"]["date"])
            row.setdefault("load", old["environment"]["load"].split(" / ")[0])
        order = {name: i for i, name in enumerate(CHANNELS)}
        rows = sorted(kept + rows, key=lambda r: (order[r["model"]], r["batch"]))
    result = {"rows": rows, "rounds": args.rounds, "heavy_rounds": args.heavy_rounds, "size": size,
              "environment": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                              "cores": os.cpu_count(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                              "nice": os.nice(0), "load": load, **_versions()}}
    text = markdown(result)
    print(text)
    if not args.quick:
        for suffix, content in ((".json", json.dumps(result, indent=2)), (".md", text)):
            with atomic_write(os.path.join(RESULTS, "gradient_free_cams" + suffix), suffix=suffix) as temporary:
                with open(temporary, "w") as handle:
                    handle.write(content)
    return 0


if __name__ == "__main__":
    sys.exit(main())
