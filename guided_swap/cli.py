"""The ``guided-swap`` command: explain images, run the demo, list layers, export, benchmark.

    guided-swap demo
    guided-swap explain photos/ --model resnet50 --weights resnet50.pth --layer layer4 --out maps/
    guided-swap layers resnet50
    guided-swap export --model resnet18 --layer layer4 --shape 2,3,224,224 --out resnet18.pt2
    guided-swap bench

Errors are one line on stderr and a non-zero exit code (``--traceback`` shows the whole story).
"""
import argparse
import importlib
import os
import sys
import warnings
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ._files import atomic_write
from .errors import CommandError, GuidedSwapError
from .rules import rules

METHODS = ("guided", "deconvnet", "gradient", "gradcam", "guided-gradcam", "all")
RULE_OF_METHOD = {"guided": "guided", "deconvnet": "deconvnet", "gradient": "gradient", "gradcam": "gradient",
                  "guided-gradcam": "guided", "all": "guided"}


def load_model(spec: str, weights: Optional[str] = None) -> nn.Module:
    """A model from a torchvision name, ``package.module:factory``, or ``demo``; weights from a state-dict file."""
    if spec == "demo":
        from .demo import load_demo

        return load_demo()[0]
    if ":" in spec:
        module_name, _, factory_name = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), factory_name)
        except (ImportError, AttributeError) as error:
            raise CommandError(f"cannot load model factory {spec!r}: {error}") from None
        model = factory()
    else:
        import torchvision

        if spec not in torchvision.models.list_models():
            raise CommandError(f"unknown model {spec!r}: use a torchvision name (e.g. resnet50) or package.module:factory")
        model = torchvision.models.get_model(spec, weights=None)
    if not isinstance(model, nn.Module):
        raise CommandError(f"{spec!r} did not give a torch.nn.Module but a {type(model).__name__}")
    if weights is None:
        if spec != "demo":
            print(f"guided-swap: warning: {spec} has random weights (pass --weights FILE for a trained model)",
                  file=sys.stderr)
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError) as error:
            raise CommandError(f"weights {weights!r} do not fit {spec}: {str(error).splitlines()[0]}") from None
    return model.eval()


def _input_options(args, model: nn.Module) -> dict:
    if args.model == "demo":
        from .demo import SIZE, checkpoint

        stats = checkpoint()
        return {"resize": SIZE, "crop": SIZE, "mean": (stats["mean"],), "std": (stats["std"],), "channels": 1}
    from .capture import input_spec

    channels = (input_spec(model) or (4, 3))[1]
    return {"resize": args.resize, "crop": args.size, "channels": channels}


def _output_name(relative: str) -> str:
    stem = os.path.splitext(relative)[0]
    return stem.replace(os.sep, "__").replace("/", "__")


def _write_npz(path: str, arrays: dict) -> None:
    with atomic_write(path, suffix=".npz") as temporary, open(temporary, "wb") as stream:
        np.savez_compressed(stream, **arrays)


def _maps(explanation, method: str) -> dict:
    arrays = {"logits": explanation.logits.numpy(), "target": explanation.target.numpy()}
    if method in ("guided", "deconvnet", "gradient", "guided-gradcam", "all"):
        arrays["gradient"] = explanation.gradient.numpy()
    if method in ("gradcam", "guided-gradcam", "all"):
        arrays["cam"], arrays["cam_raw"] = explanation.cam.numpy(), explanation.cam_raw.numpy()
    if method in ("guided-gradcam", "all"):
        arrays["guided_gradcam"] = explanation.guided_gradcam.numpy()
    return arrays


def _progress(done: int, total: int, note: str) -> None:
    end = "\n" if done == total or not sys.stderr.isatty() else "\r"
    print(f"[{done}/{total}] {note}", end=end, file=sys.stderr, flush=True)


def cmd_explain(args) -> int:
    from . import convert
    from .images import find_images, load_image
    from .viz import figure, save_png

    if args.batch_size < 1:
        raise CommandError("--batch-size must be at least 1")
    images = find_images(args.inputs)
    if not images:
        raise CommandError(f"no images found in {args.inputs}")
    model = load_model(args.model, args.weights)
    options = _input_options(args, model)
    layer = None if args.method in ("guided", "deconvnet", "gradient") else args.layer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        example = torch.zeros(1, options["channels"], options["crop"], options["crop"])
        explainer = convert(model, layer=layer, rule=RULE_OF_METHOD[args.method], example_input=example)
    os.makedirs(args.out, exist_ok=True)
    todo = [(path, _output_name(rel)) for path, rel in images
            if not (os.path.exists(os.path.join(args.out, _output_name(rel) + ".npz")) and
                    os.path.exists(os.path.join(args.out, _output_name(rel) + ".png")))]
    skipped_done, failed = len(images) - len(todo), 0
    if skipped_done:
        print(f"guided-swap: {skipped_done} image(s) already done in {args.out}, skipping them", file=sys.stderr)
    for start in range(0, len(todo), args.batch_size):
        batch, names = [], []
        for path, name in todo[start:start + args.batch_size]:
            try:
                batch.append(load_image(path, **options))
                names.append(name)
            except (ValueError, TypeError, OSError) as error:
                failed += 1
                print(f"guided-swap: skipped {path}: {error}", file=sys.stderr)
        if batch:
            x = torch.stack(batch)
            target = None if args.target == "auto" else int(args.target)
            explanation = explainer.explain(x, target)
            arrays = _maps(explanation, args.method)
            for i, name in enumerate(names):
                _write_npz(os.path.join(args.out, name + ".npz"), {k: v[i] for k, v in arrays.items()})
                one = explanation[i]
                save_png(figure(one, x[i:i + 1], mean=options.get("mean", (0.485, 0.456, 0.406)),
                                std=options.get("std", (0.229, 0.224, 0.225)), notes=[name]),
                         os.path.join(args.out, name + ".png"))
        _progress(min(start + args.batch_size, len(todo)), len(todo), names[-1] if names else "")
    print(f"guided-swap: explained {len(todo) - failed} image(s) into {args.out}" +
          (f"; {failed} could not be read" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    path = run_demo(args.out)
    print(path)
    return 0


def cmd_layers(args) -> int:
    from . import layer_names

    names = layer_names(load_model(args.model, args.weights))
    print("modules (capture what the module returns):")
    print("\n".join("  " + name for name in names["modules"]))
    print("graph nodes (torchvision naming):")
    print("\n".join("  " + name for name in names["nodes"]))
    return 0


def cmd_export(args) -> int:
    from . import convert, export

    try:
        shape = tuple(int(part) for part in args.shape.split(","))
    except ValueError:
        raise CommandError(f"--shape takes comma-separated sizes like 2,3,224,224; got {args.shape!r}") from None
    model = load_model(args.model, args.weights)
    layer = None if args.layer == "none" else args.layer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explainer = convert(model, layer=layer, rule=args.rule, example_input=torch.zeros((1,) + shape[1:]))
        export(explainer, torch.randn(shape), args.out)
    print(args.out)
    return 0


def cmd_bench(args, rest: List[str]) -> int:
    from .benchmark import main as bench_main

    return bench_main(rest)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="guided-swap", description=__doc__.split("\n")[0])
    top.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    sub = top.add_subparsers(dest="command", required=True)

    explain = sub.add_parser("explain", help="explain images or folders of images")
    explain.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    explain.add_argument("--model", required=True, help="torchvision name, package.module:factory, or demo")
    explain.add_argument("--weights", help="state-dict file for the model")
    explain.add_argument("--layer", default="auto", help="module or graph node name, or auto (see: guided-swap layers)")
    explain.add_argument("--method", default="all", choices=METHODS)
    explain.add_argument("--target", default="auto", help="class index, or auto (each image's top class)")
    explain.add_argument("--batch-size", type=int, default=8)
    explain.add_argument("--size", type=int, default=224, help="centre-crop size")
    explain.add_argument("--resize", type=int, default=256, help="shorter side before the crop")
    explain.add_argument("--out", default="guided_swap_maps")

    demo = sub.add_parser("demo", help="the main job, offline, on the bundled face/non-face CNN")
    demo.add_argument("--out", default="guided_swap_demo")

    layers = sub.add_parser("layers", help="list the names --layer accepts")
    layers.add_argument("model")
    layers.add_argument("--weights")

    export = sub.add_parser("export", help="export a .pt2 program (forward + rule backward + CAM maths)")
    export.add_argument("--model", required=True)
    export.add_argument("--weights")
    export.add_argument("--layer", default="auto", help="module or node name, auto, or none")
    export.add_argument("--rule", default="guided", choices=rules(), help="a registered backprop rule")
    export.add_argument("--shape", default="2,3,224,224", help="example input shape; the batch stays dynamic")
    export.add_argument("--out", required=True)

    sub.add_parser("bench", help="the side-by-side benchmark (options: guided-swap bench --help)", add_help=False)
    return top


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = parser()
    if "bench" in argv[:2]:
        return cmd_bench(None, argv[argv.index("bench") + 1:])
    args = top.parse_args(argv)
    commands = {"explain": cmd_explain, "demo": cmd_demo, "layers": cmd_layers, "export": cmd_export}
    try:
        return commands[args.command](args)
    except (GuidedSwapError, ValueError, TypeError, OSError) as error:
        if args.traceback:
            raise
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"guided-swap: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
