"""Score-CAM, Ablation-CAM, EigenCAM, FullGrad and fusions of several layers against pytorch-grad-cam and torch-cam.

    nice -n 10 python benchmarks/gradient_free_cams.py                 # the rows in benchmarks/results/
    nice -n 10 python benchmarks/gradient_free_cams.py --quick         # a look in a few minutes (64 px, not written)

torch-cam is optional (``pip install torchcam``; without it its columns stay empty). For each model (resnet18,
resnet50 at ``layer4``, 224 px, random seeded weights) and batch size (1, 4), on the CPU, in one run:

- ``input gradient``: one forward and backward of the model to the input, the unit of the ``ours in input
  gradients`` column (timed again in every row's rounds, and that row's median is the unit);
- ``eigencam``: ``explain(x, t).cams_raw["eigencam"]`` (a forward and a backward) against ``EigenCAM`` (a forward);
- ``fullgrad``: ``explain(x, t, cams="fullgrad")`` against ``FullGrad``;
- the fusions of ``layer3`` and ``layer4`` (an explainer of both layers): ``gradcam`` and ``layercam, fused
  (mean)``: ``explain(x, t).fused(name)`` against ``GradCAM``/``LayerCAM(model, [layer3, layer4])(x, targets)``
  (pytorch-grad-cam's several target layers) and torch-cam's extractor of both layers with its ``fuse_cams``
  (a maximum, not a mean: a different map); ``gradcam`` and ``gradcam++, fused (product: RefineCAM)``:
  ``explain(x, t).fused(name, how="product")`` against ``RefineCAM(model, [layer3, layer4], base_method=...)`` and
  torch-cam's ``RefineCAM``;
- ``ablationcam``: ``explain(x, t, cams="ablationcam")`` (the model from ``layer4`` on only) against
  ``AblationCAM`` (which runs the whole model for each ablated channel);
- ``scorecam``: ``explain(x, t, cams="scorecam")`` against ``ScoreCAM(model, [layer])(x, targets)`` and torch-cam's
  ``ScoreCAM`` (batched too; its map differs slightly: it scales before upsampling, without aligned corners).

Each row's calls run interleaved (a slow spell of the shared machine falls on all of them), the time is the median
over the rounds. Score-CAM and pytorch-grad-cam's Ablation-CAM make ``B x K`` forwards of the whole model
(K = 512 or 2048 channels): minutes to an hour a call here, so they run ``--heavy-rounds`` rounds without a
warm-up (a warm-up is one forward among thousands), and rows whose heavy calls would make more than
``--max-forwards`` forwards of resnet50-sized work are not run (the table says so). ``max diff``: ours (through
pytorch-grad-cam's scaling, ``scale_cam_image`` twice, where it is a single layer's map) against pytorch-grad-cam's
output; ``torch-cam max diff``: the same against torch-cam's map (a number, not a check: see the table's notes).
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

try:  # torch-cam is optional: pip install torchcam
    import torchcam.methods as torchcam
except ImportError:
    torchcam = None

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LIBRARY = {"scorecam": pgc.ScoreCAM, "ablationcam": pgc.AblationCAM, "eigencam": pgc.EigenCAM,
           "fullgrad": pgc.FullGrad}
HEAVY = ("scorecam", "ablationcam")
CHANNELS = {"resnet18": 512, "resnet50": 2048}
COST = {"resnet18": 0.45, "resnet50": 1.0}  # forward cost relative to resnet50's, for --max-forwards
FUSED_LAYERS = ("layer3", "layer4")
# row name: (CAM, how); "mean" is pytorch-grad-cam given several target layers, "product" its RefineCAM
FUSIONS = {"gradcam, fused (mean)": ("gradcam", "mean"), "layercam, fused (mean)": ("layercam", "mean"),
           "gradcam, fused (product: RefineCAM)": ("gradcam", "product"),
           "gradcam++, fused (product: RefineCAM)": ("gradcam++", "product")}
FUSED_BASE = {"gradcam": (pgc.GradCAM, "GradCAM"), "layercam": (pgc.LayerCAM, "LayerCAM"),
              "gradcam++": (pgc.GradCAMPlusPlus, "GradCAMpp")}  # pytorch-grad-cam's class, torch-cam's name


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
        with torchcam.ScoreCAM(model, layer_name, batch_size=32, input_shape=tuple(x.shape[1:])) as extractor:
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


def _pgc_fused(name: str, how: str, model, layers, x, targets) -> Callable:
    """pytorch-grad-cam given several target layers (``how="mean"``), or its RefineCAM (``"product"``)."""
    def call():
        if how == "mean":
            tool = FUSED_BASE[name][0](model, layers)
            tools = [tool]
        else:
            tool = pgc.RefineCAM(model, layers, base_method=FUSED_BASE[name][0])
            tools = tool.base_cam_per_layer
        try:
            return tool(input_tensor=x, targets=targets)
        finally:
            for one in tools:
                one.activations_and_grads.release()
    return _quiet(call)


def _torchcam_fused(name: str, how: str, model, x, target) -> Callable:
    """torch-cam's extractor of several layers and its ``fuse_cams`` (``how="mean"``: its fusion is a maximum), or
    its RefineCAM (``"product"``), at the input's size."""
    base = getattr(torchcam, FUSED_BASE[name][1])
    size = tuple(x.shape[2:])

    def call():
        if how == "mean":
            extractor = base(model, list(FUSED_LAYERS), input_shape=tuple(x.shape[1:]))
        else:
            extractor = torchcam.RefineCAM(model, list(FUSED_LAYERS), input_shape=tuple(x.shape[1:]),
                                           base_method=base)
        with extractor:
            scores = model(x)
            if how == "mean":
                return base.fuse_cams(extractor(class_idx=target.tolist(), scores=scores), size).detach()
            return extractor(class_idx=target.tolist(), scores=scores, target_shape=size)[0].detach()
    return _quiet(call)


def _minmax(cam: torch.Tensor) -> torch.Tensor:
    """torch-cam's normalisation of a (B, *spatial) map: min-max per sample, ``1e-8`` added to the range."""
    dims = tuple(range(1, cam.ndim))
    cam = cam - cam.amin(dim=dims, keepdim=True)
    return cam / (cam.amax(dim=dims, keepdim=True) + 1e-8)


def _abs_max(ours: torch.Tensor, theirs) -> float:
    theirs = theirs if isinstance(theirs, np.ndarray) else theirs.numpy()
    return float(np.abs(ours.numpy() - theirs).max())


def _row(head: dict, timed: Dict[str, dict], max_diff: float, torchcam_max_diff: Optional[float] = None) -> dict:
    row = {**head, "rounds": {key: len(value["all_s"]) for key, value in timed.items()}, "max_diff": max_diff}
    for key, value in timed.items():
        row[f"{key}_s"] = value["s"]
    row["ratio"] = row["pytorch_grad_cam_s"] / row["guided_swap_s"]
    row["x_grad"] = row["guided_swap_s"] / row["gradient_s"]  # the gradient timed in this row's rounds
    if "torchcam_s" in row:
        row["torchcam_ratio"] = row["torchcam_s"] / row["guided_swap_s"]
        row["torchcam_max_diff"] = torchcam_max_diff
    print(json.dumps(row), flush=True)
    return row


def model_rows(model_name: str, batch: int, size: int, args) -> List[dict]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, weights=None).eval()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = model(x).argmax(dim=1)
    targets = [ClassifierOutputTarget(int(t)) for t in target]
    explainer = gs.convert(model, layer="layer4")
    fusing = gs.convert(model, layer=list(FUSED_LAYERS))
    layer = model.get_submodule("layer4")
    measured = {"measured": time.strftime("%Y-%m-%d %H:%M"), "load": round(os.getloadavg()[0], 1)}
    gradient = _input_gradient(model, x, target)
    unit = _timed({"gradient": gradient}, args.rounds, 1)["gradient"]["s"]
    rows = [{"model": model_name, "batch": batch, "size": size, "method": "input gradient", "guided_swap_s": unit,
             "x_grad": 1.0, **measured}]
    forwards = batch * CHANNELS[model_name] * COST[model_name] * (size / 224) ** 2
    for name in ("eigencam", "fullgrad", *FUSIONS, "ablationcam", "scorecam"):
        head = {"model": model_name, "batch": batch, "size": size, "method": name, **measured}
        if name in FUSIONS:  # one explain of layer3 and layer4, then the fusion
            cam, how = FUSIONS[name]
            calls = {"guided_swap": lambda cam=cam, how=how: fusing.explain(x, target).fused(cam, how=how),
                     "pytorch_grad_cam": _pgc_fused(cam, how, model, [model.get_submodule(n) for n in FUSED_LAYERS],
                                                    x, targets), "gradient": gradient}
            if torchcam is not None:
                calls["torchcam"] = _torchcam_fused(cam, how, model, x, target)
            timed = _timed(calls, args.rounds, 1)
            ours = timed["guided_swap"]["result"]
            rows.append(_row(head, timed, _abs_max(ours, timed["pytorch_grad_cam"]["result"]),
                             _abs_max(ours, timed["torchcam"]["result"]) if "torchcam" in timed else None))
            continue
        calls = {"guided_swap": _ours(explainer, name, x, target),
                 "pytorch_grad_cam": _library(name, model, layer, x, targets), "gradient": gradient}
        if name == "scorecam" and torchcam is not None:
            calls["torchcam"] = _torchcam(model, "layer4", x, target)
        heavy = name in HEAVY
        if heavy and forwards > args.max_forwards:
            rows.append({**head, "skipped":
                         f"{batch * CHANNELS[model_name]} forwards of {model_name} per call: over --max-forwards"})
            print(json.dumps(rows[-1]), flush=True)
            continue
        if name == "ablationcam" and heavy:  # ours is not heavy: time it with the light rounds, then theirs
            timed = _timed({"guided_swap": calls["guided_swap"], "gradient": gradient}, args.rounds, 1)
            timed.update(_timed({"pytorch_grad_cam": calls["pytorch_grad_cam"]}, args.heavy_rounds, 0))
        else:
            timed = _timed(calls, args.heavy_rounds if heavy else args.rounds, 0 if heavy else 1)
        ours = timed["guided_swap"]["result"]
        rows.append(_row(head, timed, _max_diff(name, ours, timed["pytorch_grad_cam"]["result"], x),
                         _abs_max(_minmax(ours), timed["torchcam"]["result"]) if "torchcam" in timed else None))
    return rows


def markdown(result: dict) -> str:
    lines = ["| model | batch | method | guided_swap | pytorch-grad-cam | ratio | max diff | torch-cam | "
             "torch-cam ratio | torch-cam max diff | ours in input gradients | measured (load) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        head = f"| {r['model']} | {r['batch']} | {r['method']} |"
        when = f" {r.get('measured', '?')} ({r.get('load', '?')}) |"
        if "skipped" in r:
            lines.append(f"{head} not run: {r['skipped']} | | | | | | | |{when}")
        elif r["method"] == "input gradient":
            lines.append(f"{head} {r['guided_swap_s']:.3f} s (plain autograd) | | | | | | | 1 |{when}")
        else:
            torchcam = (f"{r['torchcam_s']:.3f} s | {r['torchcam_ratio']:.2f}x | {r['torchcam_max_diff']:.1e}"
                        if "torchcam_s" in r else " | | ")
            lines.append(f"{head} {r['guided_swap_s']:.3f} s | {r['pytorch_grad_cam_s']:.3f} s | {r['ratio']:.2f}x | "
                         f"{r['max_diff']:.1e} | {torchcam} | {r['x_grad']:.1f} |{when}")
    env = result["environment"]
    lines += ["", f"resnet18 and resnet50 (random seeded weights) at layer4 (the fused rows: layer3 and layer4), "
              f"{result['size']} px, CPU: {env['cpu']}, {env['threads']} threads, {env['cores']} cores, torch "
              f"{env['torch']}, pytorch-grad-cam {env['pytorch_grad_cam']}, torch-cam {env['torchcam']}, "
              f"{env['date']}, niceness {env['nice']}; measured (load): when each model and batch was measured, and "
              "the 1-minute load average then (the machine is shared with other jobs: the ratios are the result, not "
              "the absolute times). "
              "ratio: the peer's time over guided_swap's. ours in input gradients: guided_swap's time over one plain "
              "input gradient of the model (forward and backward, timed in the same interleaved rounds as the row). "
              f"Medians of {result['rounds']} interleaved rounds after a warm-up; Score-CAM and pytorch-grad-cam's "
              f"Ablation-CAM (B x K whole-model forwards a call): {result['heavy_rounds']} round(s) without a warm-up.",
              "",
              "Rows: `eigencam`, `fullgrad`, `ablationcam`, `scorecam`: `explain(x, t, cams=name).cams_raw[name]` "
              "against `EigenCAM`/`FullGrad`/`AblationCAM`/`ScoreCAM(model, [layer4])(x, targets)`. `NAME, fused "
              "(mean)`: `explain(x, t).fused(NAME)` (one explain of both layers, then the fusion) against `GradCAM` or "
              "`LayerCAM(model, [layer3, layer4])(x, targets)`. `NAME, fused (product: RefineCAM)`: "
              "`explain(x, t).fused(NAME, how=\"product\")` against `RefineCAM(model, [layer3, layer4], "
              "base_method=GradCAM or GradCAMPlusPlus)(x, targets)` (one forward and backward per layer there).",
              "",
              "max diff (pytorch-grad-cam): the largest absolute difference of the maps in [0, 1]; the single-layer "
              "rows put ours through pytorch-grad-cam's scaling (`scale_cam_image` twice) first, `fused` is in that "
              "scale already (EigenCAM: its SVD sign is arbitrary there, and a flipped sign shows as a large "
              "difference).",
              "",
              "torch-cam: a number, not a check: its maps differ from pytorch-grad-cam's by design in some rows. Its "
              "gradient extractors take `autograd.grad` of the score to the hooked layers' outputs only, where "
              "`explain` also returns the input gradient (a backward through the whole model) and pytorch-grad-cam "
              "calls `backward()` (to the parameters): the light fused rows' times are not the same work. "
              "Score-CAM: `ScoreCAM(model, \"layer4\", batch_size=32)`, against ours min-max scaled at the layer's "
              "resolution; it scales each activation at the layer's resolution, then upsamples it without aligned "
              "corners (pytorch-grad-cam and ours: upsample with aligned corners, then scale): slightly different "
              "weights, a few hundredths in the map where it has contrast (more where the map is nearly flat before "
              "its scaling, as with random weights and small inputs: the scaling to [0, 1] magnifies them). `fused "
              "(mean)`: `GradCAM`/`LayerCAM(model, [\"layer3\", \"layer4\"])` then `fuse_cams(cams, (H, W))`, whose "
              "fusion is the pixel-wise *maximum* of the min-max scaled maps (LayerCAM's passed through `tanh(2 m)` "
              "first), not pytorch-grad-cam's mean: a different map, its difference from ours is large. `fused "
              "(product)`: its `RefineCAM(model, [\"layer3\", \"layer4\"], base_method=GradCAM or GradCAMpp)` with "
              "`target_shape=(H, W)`: the same product of scaled, resized maps (torch's bilinear resize instead of "
              "OpenCV's, `1e-8` instead of `1e-7`): equal with Grad-CAM; with Grad-CAM++ its weights differ: "
              "torch-cam 0.5.0's `GradCAMpp` divides `alpha` in place through a boolean-mask index "
              "(`alpha[idx][mask].div_(...)`), which acts on a copy, so its weights are `sum_p G^2 ReLU(G)`, not "
              "Grad-CAM++'s."]
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
    if args.update and os.path.exists(os.path.join(RESULTS, "gradient_free_cams.json")):
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
