"""The export capture path on timm models that torch.fx cannot trace: exact or not, model by model.

For each model (random weights with non-trivial BatchNorm statistics, eval mode): capture with
``trace_export``, swap every rectifier for the guided op, and compare with the model (logits bit for bit),
the fx-free reference's run-time rectifier count, and its guided input gradient (relative error).
The input is 64 px, or the model's default size when the model itself does not run at 64 px.

    python benchmarks/export_sweep_timm.py vgg11 tf_efficientnet_lite0 ...
"""
import argparse
import sys
import time
import warnings

import timm
import torch

from guided_swap.checks import reference
from guided_swap.capture.graph import rewrite
from guided_swap.capture.graph.export_trace import trace_export
from guided_swap.core.rules import get_rule

sys.path.insert(0, "tests")
from conftest import image_batch, randomise_batchnorm, relative_error  # noqa: E402


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return randomise_batchnorm(timm.create_model(name, pretrained=False, num_classes=10)).eval()


def runnable_input(model: torch.nn.Module) -> torch.Tensor:
    for size in (64, model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]):
        x = image_batch(size)
        try:
            with torch.no_grad():
                model(x)
            return x
        except Exception:  # the model's own size limits: try its default size
            continue
    raise RuntimeError("the model runs neither at 64 px nor at its default size")


def check(name: str) -> str:
    model = build(name)
    x = runnable_input(model)
    start = time.perf_counter()
    traced = trace_export(model, x)
    seconds = time.perf_counter() - start
    swaps, _ = rewrite.swap_rectifiers(traced.module, get_rule("guided"))
    traced.module.recompile()
    with torch.no_grad():
        logits = model(x)
        same = torch.equal(traced.module(x), logits)
    counted = reference.count_relu_calls(model, x)
    target = logits.argmax(dim=1)
    leaf = x.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(traced.module(leaf).gather(1, target.view(-1, 1)).sum(), leaf)
    expected = reference.input_gradient(model, x, target, "guided")
    nonzero = float((expected != 0).float().mean())
    return (f"{name}: {x.shape[-1]} px, export {seconds:.1f} s, logits equal {same}, swapped {len(swaps)} / "
            f"counted {counted}, guided gradient rel. error {relative_error(gradient, expected):.1e} "
            f"(non-zero {nonzero:.0%})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    args = parser.parse_args(argv)
    for name in args.models:
        try:
            print(check(name), flush=True)
        except Exception as error:  # one model's failure is a result, not the end of the sweep
            print(f"{name}: FAILED {type(error).__name__}: {str(error).splitlines()[0][:300]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
