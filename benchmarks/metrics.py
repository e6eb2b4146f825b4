"""gs.metrics against pytorch-grad-cam's metrics and Quantus's, side by side in one run, interleaved.

    nice -n 10 python benchmarks/metrics.py                     # the rows in benchmarks/results/metrics.md
    python benchmarks/metrics.py --rounds 1 --batch 2 --size 96  # a look in a few minutes

Rows (resnet18, random weights, seeded, BatchNorm statistics made non-trivial; ImageNet-normalised scikit-image
photographs; Grad-CAM at ``layer4`` min-max scaled, with a faint ramp so no two positions tie, as the tests do):

- ``ROAD combined``: ``gs.metrics.road(order="combined")`` against pytorch-grad-cam's ``ROADCombined`` over 9
  percentiles (the same noise: both draw from the default generator, seeded alike). ``max_rel_diff``: the
  largest difference over the largest value.
- ``imputation only``: the 18 noisy linear imputations per image (CPU), pytorch-grad-cam's ``NoisyLinearImputer``
  against ``gs.metrics.impute``, the same masks: what ROAD costs beyond the forwards (all that is left of it on a
  GPU, where the forwards are cheap).
- ``confidence change``: ``gs.metrics.confidence_change`` against ``CamMultImageConfidenceChange``.
- ``deletion``: ``gs.metrics.deletion`` against Quantus's ``PixelFlipping`` with the same baseline (each image's
  smallest value, Quantus's "black") and steps (48 of 1/48 of the positions; the size must be a multiple of 12 for
  Quantus to flip whole positions).
- Quantus's ``ROAD`` is not a row: it reads accuracy (does the top class stay), not the score change, and
  Quantus 0.6.0's fails on 3-channel images (an IndexError in its ``noisy_linear_imputation``: it ranks the map
  broadcast over the channels but imputes per position).

Quantus is optional (``pip install quantus``; its own requirements pull opencv-python, which clashes with the
opencv-python-headless pytorch-grad-cam brings: ``pip install --no-deps quantus cachetools pandas`` works too);
without it the Quantus rows are left out with a note. Each call runs in rounds that visit every method once, so a
slow spell of the machine falls on all alike; the time is the median. ``ratio``: the peer's time over ours.
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
import torch
import torchvision
from skimage import data, transform

import guided_swap as gs
from guided_swap._files import atomic_write
from guided_swap.checks import metrics
from guided_swap.checks.benchmark import interleaved
from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
from pytorch_grad_cam.metrics.road import NoisyLinearImputer, ROADCombined
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "camera", "coins", "horse", "page")


def images(batch: int, size: int) -> torch.Tensor:
    out = []
    for name in (PHOTOS * batch)[:batch]:
        image = getattr(data, name)()
        image = image if image.ndim == 3 else np.stack([image] * 3, axis=-1)
        resized = transform.resize(image[..., :3], (size, size), anti_aliasing=True)
        out.append((torch.from_numpy(resized).permute(2, 0, 1).float() - MEAN) / STD)
    return torch.stack(out)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=generator) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) * 1.5 + 0.5)
    return net.eval()


def scaled_cams(ex, x) -> tuple:
    e = ex.explain(x)
    flat = e.cam.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    ramp = torch.linspace(0, 1e-3, flat.shape[1])
    return (((flat - low) / (high - low).clamp_min(1e-12) * 0.99 + ramp) / 1.001).view_as(e.cam), e.target


def relative(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a, dtype=np.float64)), torch.as_tensor(np.asarray(b, dtype=np.float64))
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def seeded(fn: Callable, seed: int = 0) -> Callable:
    def call():
        torch.manual_seed(seed)
        return fn()
    return call


def masks(cams: torch.Tensor, percentiles) -> list:
    """The 18 keep masks per image of ROAD combined, as pytorch-grad-cam makes them."""
    out = []
    for cam in cams:
        for values in (cam, 1 - cam):
            for p in percentiles:
                out.append(values < float(np.percentile(values.numpy(), p)))
    return out


def calls(net, ex, x, cams, target, quantus) -> Dict[str, Dict[str, Callable]]:
    percentiles = list(metrics.PERCENTILES)
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in target]
    keep = masks(cams, percentiles)
    owners = [i // (2 * len(percentiles)) for i in range(len(keep))]
    rows = {
        "ROAD combined": {
            "pgc": seeded(lambda: ROADCombined(percentiles)(x, cams.numpy(), targets, net)),
            "gs": seeded(lambda: metrics.road(ex, x, cams, target, percentiles=percentiles).numpy())},
        "imputation only": {
            "pgc": seeded(lambda: torch.stack([NoisyLinearImputer()(x[o], k.float()) for o, k in zip(owners, keep)])),
            "gs": seeded(lambda: torch.cat([metrics.impute(x[o:o + 1], k[None]) for o, k in zip(owners, keep)]))},
        "confidence change": {
            "pgc": lambda: CamMultImageConfidenceChange()(x, cams.numpy(), targets, net),
            "gs": lambda: metrics.confidence_change(ex, x, cams, target).numpy()},
    }
    if quantus is not None:
        rows.update(quantus_calls(quantus, net, ex, x, cams, target))
    return rows


def quantus_calls(quantus, net, ex, x, cams, target) -> Dict[str, Dict[str, Callable]]:
    size = x.shape[-1]
    steps = 48
    per_channel = np.ascontiguousarray(np.broadcast_to(cams.numpy()[:, None], x.shape))
    flipping = quantus.PixelFlipping(features_in_step=3 * size * size // steps, perturb_baseline="black",
                                     normalise=False, abs=False, disable_warnings=True)
    black = x.flatten(1).min(dim=1).values.view(-1, 1, 1, 1)
    common = dict(model=net, x_batch=x.numpy(), y_batch=target.numpy(), a_batch=per_channel, device="cpu",
                  channel_first=True)
    return {
        "deletion (48 steps)": {
            "quantus": lambda: np.array(flipping(softmax=True, **common)),
            "gs": lambda: metrics.deletion(ex, x, cams, target, steps=steps, baseline=black).curve[:, 1:].numpy()},
    }


def measure(rows, rounds: int, warmup: int = 1) -> list:
    outputs = {}

    def keeping(name, call):
        def run():
            outputs[name] = call()
            print(f"  {name} done", flush=True)
        return run

    flat = {f"{row}|{who}": keeping(f"{row}|{who}", call) for row, pair in rows.items() for who, call in pair.items()}
    # A warm-up round first: a first call pays one-off costs (allocator growth, lazy imports, pgc's first model
    # wrapping) that are not the metric's; the last timed round's results are compared.
    times = interleaved(flat, rounds, warmup=warmup)
    out = []
    for row, pair in rows.items():
        peer = next(w for w in pair if w != "gs")
        peer_time, ours = (statistics.median(times[f"{row}|{w}"]) for w in (peer, "gs"))
        diff = relative(outputs[f"{row}|gs"], _comparable(outputs[f"{row}|{peer}"]))
        out.append({"row": row, "peer": peer, "peer_s": peer_time, "gs_s": ours, "ratio": peer_time / ours,
                    "max_rel_diff": diff})
        print(out[-1], flush=True)
    return out


def _comparable(value):
    return value.numpy() if isinstance(value, torch.Tensor) else value


def markdown(rows: list, args, note: str) -> str:
    lines = [f"# gs.metrics against pytorch-grad-cam and Quantus", "",
             f"resnet18 (random weights, seeded), batch {args.batch}, {args.size} px, Grad-CAM maps; median of "
             f"{args.rounds} interleaved round(s) after {args.warmup} untimed; {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. "
             "ratio = the peer's time over guided_swap's.", "",
             "| metric | peer | peer s | guided_swap s | ratio | max rel. diff |", "|---|---|---|---|---|---|"]
    for r in rows:
        diff = "—" if r["max_rel_diff"] is None else f"{r['max_rel_diff']:.1e}"
        lines.append(f"| {r['row']} | {r['peer']} | {r['peer_s']:.2f} | {r['gs_s']:.2f} | {r['ratio']:.2f}× | {diff} |")
    return "\n".join(lines + ["", note, ""])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=96, help="a multiple of 12 (Quantus flips whole positions)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "metrics"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    try:
        import quantus  # optional: the Quantus rows
        note = (f"Quantus {quantus.__version__}. Its ROAD is not compared: it reads accuracy, not the score change, "
                "and fails on 3-channel images (IndexError in noisy_linear_imputation).")
    except ImportError:
        quantus, note = None, "Quantus is not installed here: its rows are left out."
    net = model()
    x = images(args.batch, args.size)
    ex = gs.convert(net, layer="layer4")
    cams, target = scaled_cams(ex, x)
    rows = measure(calls(net, ex, x, cams, target, quantus), args.rounds, args.warmup)
    with atomic_write(args.out + ".json") as temporary, open(temporary, "w") as stream:
        json.dump({"settings": vars(args), "rows": rows, "note": note}, stream, indent=1)
    with atomic_write(args.out + ".md") as temporary, open(temporary, "w") as stream:
        stream.write(markdown(rows, args, note))
    print(args.out + ".md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
