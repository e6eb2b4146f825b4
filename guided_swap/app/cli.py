"""The guided-swap command: explain images, run the demo, list layers, export, benchmark.

    guided-swap demo
    guided-swap explain photos/ --model resnet50 --weights resnet50.pth --out maps/
    torchrun --nproc-per-node=4 -m guided_swap explain photos/ --model resnet50 --weights r50.pth --out maps/
    guided-swap layers resnet50
    guided-swap export --model resnet18 --layer layer4 --shape 2,3,224,224 --out resnet18.pt2
    guided-swap bench
    guided-swap evaluate maps/ --model resnet50 --weights resnet50.pth

Errors are one line on stderr (--traceback shows the whole story). Exit codes: 0 done, 1 some inputs could
not be explained (each in OUT/index.jsonl with its reason) or an error stopped the run after it began writing
(what was written stays), 2 a usage error (nothing was written), 130 interrupted.
"""
import argparse
import difflib
import math
import os
import re
import sys
import textwrap
from typing import List, Optional, Sequence

import torch
from matplotlib import colormaps

from .._console import warnings_in_one_line
from ..checks.benchmark import main as bench_main
from ..checks.demo import run_demo
from ..core.cam import cam_methods
from ..core.errors import CommandError, GuidedSwapError
from ..core.rules import get_rule
from ..media import labels as label_files
from ..media.viz import CAM_TITLES
from ..run.convert import convert, layer_names
from ..run.program import export
from ..checks.metrics import BASELINES
from . import evaluate, model_spec
from .folder import Job, Quiet, exit_code, method_names, rule_names, run, uses_layer
from .model_spec import Preprocessing, build, check
from .results import KINDS

METHOD_HELP = {
    "guided": "guided backprop: the input gradient, each ReLU passing back only positive gradient where its "
              "input was positive",
    "deconvnet": "deconvnet: the input gradient, each ReLU passing back the positive part of the gradient",
    "gradient": "the plain input gradient (saliency); nothing is swapped",
    "gradcam": "Grad-CAM at --layer only: the positive part of the layer's activations weighted by their mean "
               "gradient",
    "guided-gradcam": "Guided Grad-CAM, guided backprop times Grad-CAM, shown with both factors (as all)",
    "all": "guided backprop, Grad-CAM and Guided Grad-CAM (the default)",
}

EXPLAIN_EPILOG = """\
methods (--method):
{methods}

CAMs (--cam), each from the captures of the one pass, titled in the figures by its classic name:
{cams}

outputs:
  For each input, OUT/NAME.npz (the maps, the input as fed, logits, target; with --cam gradcam++,layercam also
  cams.gradcam++ and cams.layercam at input size, cams_raw.* at the layer's) and OUT/NAME.png (the figure),
  where NAME is the input's path relative to the folder holding all inputs, extension kept:
  photos/sub/cat.jpg gives OUT/sub/cat.jpg.npz and OUT/sub/cat.jpg.png. Every panel in a figure is an array
  in its .npz. Both files record the settings that made them, and OUT/index.jsonl has one JSON line per input:
  input, outputs, target, score, top-5 classes, the Grad-CAM peak, the settings, and an error if any.
  --out must be a folder of its own (not an input folder, nor one holding inputs); results folders are never
  searched for inputs, nor are links to folders. A name too long for the file system, whose result would
  be a folder other results go in, or that differs from another only by case or Unicode normalisation, gets a
  result name of its own (NAME~HASH.ext; index.jsonl maps it). An input that cannot be explained (a link to
  nothing, a named pipe, an empty or unreadable image, a result that cannot be written) gets an index line
  with the reason; the rest of the run goes on. One run per --out at a time: a second is refused, naming the
  first's pid.

reruns:
  Inputs whose results were made with the same settings are skipped, so an interrupted run is finished by
  running the same command again. If results in OUT were made with other settings (model, weights, layer,
  method, CAMs, smoothing, target, size, normalisation, labels, picture options, library version), the run
  refuses to start;
  --force replaces them. A file in OUT that guided-swap did not write is never replaced.

several processes or machines (torch.distributed):
  torchrun --nproc-per-node=N -m guided_swap explain IN --out OUT ...
  shares the inputs among N processes, one device each (cuda:LOCAL_RANK with CUDA, else the CPU). For
  several machines sharing a file system, run on each:
  torchrun --nnodes=2 --nproc-per-node=N --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 --rdzv-id=JOB \\
      -m guided_swap explain IN --out OUT ...
"""


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line."""

    def error(self, message):
        self.exit(2, f"guided-swap: error: {message} (see {self.prog} --help)\n")


def _whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a whole number, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be {least} or more, got {value}")
    return value


def _positive(text: str) -> int:
    return _whole_number(text, 1)


def _count(text: str) -> int:
    return _whole_number(text, 0)


def _floats(text: str) -> tuple:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated numbers like 0.485,0.456,0.406; got {text!r}") \
            from None
    return values


def _save(text: str) -> tuple:
    kinds = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    wrong = [k for k in kinds if k not in KINDS]
    if wrong or not kinds:
        raise argparse.ArgumentTypeError(f"takes png, npz or png,npz; got {text!r}")
    return kinds


def _cams(text: str) -> tuple:
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    wrong = [name for name in names if name not in cam_methods()]
    if wrong or not names:
        what = f"unknown CAM {', '.join(map(repr, wrong))}" if wrong else f"no CAM named in {text!r}"
        raise argparse.ArgumentTypeError(f"{what}; the CAMs are {','.join(cam_methods())}")
    return names


def _noise(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a number such as 0.15, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of 0 or more, got {text}")
    return value


def _cmap(text: str) -> str:
    if text not in colormaps:
        close = difflib.get_close_matches(text, list(colormaps), n=3)
        raise argparse.ArgumentTypeError(f"unknown colour map {text!r}" + (f" (did you mean {', '.join(close)}?)"
                                                                          if close else ""))
    return text


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"takes auto, cpu, cuda, cuda:N or mps; got {text!r}")
    return text


def _method_help(name: str) -> str:
    if name in METHOD_HELP:
        return METHOD_HELP[name]
    doc = (type(get_rule(name)).__doc__ or "").strip().split("\n")[0]
    return "the input gradient under the registered rule " + name + (f": {doc}" if doc else "")


def _method_epilog() -> str:
    return "\n".join(textwrap.fill(f"{name:15s} {_method_help(name)}", 110, initial_indent="  ",
                                   subsequent_indent=" " * 18) for name in method_names())


def _cam_epilog() -> str:
    return "\n".join(f"  {name:15s} {CAM_TITLES.get(name, 'registered with guided_swap.register_cam')}"
                     for name in _cam_names())


def read_labels(path: str) -> List[str]:
    """Class names, one per line (:func:`guided_swap.media.labels.read_labels`); a bad file is a usage error."""
    try:
        return label_files.read_labels(path)
    except (OSError, ValueError) as error:
        raise CommandError(f"--labels: {error}") from None


def parse_target(text: str, labels: Optional[Sequence[str]]):
    """``auto`` (None), a class index, or a class name from the labels."""
    if text == "auto":
        return None
    if text.lstrip("-").isdigit():
        if int(text) < 0:
            raise CommandError(f"--target must be a class index of 0 or more, a class name, or auto; got {text}")
        return int(text)
    if labels is None:
        raise CommandError(f"--target {text!r} is not a class index; a class name needs --labels FILE (or weights "
                           "that come with class names)")
    if text in labels:
        return list(labels).index(text)
    close = difflib.get_close_matches(text, labels, n=3)
    raise CommandError(f"--target {text!r} is not one of the class names" +
                       (f" (did you mean {', '.join(close)}?)" if close else ""))


def _preprocessing(args, base):
    crop = args.size or base.crop
    resize = args.resize or (base.resize if args.size is None else max(crop, round(crop * base.resize / base.crop)))
    mean, std = args.mean or base.mean, args.std or base.std
    if any(s <= 0 for s in std):
        raise CommandError(f"--std values must be positive, got {','.join(map(str, std))}")
    if len(mean) != len(std):
        raise CommandError(f"--mean has {len(mean)} value(s) and --std {len(std)}; give one per channel, or one")
    source = "--mean/--std" if args.mean or args.std else base.source
    return Preprocessing(resize, crop, tuple(mean), tuple(std), source)


def make_job(args):
    """The run the arguments describe; every usage error is raised here, before a model is built."""
    if args.layer is not None and not uses_layer(args.method):
        raise CommandError(f"--layer is for the Grad-CAM methods (gradcam, guided-gradcam, all); --method "
                           f"{args.method} captures no layer")
    if args.cam and not uses_layer(args.method):
        raise CommandError(f"--cam is for the Grad-CAM methods (gradcam, guided-gradcam, all): the CAMs are made at "
                           f"the captured layer, and --method {args.method} captures none")
    if args.noise is not None and args.smooth is None:
        raise CommandError("--noise applies with --smooth N (the number of noisy copies per input)")
    for path in args.inputs:
        if not os.path.exists(path):
            raise CommandError(f"no such file or folder: {path!r}")
    source = model_spec.check(args.model, args.weights, args.trust_weights)
    labels = read_labels(args.labels) if args.labels else source.categories
    return Job(inputs=args.inputs, out=args.out, source=source, method=args.method, layer=args.layer or "auto",
               target=parse_target(args.target, labels), preprocessing=_preprocessing(args, source.preprocessing),
               labels=labels, save=args.save, cmap=args.cmap, scale=args.scale, batch_size=args.batch_size,
               workers=args.workers, writers=args.writers, force=args.force, device=args.device, report=args.report,
               cams=args.cam or (), smooth=args.smooth, noise=args.noise)


def cmd_explain(args) -> int:
    return run(make_job(args))


def cmd_demo(args) -> int:
    print(run_demo(args.out))
    return 0


def _model(model: Optional[str], weights: Optional[str], trust: bool = False):
    return build(check(model, weights, trust))


def cmd_layers(args) -> int:
    names = layer_names(_model(args.model, args.weights, args.trust_weights))
    print("modules (capture what the module returns):")
    print("\n".join("  " + name for name in names["modules"]))
    print("graph nodes (torchvision naming):")
    print("\n".join("  " + name for name in names["nodes"]))
    return 0


def cmd_export(args) -> int:
    try:
        shape = tuple(int(part) for part in args.shape.split(","))
    except ValueError:
        raise CommandError(f"--shape takes comma-separated sizes like 2,3,224,224; got {args.shape!r}") from None
    model = _model(args.model, args.weights, args.trust_weights)
    layer = None if args.layer == "none" else args.layer
    explainer = convert(model, layer=layer, rule=args.rule, example_input=torch.zeros((1,) + shape[1:]))
    export(explainer, torch.randn(shape), args.out)
    print(args.out)
    return 0


def _names(choices: Sequence[str]):
    def parse(text: str) -> tuple:
        names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
        if not names or any(name not in choices for name in names):
            raise argparse.ArgumentTypeError(f"takes names of {','.join(choices)}; got {text!r}")
        return names
    return parse


def cmd_evaluate(args) -> int:
    options = evaluate.Options(metrics=args.metrics, percentiles=args.percentiles, noise=args.noise, seed=args.seed,
                               steps=args.steps, deletion_baseline=args.deletion_baseline,
                               insertion_baseline=args.insertion_baseline, batch_size=args.batch_size,
                               chunk=args.chunk)
    if any(not 0 < p < 100 for p in options.percentiles):
        raise CommandError(f"--percentiles takes numbers between 0 and 100, got {args.percentiles}")
    source = model_spec.check(args.model, args.weights, getattr(args, "trust_weights", False))
    return evaluate.run(args.results, source, options, out=args.out, force=args.force, device=args.device)


def _evaluate_parser(sub) -> None:
    evaluating = sub.add_parser("evaluate", help="faithfulness metrics of the maps in a results folder",
                              description="ROAD, confidence change, deletion and insertion of every map the .npz "
                                          "results of guided-swap explain hold, for the target each explained; "
                                          "one JSON per result, tables per map and a plot of the curves. Reruns "
                                          "skip the results already evaluated with the same settings (see "
                                          "docs/metrics.md).")
    evaluating.add_argument("results", metavar="RESULTS_DIR", help="a folder guided-swap explain wrote")
    evaluating.add_argument("--model", help="the model the results were made with (as explain's --model)")
    evaluating.add_argument("--weights", help="its weights (as explain's --weights)")
    evaluating.add_argument("--metrics", type=_names(evaluate.METRICS), default=evaluate.METRICS, metavar="NAME[,NAME]",
                          help="any of " + ",".join(evaluate.METRICS) + " (default: all)")
    evaluating.add_argument("--percentiles", type=_floats, default=(10, 20, 30, 40, 50, 60, 70, 80, 90),
                          help="ROAD's percentiles (default 10,20,...,90)")
    evaluating.add_argument("--noise", type=_noise, default=0.01, help="ROAD's imputation noise (default 0.01)")
    evaluating.add_argument("--seed", type=_count, default=0, help="seed of ROAD's noise, per result (default 0)")
    evaluating.add_argument("--steps", type=_positive, default=32, help="points of the deletion and insertion "
                                                                      "curves, less one (default 32)")
    evaluating.add_argument("--deletion-baseline", choices=BASELINES, default="zeros",
                          help="what deleted positions become (default zeros)")
    evaluating.add_argument("--insertion-baseline", choices=BASELINES, default="blur",
                          help="what insertion starts from (default blur)")
    evaluating.add_argument("--batch-size", type=_positive, default=8, help="results per batch (default 8)")
    evaluating.add_argument("--chunk", type=_positive, default=32, help="perturbed copies per forward (default 32)")
    evaluating.add_argument("--device", type=_device, default="auto", help="auto (cuda if present), cpu, cuda[:N]")
    evaluating.add_argument("--out", help="where the evaluation goes (default RESULTS_DIR/evaluation)")
    evaluating.add_argument("--force", action="store_true", help="evaluate every result again")
    _trust_argument(evaluating)


def cmd_bench(rest: List[str]) -> int:
    return bench_main(rest)


def _explain_parser(sub) -> None:
    explain = sub.add_parser("explain", help="explain images or folders of images",
                             description="Explain images or folders of images: one .npz and one .png per input.",
                             epilog=EXPLAIN_EPILOG.format(methods=_method_epilog(), cams=_cam_epilog()),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    explain.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    explain.add_argument("--model", help="a torchvision name (resnet50), package.module:factory, or demo; leave out "
                                         "when --weights holds a whole pickled model (with --trust-weights)")
    explain.add_argument("--weights", help="checkpoint file (a state dict, possibly wrapped or with a module. prefix, "
                                           "a .safetensors file, or a whole pickled model), or a torchvision weights "
                                           "name such as DEFAULT or IMAGENET1K_V1; without it a torchvision model has "
                                           "random weights (seed 0)")
    _trust_argument(explain)
    explain.add_argument("--method", default="all", choices=method_names(), help="what to compute (see below)")
    explain.add_argument("--cam", type=_cams, metavar="NAME[,NAME]",
                         help="for the Grad-CAM methods: more CAMs from the same pass, saved as cams.NAME (input size) "
                              "and cams_raw.NAME (the layer's size) and drawn, titled by their classic names; "
                              "NAME is any of " + ", ".join(_cam_names()))
    explain.add_argument("--smooth", type=_positive, metavar="N",
                         help="SmoothGrad: every map is the mean over N noisy copies of each input (noise seeded, "
                              "the same for every run)")
    explain.add_argument("--noise", type=_noise, metavar="S",
                         help="with --smooth: the noise's standard deviation as a fraction of each input's value "
                              "range (default 0.15)")
    explain.add_argument("--layer", help="for the Grad-CAM methods: a module or graph node name, or auto (default: "
                                         "the last convolutional map); see guided-swap layers MODEL")
    explain.add_argument("--target", default="auto", help="class index, class name (with labels), or auto: each "
                                                          "image's top class")
    explain.add_argument("--labels", metavar="FILE", help="class names, one per line (default: those that come with "
                                                          "the weights, if any)")
    explain.add_argument("--size", type=_positive, help="centre-crop size (default: the model's, else 224)")
    explain.add_argument("--resize", type=_positive, help="shorter side before the crop (default: the model's, "
                                                          "else 256, scaled with --size)")
    explain.add_argument("--mean", type=_floats, help="normalisation mean per channel (default: the model's, else "
                                                      "ImageNet's 0.485,0.456,0.406)")
    explain.add_argument("--std", type=_floats, help="normalisation std per channel (default: the model's, else "
                                                     "ImageNet's 0.229,0.224,0.225)")
    explain.add_argument("--save", type=_save, default=("npz", "png"), metavar="KINDS",
                         help="what to write per input: png, npz or png,npz (default)")
    explain.add_argument("--cmap", type=_cmap, default="jet", help="matplotlib colour map of the Grad-CAM overlay "
                                                                   "(default jet)")
    explain.add_argument("--scale", choices=("shared", "per-image"), default="shared",
                         help="colour scale of the figures: shared (default), one range per map kind over every "
                              "input of the run, so the figures of a folder compare (drawn after all are "
                              "explained); per-image, each map stretched to its own range (drawn at once)")
    explain.add_argument("--batch-size", type=_positive, default=8, help="images per forward/backward (default 8)")
    explain.add_argument("--workers", type=_count, default=2, help="DataLoader processes decoding images (default 2; "
                                                                   "0 decodes in the main process)")
    explain.add_argument("--writers", type=_count, default=2, help="processes drawing and writing results "
                                                                   "(default 2; 0 writes in the main process)")
    explain.add_argument("--device", type=_device, default="auto",
                         help="auto (cuda if present), cpu, cuda or cuda:N; under torchrun each process takes "
                              "cuda:LOCAL_RANK")
    explain.add_argument("--out", default="guided_swap_maps", help="results folder (default guided_swap_maps)")
    explain.add_argument("--force", action="store_true", help="replace results made with other settings")
    explain.add_argument("--report", action="store_true", help="print the whole conversion report")


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="guided-swap", description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    sub = top.add_subparsers(dest="command", required=True)
    _explain_parser(sub)
    _evaluate_parser(sub)

    demo = sub.add_parser("demo", help="the main job, offline, on the bundled face/non-face CNN")
    demo.add_argument("--out", default="guided_swap_demo")

    layers = sub.add_parser("layers", help="list the names --layer accepts")
    layers.add_argument("model", nargs="?", help="as explain's --model")
    layers.add_argument("--weights", help="as explain's --weights")
    _trust_argument(layers)

    export = sub.add_parser("export", help="export a .pt2 program (forward + rule backward + CAM maths)")
    export.add_argument("--model", help="as explain's --model")
    export.add_argument("--weights", help="as explain's --weights")
    _trust_argument(export)
    export.add_argument("--layer", default="auto", help="module or node name, auto, or none")
    export.add_argument("--rule", default="guided", choices=_rules())
    export.add_argument("--shape", default="2,3,224,224", help="example input shape; the batch stays dynamic")
    export.add_argument("--out", required=True)

    sub.add_parser("bench", help="the side-by-side benchmark (options: guided-swap bench --help)", add_help=False)
    return top


def _trust_argument(parser) -> None:
    parser.add_argument("--trust-weights", action="store_true",
                        help="allow unpickling the --weights file (a whole pickled model, or a checkpoint holding "
                             "Python objects besides tensors); unpickling runs code from the file, so only for files "
                             "you trust. Without it a checkpoint is read with torch.load(weights_only=True) only")


def _cam_names() -> List[str]:
    return list(cam_methods())


def _rules() -> List[str]:
    return rule_names()


def _report_error(error: BaseException, usage: bool) -> None:
    rank = int(os.environ.get("RANK", "0"))
    if rank and usage:
        return  # every rank makes the same usage error; rank 0 says it
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    if not usage and not isinstance(error, (GuidedSwapError, OSError)):
        message = f"{type(error).__name__}: {message} (--traceback shows where)"
    print(f"guided-swap: {f'[rank {rank}] ' if rank else ''}error: {message}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "bench" in argv[:2]:
        return cmd_bench(argv[argv.index("bench") + 1:])
    args = parser().parse_args(argv)
    with warnings_in_one_line():
        return _command(args)


def _command(args) -> int:
    commands = {"explain": cmd_explain, "demo": cmd_demo, "layers": cmd_layers, "export": cmd_export,
                "evaluate": cmd_evaluate}
    try:
        return commands[args.command](args)
    except Quiet as quiet:
        return quiet.code
    except KeyboardInterrupt:
        if args.traceback:
            raise
        print("guided-swap: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the one place every error becomes one line
        if args.traceback:
            raise
        code = exit_code(error)
        _report_error(error, code == 2)
        return code


if __name__ == "__main__":
    sys.exit(main())
