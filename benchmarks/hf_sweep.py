"""Sweep Hugging Face transformers' image classifiers and MONAI's DenseNet/ResNet/SEResNet: defaults, exactly.

    nice python benchmarks/hf_sweep.py                        # every model; resumes where it stopped
    python benchmarks/hf_sweep.py --models transformers:SwinForImageClassification --redo
    python benchmarks/hf_sweep.py --summary-only              # rewrite the summary from the progress log

The models:

- every ``*ForImageClassification*`` class ``transformers`` exports, built from its config class's defaults
  (the reference architecture; random weights, no download: ``HF_HUB_OFFLINE=1``) with ``num_labels=10`` and
  ``image_size`` capped at 224 where the config has one; an input of ``num_channels`` channels at that size;
- MONAI's DenseNet121/169/201/264, ResNet10-200, SEResNet50/101/152, SEResNext50/101 and SENet154 in 2D
  (1 channel, 224 px) and 3D (1 channel, 64^3), 10 classes.

Each is checked the way ``benchmarks/timm_sweep.py`` checks timm (random weights, eval mode, BatchNorm
statistics randomised, batch 1): ``gs.convert(model)`` with default arguments, then ``explain(x)``;
``explain``'s logits (read from the output's ``logits`` entry by default for a ModelOutput) equal the model's
own bit for bit, and ``ex(x)``'s under no_grad; swapped call sites and the rule's op calls counted at run time
equal the fx-free reference's run-time rectifier count (guided_swap.checks.reference); the guided gradient
equals the reference's within --rtol of its largest entry and is not all zero; the ``auto`` map is larger than
1x1 and receives a gradient. Unlike the timm sweep, models without any ReLU are checked too (their guided
gradient is the plain gradient, against the reference's).

Each model runs in a worker process restarted after a crash or a timeout; finished rows are appended to
benchmarks/results/hf_sweep.progress.jsonl (a rerun resumes) and summarised in benchmarks/results/hf_sweep.{json,md}.
"""
import argparse
import datetime
import gc
import json
import math
import os
import platform
import select
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from timm_sweep import (append_progress, calls_through_the_rule, first_line, library_commit,  # noqa: E402
                        load_progress, photograph, randomise_batchnorm)

#: version of the checks a row passed (the timm sweep's 4, plus the explained output recorded)
CHECKS = 1
MONAI_MODELS = ("DenseNet121", "DenseNet169", "DenseNet201", "DenseNet264", "resnet10", "resnet18", "resnet34",
                "resnet50", "resnet101", "resnet152", "resnet200", "SEResNet50", "SEResNet101", "SEResNet152",
                "SEResNext50", "SEResNext101", "SENet154")
#: classes that are not an image classifier taking one image tensor, and why (not built)
NOT_IMAGE_IN = {
    "AutoModelForImageClassification": "a factory of the other classes, not a model class",
    "ImageGPTForImageClassification": "takes input_ids (colour-cluster tokens), not an image tensor",
    "ShieldGemma2ForImageClassification": "a Gemma 3 vision-language model (4B parameters by default) that takes "
                                          "text prompts with the image",
    "Siglip2ForImageClassification": "takes patchified pixel_values with pixel_attention_mask and spatial_shapes, "
                                     "not an image tensor",
}


def paths(results: str) -> dict:
    return {"progress": os.path.join(results, "hf_sweep.progress.jsonl"),
            "json": os.path.join(results, "hf_sweep.json"), "md": os.path.join(results, "hf_sweep.md")}


def all_names() -> list:
    import transformers

    hf = sorted(n for n in dir(transformers) if "ForImageClassification" in n)
    monai = [f"monai:{name}:{dims}d" for dims in (2, 3) for name in MONAI_MODELS]
    return [f"transformers:{n}" for n in hf] + monai


# --- building -------------------------------------------------------------------------------------------

#: config changes for classes whose default config does not build or is over --max-params, and why
SMALL_CONFIGS = {
    "Perceiver": ({"num_cross_attention_heads": 1, "num_latents": 64, "d_latents": 256,
                   "num_self_attends_per_block": 2, "image_size": 64},
                  "the default config does not build (qk_channels 322 / 261 not divisible by its 8 cross-attention "
                  "heads) or has 272M parameters (learned positions at 224 px): 1 cross-attention head, 64 latents "
                  "of 256, 2 self-attention layers, 64 px"),
}


def small_config(class_name: str):
    """The (changes, why) of :data:`SMALL_CONFIGS` for a class, or ({}, None)."""
    return next((v for k, v in SMALL_CONFIGS.items() if class_name.startswith(k)), ({}, None))


def hf_config(cls):
    """The config class's defaults, 10 labels, ``image_size`` at most 224 (also in a vision sub-config), and
    the changes of :data:`SMALL_CONFIGS`."""
    changes, _ = small_config(cls.__name__)
    config = cls.config_class(**changes)
    config.num_labels = 10
    for part in (config, getattr(config, "vision_config", None)):
        size = getattr(part, "image_size", None) if part is not None else None
        if isinstance(size, int) and size > 224:
            part.image_size = 224
    return config


def hf_input(config):
    part = getattr(config, "vision_config", None) or config
    size = getattr(part, "image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    channels = getattr(part, "num_channels", 3)
    return photograph(size, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if channels == 3 else \
        __import__("torch").randn(1, channels, size, size)


def monai_model(name: str, dims: int):
    import monai.networks.nets as nets

    factory = getattr(nets, name)
    if name.startswith("DenseNet"):
        return factory(spatial_dims=dims, in_channels=1, out_channels=10)
    if name.startswith("resnet"):
        return factory(spatial_dims=dims, n_input_channels=1, num_classes=10)
    return factory(spatial_dims=dims, in_channels=1, num_classes=10)


def build(name: str):
    """(model in eval mode, input, parameter count in millions) for a sweep name."""
    import torch

    torch.manual_seed(0)
    library, rest = name.split(":", 1)
    if library == "transformers":
        import transformers

        cls = getattr(transformers, rest)
        config = hf_config(cls)
        model, x = cls(config), hf_input(config)
    else:
        model_name, dims = rest.split(":")
        dims = int(dims[0])
        model = monai_model(model_name, dims)
        size = (224, 224) if dims == 2 else (64, 64, 64)
        x = photograph(224, 1, (0.45,), (0.225,)) if dims == 2 else torch.randn((1, 1) + size)
    randomise_batchnorm(model)
    return model.eval(), x


def meta_params(name: str):
    """Parameters in millions, counted on the meta device (nothing allocated), or None."""
    import torch

    try:
        with torch.device("meta"):
            model, _ = build_unseeded(name)
        return round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    except Exception:
        return None


def build_unseeded(name: str):
    library, rest = name.split(":", 1)
    if library == "transformers":
        import transformers

        cls = getattr(transformers, rest)
        return cls(hf_config(cls)), None
    model_name, dims = rest.split(":")
    return monai_model(model_name, int(dims[0])), None


# --- one model ------------------------------------------------------------------------------------------

def logits_of(outputs):
    import torch

    return outputs if isinstance(outputs, torch.Tensor) else outputs["logits"]


def check_model(name: str, max_params: float, rtol: float) -> dict:
    import torch

    import guided_swap as gs
    from guided_swap.checks import reference

    row = {"model": name, "checks": CHECKS, "commit": library_commit()}
    if small_config(name.split(":")[1])[1]:
        row["config"] = small_config(name.split(":")[1])[1]
    if name.split(":")[1] in NOT_IMAGE_IN:
        return dict(row, status="skipped", reason=NOT_IMAGE_IN[name.split(":")[1]])
    started = time.perf_counter()
    row["params_m"] = meta_params(name)
    if row["params_m"] is not None and row["params_m"] * 1e6 > max_params:
        return dict(row, status="skipped", reason=f"{row['params_m']:.0f}M parameters, over {max_params / 1e6:.0f}M")
    try:
        model, x = build(name)
    except Exception as error:
        return dict(row, status="build failed", reason=f"{type(error).__name__}: {first_line(error)}")
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    row["input"] = list(x.shape)
    try:
        count = reference.count_relu_calls(model, x)
        with torch.no_grad():
            logits = logits_of(model(x))
    except Exception as error:
        return dict(row, status="does not run", reason=f"{type(error).__name__}: {first_line(error)}")
    row["relu_calls"] = count
    target = logits.argmax(dim=1)
    try:
        ex = gs.convert(model)  # default arguments: auto on the first input, fx falling back to export
        e = ex.explain(x, target)
    except Exception as error:
        return dict(row, status="FAIL", reason=f"convert/explain: {type(error).__name__}: {first_line(error)}",
                    where=traceback.format_exc().splitlines()[-3][:300])
    row.update(describe(ex))
    with torch.no_grad():
        forwarded, row["swapped_calls"] = calls_through_the_rule(ex, x)
        forward_identical = bool(torch.equal(logits_of(forwarded), logits))
    with_grad = logits_of(model(x.clone().requires_grad_(True))).detach()
    row["logits_identical"] = forward_identical and bool(torch.equal(e.logits, with_grad))
    row.update(gradient_check(model, x, target, e, "logits" if ex.output == "logits" else None))
    row.update(map_check(e))
    row["seconds"] = round(time.perf_counter() - started, 1)
    problems = problems_of(row, count, rtol)
    return dict(row, status="FAIL" if problems else "ok", reason="; ".join(problems))


def describe(ex) -> dict:
    report = ex.report
    return {"capture": report.capture, "output": ex.output, "output_by_default": report.output_by_default,
            "swapped": len(ex.swapped), "left_alone": sorted({kind for _, kind in report.left_alone}),
            "auto_reason": report.layer_reasons.get("auto"), "auto_layer": report.layers.get("auto"),
            "summary": report.summary()}


def gradient_check(model, x, target, e, output) -> dict:
    import torch

    from guided_swap.checks import reference

    expected = reference.input_gradient(model, x, target, output=output)
    finite = bool(torch.isfinite(expected).all())
    scale = float(expected.abs().max()) if finite else math.nan
    row = {"gradient_rel_error": float((e.gradient - expected).abs().max()) / scale if scale > 0 else None,
           "gradient_nonzero": round(float((expected != 0).float().mean()), 4)}
    if not finite:
        row["reference_not_finite"] = round(float((~torch.isfinite(expected)).float().mean()), 4)
    return row


def map_check(e) -> dict:
    try:
        return {"auto_map": list(e.cam_raw.shape[1:]), "cam_nonzero": round(float((e.cam_raw != 0).float().mean()), 4),
                "map_grad_nonzero": round(float((e.layers["auto"].feature_grad != 0).float().mean()), 4)}
    except Exception as error:
        return {"auto_map": [], "cam_error": f"{type(error).__name__}: {first_line(error)}"}


def problems_of(row: dict, count: int, rtol: float) -> list:
    problems = []
    if not row["logits_identical"]:
        problems.append("logits differ")
    if row["output"] is not None and not row["output_by_default"]:
        problems.append(f"output {row['output']!r} was not read by default")
    if row["swapped"] != count:
        problems.append(f"swapped {row['swapped']} call sites for {count} run-time calls")
    if row["swapped_calls"] != count:
        problems.append(f"{row['swapped_calls']} of {count} run-time calls went through the rule")
    if "reference_not_finite" in row:
        problems.append(f"the reference's guided gradient is not finite in {row['reference_not_finite']:.0%} of its entries")
    elif row["gradient_rel_error"] is None or row["gradient_nonzero"] < 0.01:
        problems.append("reference gradient all zero")
    elif row["gradient_rel_error"] > rtol:
        problems.append(f"gradient error {row['gradient_rel_error']:.1e}")
    if "cam_error" in row:
        problems.append(f"CAM: {row['cam_error']}")
    elif math.prod(row["auto_map"]) <= 1:
        problems.append(f"auto map {row['auto_map']}")
    elif row["map_grad_nonzero"] == 0:
        problems.append(f"the auto map ({row['auto_layer']}) receives no gradient")
    return problems


def worker(names, max_params, rtol, threads) -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    for name in names:
        print("START " + name, flush=True)
        try:
            row = check_model(name, max_params, rtol)
        except Exception as error:  # a bug in a check must not stop the sweep
            row = {"model": name, "status": "FAIL", "reason": f"{type(error).__name__}: {first_line(error)}",
                   "where": traceback.format_exc().splitlines()[-3][:300]}
        print("DONE " + json.dumps(row), flush=True)
        gc.collect()


# --- the supervisor -----------------------------------------------------------------------------------

def run_worker(names, args, record) -> list:
    """Run a worker on ``names``; the names it did not reach (after a crash or a timeout) come back."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--threads", str(args.threads),
               "--max-params", str(args.max_params), "--rtol", str(args.rtol), "--models", *names]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               start_new_session=True)
    current, started, remaining = None, time.monotonic(), list(names)
    try:
        while True:
            ready, _, _ = select.select([process.stdout], [], [], 5.0)
            line = process.stdout.readline() if ready else None
            if ready and not line:
                break
            if line and line.startswith("START "):
                current, started = line[6:].strip(), time.monotonic()
            elif line and line.startswith("DONE "):
                row = json.loads(line[5:])
                record(row)
                remaining.remove(row["model"])
                current = None
            if current is not None and time.monotonic() - started > args.timeout:
                os.killpg(process.pid, 9)
                process.wait()
                record({"model": current, "status": "timeout", "reason": f"over {args.timeout:.0f} s (2 CPU cores)"})
                remaining.remove(current)
                return remaining
        code = process.wait()
        if current is not None:
            record({"model": current, "status": "crashed", "reason": f"worker exit code {code}"})
            remaining.remove(current)
        return remaining
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
            process.wait()


UNFINISHED = ("FAIL", "timeout", "crashed")


def supervise(args) -> None:
    names = args.models or all_names()
    done = load_progress(paths(args.results)["progress"])
    pending = list(names) if args.redo and args.models else \
        [n for n in names if n not in done or done[n]["status"] in UNFINISHED]
    print(f"{len(names)} models, {len(pending)} to check", flush=True)

    def record(row):
        append_progress(paths(args.results)["progress"], row)
        done[row["model"]] = row
        write_summary(done, args)
        print(f"{row['model']:60s} {row['status']:12s} {row.get('reason', '')}", flush=True)

    while pending:
        batch, pending = pending[:args.restart_every], pending[args.restart_every:]
        while batch:
            batch = run_worker(batch, args, record)
    write_summary(done, args)


# --- the summary ---------------------------------------------------------------------------------------

ORDER = ("ok", "FAIL", "timeout", "crashed", "does not run", "build failed", "skipped")


def write_summary(rows: dict, args) -> None:
    import monai
    import torch
    import transformers

    from guided_swap._files import atomic_write

    listed = all_names()
    rows = {name: rows[name] for name in listed if name in rows}
    settings = {"date": datetime.date.today().isoformat(), "transformers": transformers.__version__,
                "monai": monai.__version__, "torch": torch.__version__, "python": platform.python_version(),
                "threads": args.threads, "max_params": args.max_params, "rtol": args.rtol, "timeout_s": args.timeout,
                "listed": len(listed), "listed_transformers": sum(_family(n) == "transformers" for n in listed)}
    summary = {"settings": settings, "swept": len(rows), "models": [rows[n] for n in listed if n in rows],
               "counts": {s: sum(r["status"] == s for r in rows.values()) for s in ORDER}}
    with atomic_write(paths(args.results)["json"]) as path:
        with open(path, "w") as handle:
            json.dump(summary, handle, indent=1)
    with atomic_write(paths(args.results)["md"]) as path:
        with open(path, "w") as handle:
            handle.write(markdown(summary))


def _family(name: str) -> str:
    return "MONAI" if name.startswith("monai:") else "transformers"


def _counts_line(models, family: str, listed: int) -> str:
    rows = [r for r in models if _family(r["model"]) == family]
    checked = [r for r in rows if r["status"] in ("ok",) + UNFINISHED]
    ok = [r for r in checked if r["status"] == "ok"]
    relu = [r for r in checked if r.get("relu_calls")]
    paths_used = {}
    for r in ok:
        key = r.get("capture", "").split(" (")[0]
        paths_used[key] = paths_used.get(key, 0) + 1
    via = ", ".join(f"{n} through {p}" for p, n in sorted(paths_used.items()))
    return (f"- **{family}**: {listed} listed, {len(rows)} swept, {len(checked)} checked, **{len(ok)} exact** "
            f"({via}); {sum(r['status'] == 'ok' for r in relu)} of the {len(relu)} checked models that call ReLU/ReLU6 "
            f"exact; {len(checked) - len(ok)} not exact; {len(rows) - len(checked)} skipped or not run.")


def markdown(summary: dict) -> str:
    s, models = summary["settings"], summary["models"]
    complete = summary["swept"] == s["listed"]
    lines = ["# Hugging Face transformers and MONAI sweep: defaults, checked exactly", "",
             f"{s['date']}; transformers {s['transformers']}, MONAI {s['monai']}, torch {s['torch']}, Python "
             f"{s['python']}; CPU, {s['threads']} thread(s). Random weights (seed 0, no download), BatchNorm "
             "statistics randomised, eval mode, batch 1. transformers: every `*ForImageClassification*` class, from its "
             "config class's defaults with 10 labels and `image_size` at most 224, on a photograph at that size. "
             "MONAI: 1 channel, 10 classes, a photograph at 224 px (2D) or a random 64^3 volume (3D). "
             "`gs.convert(model)`: default arguments (layer='auto', rule='guided', capture='auto', no output=, no "
             "example_input).", "",
             "Checks (those of benchmarks/timm_sweep.py): `explain`'s logits equal the model's own bit for bit under "
             "autograd and `ex(x)`'s under no_grad; a ModelOutput's `logits` entry is the one explained, read by "
             "default; swapped call sites and the rule's op calls counted at run time equal the fx-free reference's "
             f"run-time ReLU/ReLU6 count; the guided gradient equals the reference's within {s['rtol']:g} of its "
             "largest entry and is not all zero; the `auto` map is larger than 1x1 and receives a gradient. Models "
             "without a ReLU are checked too (guided = plain gradient, against the reference's).", "",
             f"**{'Complete' if complete else 'PARTIAL'}**: {summary['swept']} of {s['listed']} names swept.", "",
             _counts_line(models, "transformers", s["listed_transformers"]),
             _counts_line(models, "MONAI", s["listed"] - s["listed_transformers"]), ""]
    failed = [r for r in models if r["status"] in UNFINISHED]
    lines += [f"## Not exact ({len(failed)})", ""]
    lines += [f"- `{r['model']}` ({r.get('capture', 'no capture').split(' (')[0]}): {r['status']}: {r.get('reason', '')}"
              for r in failed] or ["None."]
    skipped = [r for r in models if r["status"] in ("skipped", "does not run", "build failed")]
    lines += ["", f"## Skipped or not run ({len(skipped)})", ""]
    lines += [f"- `{r['model']}`: {r['status']}: {r.get('reason', '')}" for r in skipped] or ["None."]
    small = [r for r in models if r.get("config")]
    lines += ["", f"## Built from a smaller config than the default ({len(small)})", ""]
    lines += [f"- `{r['model']}`: {r['config']}" for r in small] or ["None."]
    lines += ["", "## Every model checked", "",
              "| model | status | capture | params (M) | input | ReLU calls | swapped sites | rule calls | "
              "gradient rel. error | explains | auto layer | auto map | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rank = {status: i for i, status in enumerate(ORDER)}
    for r in sorted(models, key=lambda r: (rank.get(r["status"], 1), r["model"])):
        if r["status"] in ("skipped", "does not run", "build failed"):
            continue
        error = r.get("gradient_rel_error")
        cells = [f"`{r['model']}`", r["status"], r.get("capture", "").split(" (")[0], r.get("params_m", ""),
                 "x".join(str(v) for v in r.get("input", [])[2:]), r.get("relu_calls", ""), r.get("swapped", ""),
                 r.get("swapped_calls", ""), "" if error is None else f"{error:.1e}",
                 "" if r.get("output") is None else r["output"] + (" (default)" if r.get("output_by_default") else ""),
                 r.get("auto_layer", ""), "x".join(str(v) for v in r.get("auto_map", [])),
                 "; ".join(str(v) for v in (r.get("reason"), "small config" if r.get("config") else None) if v)
                 .replace("|", "/")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="sweep names (default: all; see --list)")
    parser.add_argument("--list", action="store_true", help="print the sweep names")
    parser.add_argument("--max-params", type=float, default=100e6)
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per model")
    parser.add_argument("--restart-every", type=int, default=10)
    parser.add_argument("--redo", action="store_true", help="check the --models named again")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--summary-only", action="store_true")
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(all_names()))
    elif args.worker:
        worker(args.models, args.max_params, args.rtol, args.threads)
    elif args.summary_only:
        write_summary(load_progress(paths(args.results)["progress"]), args)
    else:
        supervise(args)


if __name__ == "__main__":
    main()
