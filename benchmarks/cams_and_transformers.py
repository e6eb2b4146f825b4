"""Every gradient CAM from one pass, and transformer Grad-CAM, against pytorch-grad-cam: time ratios in one run.

    python benchmarks/cams_and_transformers.py                   # the rows in benchmarks/results/
    python benchmarks/cams_and_transformers.py --rounds 1 --quick  # a look in a minute (small inputs)

Rows:

- ``all seven CAMs``: one ``explain`` plus the seven maps (``e.cams[name]`` for each of
  ``guided_swap.cam_methods()``) against pytorch-grad-cam's seven calls (GradCAM, GradCAM++, XGradCAM, LayerCAM,
  HiResCAM, GradCAMElementWise, EigenGradCAM), each a forward and a backward of its own.
- ``transformer Grad-CAM``: ``explain`` + ``e.cam`` on a token (ViT) or channels-last (Swin) capture, against
  pytorch-grad-cam's GradCAM with the ``reshape_transform`` a user has to write.

Each method runs on the same batch and targets, warm-up first, then interleaved rounds; the time is the median.
``ratio`` is pytorch-grad-cam's time over guided_swap's. ``max_diff`` checks that both computed the same maps:
ours put through pytorch-grad-cam's own per-image min-max scaling and resize, against its output (EigenGrad-CAM
excepted: its SVD sign is arbitrary in pytorch-grad-cam). CPU, model weights random (seeded).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Callable, Dict

import numpy as np
import timm
import torch
import torchvision

import guided_swap as gs
import pytorch_grad_cam as pgc
from guided_swap._files import atomic_write
from guided_swap.checks.benchmark import interleaved
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

LIBRARY = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "xgradcam": pgc.XGradCAM,
           "layercam": pgc.LayerCAM, "hirescam": pgc.HiResCAM, "elementwise": pgc.GradCAMElementWise,
           "eigengradcam": pgc.EigenGradCAM}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name.startswith("timm:"):
        return timm.create_model(name[5:]).eval()
    model = torchvision.models.get_model(name, weights=None)
    if name.startswith("vit_"):
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts the head at zeros
    return model.eval()


def _tokens(prefix: int, grid):
    def reshape(t):
        return t[:, prefix:].reshape(t.shape[0], *grid, t.shape[-1]).permute(0, 3, 1, 2)
    return reshape


def _nhwc(t):
    return t.permute(0, 3, 1, 2)


def _transformer_reshape(name: str, model):
    """What a pytorch-grad-cam user writes for each model (from the model's own attributes)."""
    if name == "vit_b_16":
        return _tokens(1, (model.image_size // model.patch_size,) * 2)
    if name.startswith("timm:"):
        return _tokens(model.num_prefix_tokens, tuple(model.patch_embed.grid_size))
    return _nhwc


def _time(functions: Dict[str, Callable], rounds: int) -> Dict[str, float]:
    """Median wall seconds per call, in interleaved rounds after one warm-up round."""
    times = interleaved(functions, rounds, warmup=1)
    return {name: statistics.median(values) for name, values in times.items()}


def _library_call(cls, model, layer, x, targets, reshape=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tool = cls(model, [layer], reshape_transform=reshape)
        try:
            return tool(input_tensor=x, targets=targets)
        finally:
            tool.activations_and_grads.release()


def _scaled(raw: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    """pytorch-grad-cam's scaling: per image min-max and resize (per layer), then min-max again."""
    return scale_cam_image(scale_cam_image(raw.numpy(), (x.shape[-1], x.shape[-2])))


def all_seven(model_name: str, layer: str, size: int, batch: int, rounds: int) -> dict:
    model = _model(model_name)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = model(x).argmax(dim=1)
    targets = [ClassifierOutputTarget(int(t)) for t in target]
    start = time.perf_counter()
    explainer = gs.convert(model, layer=layer)
    conversion = time.perf_counter() - start
    module = model.get_submodule(layer)

    def ours():
        e = explainer.explain(x, target)
        return {name: e.cams[name] for name in gs.cam_methods()[:7]}

    def theirs():
        return {name: _library_call(cls, model, module, x, targets) for name, cls in LIBRARY.items()}

    times = _time({"guided_swap": ours, "pytorch_grad_cam": theirs}, rounds)
    e = explainer.explain(x, target)
    reference = theirs()
    diff = max(float(np.abs(_scaled(e.cams_raw[name], x) - reference[name]).max())
               for name in LIBRARY if name != "eigengradcam")
    return {"row": "all seven CAMs", "model": model_name, "layer": layer, "input": [batch, 3, size, size],
            "guided_swap_s": times["guided_swap"], "pytorch_grad_cam_s": times["pytorch_grad_cam"],
            "ratio": times["pytorch_grad_cam"] / times["guided_swap"], "max_diff": diff, "convert_s": conversion,
            "what": "1 explain + 7 maps vs 7 pytorch-grad-cam calls"}


def transformer(model_name: str, layer: str, size: int, batch: int, rounds: int) -> dict:
    model = _model(model_name)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = model(x).argmax(dim=1)
    targets = [ClassifierOutputTarget(int(t)) for t in target]
    start = time.perf_counter()
    explainer = gs.convert(model, layer=layer)
    conversion = time.perf_counter() - start
    module = model.get_submodule(layer)
    reshape = _transformer_reshape(model_name, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-rectifier warning: GELU nets swap nothing
        explainer.explain(x, target)

    def ours():
        return explainer.explain(x, target).cam

    def theirs():
        return _library_call(pgc.GradCAM, model, module, x, targets, reshape)

    times = _time({"guided_swap": ours, "pytorch_grad_cam": theirs}, rounds)
    diff = float(np.abs(_scaled(explainer.explain(x, target).cam_raw, x) - theirs()).max())
    return {"row": "transformer Grad-CAM", "model": model_name, "layer": layer, "input": [batch, 3, size, size],
            "guided_swap_s": times["guided_swap"], "pytorch_grad_cam_s": times["pytorch_grad_cam"],
            "ratio": times["pytorch_grad_cam"] / times["guided_swap"], "max_diff": diff, "convert_s": conversion,
            "layout": explainer.report.layouts[layer].describe(),
            "what": "explain + e.cam vs GradCAM(reshape_transform=...)"}


def markdown(result: dict) -> str:
    lines = ["| row | model | layer | input | guided_swap | pytorch-grad-cam | ratio | max diff |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        shape = "x".join(map(str, r["input"]))
        lines.append(f"| {r['row']} | {r['model']} | {r['layer']} | {shape} | {r['guided_swap_s']:.3f} s | "
                     f"{r['pytorch_grad_cam_s']:.3f} s | {r['ratio']:.1f}x | {r['max_diff']:.1e} |")
    env = result["environment"]
    lines += ["", f"ratio: pytorch-grad-cam's time over guided_swap's (median of {result['rounds']} interleaved "
              f"rounds after a warm-up). max diff: ours through pytorch-grad-cam's min-max scaling against its output "
              f"(EigenGrad-CAM excluded: its sign is arbitrary there). {env['cpu']}, {env['threads']} threads, "
              f"torch {env['torch']}, {env['date']}, {env.get('cores', '?')} cores, niceness {env.get('nice', '?')}, "
              f"load average {env.get('load', '?')} at the start. The machine was loaded (shared with other jobs): "
              "the ratios are the result; the absolute times are not a property of either library."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small inputs, for a smoke run (not written)")
    args = parser.parse_args(argv)
    size, vit = (64, 224) if args.quick else (224, 224)
    jobs = [(all_seven, "resnet50", "layer4", size, 2),
            (transformer, "vit_b_16", "encoder.layers.encoder_layer_11.ln_1", vit, 1),
            (transformer, "timm:vit_small_patch16_224", "blocks.11.norm1", vit, 1),
            (transformer, "swin_t", "features.7.1.norm1", vit, 1)]
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    rows = []
    for job, *arguments in jobs:
        rows.append(job(*arguments, args.rounds))
        print(json.dumps(rows[-1]), flush=True)
    result = {"rows": rows, "rounds": args.rounds, "environment": {
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "nice": os.nice(0),
        "load": load}}
    text = markdown(result)
    print(text)
    if not args.quick:
        for suffix, content in ((".json", json.dumps(result, indent=2)), (".md", text)):
            path = os.path.join(RESULTS, "cams_and_transformers" + suffix)
            with atomic_write(path, suffix=suffix) as temporary:
                with open(temporary, "w") as handle:
                    handle.write(content)
    return 0


if __name__ == "__main__":
    sys.exit(main())
