"""Sweep every timm model that calls ReLU or ReLU6: convert with default arguments and check it exactly.

    nice python benchmarks/timm_sweep.py                   # all of timm.list_models(); resumes where it stopped
    python benchmarks/timm_sweep.py --models resnet18 dla34  # a few, e.g. to look again after a fix
    python benchmarks/timm_sweep.py --summary-only          # rewrite the summary from the progress log

For each model (random weights, pretrained=False, eval mode, BatchNorm statistics randomised away from the
identity, batch 1, a real photograph at 224 px, or at the model's own size when it takes only that one):

- the run-time ReLU/ReLU6 count from the fx-free reference (guided_swap.checks.reference); models with none are
  listed as "no ReLU" and not checked further (counted on the meta device when the forward runs there);
  models over --max-params parameters are skipped, unbuilt;
- ``gs.convert(model)`` with default arguments (``layer="auto"`` resolved on the first explained input;
  ``capture="auto"``: torch.fx, falling back to torch.export when fx cannot trace; the row records which);
- logits bit-identical to the model's (``ex(x)`` against ``model(x)`` under no_grad, ``explain``'s against
  ``model(x)`` with autograd on, as some models compute differently then); swapped call sites == run-time count; guided gradient against the
  fx-free reference within --rtol (relative to its largest entry) and not all zero; the ``auto`` map larger
  than 1x1.

Each model runs in a worker process that is restarted after a crash or a timeout; every finished model is
appended to benchmarks/results/timm_sweep.progress.jsonl, so a rerun resumes. The summary goes to
benchmarks/results/timm_sweep.{json,md}, rewritten atomically after every model.
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
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))


def paths(results: str) -> dict:
    return {"progress": os.path.join(results, "timm_sweep.progress.jsonl"),
            "json": os.path.join(results, "timm_sweep.json"), "md": os.path.join(results, "timm_sweep.md")}


# --- one model, inside the worker ---------------------------------------------------------------------

def meta_model(name: str):
    """The model built on the meta device: no memory, no initialisation, shapes only."""
    import timm
    import torch

    with torch.device("meta"):
        return timm.create_model(name, pretrained=False).eval()


def meta_relu_count(model, size: int):
    """The run-time ReLU count of a forward on meta tensors, or None if the forward needs real values.

    A forward that runs on the meta device has no value-dependent control flow, so it calls exactly the
    rectifiers a real forward calls; this spares building and running the many models without any.
    """
    import torch

    from guided_swap.checks import reference

    channels, sizes, _ = sizes_to_try(model, size)
    try:
        return reference.count_relu_calls(model, torch.zeros((1, channels) + tuple(sizes[0]), device="meta"))
    except Exception:
        return None


def build(name: str):
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    randomise_batchnorm(model)
    return model.eval()


def randomise_batchnorm(model) -> None:
    """Running statistics and affine parameters far from the identity (as tests/conftest.py does)."""
    import torch

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                shape = module.running_mean.shape
                module.running_mean.copy_(torch.rand(shape, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(shape, generator=generator) * 1.5 + 0.5)
                if module.affine:
                    module.weight.copy_(torch.rand(shape, generator=generator) * 1.5 + 0.25)
                    module.bias.copy_((torch.rand(shape, generator=generator) - 0.5) * 0.2)


def photograph(size: int, channels: int, mean, std):
    from skimage import data

    from guided_swap.media.images import load_image

    x = load_image(data.astronaut(), resize=round(size * 256 / 224), crop=size, mean=mean, std=std,
                   channels=channels)
    return x.unsqueeze(0)


def sizes_to_try(model, size: int):
    cfg = getattr(model, "pretrained_cfg", None) or {}
    default = tuple(cfg.get("input_size", (3, size, size)))
    if cfg.get("fixed_input_size", False) or default[1:] == (size, size):
        return default[0], [default[1:]], cfg
    return default[0], [(size, size), default[1:]], cfg


def relu_count_and_input(model, size: int):
    """The run-time ReLU count at the first input size the model runs at, and that input."""
    import torch

    from guided_swap.checks import reference

    channels, sizes, cfg = sizes_to_try(model, size)
    mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
    failure = None
    for hw in sizes:
        x = photograph(hw[0], channels, mean, std) if hw[0] == hw[1] else torch.randn((1, channels) + tuple(hw))
        try:
            return reference.count_relu_calls(model, x), x, None
        except Exception as error:  # the model does not run at this size
            failure = f"{type(error).__name__}: {first_line(error)}"
    return None, None, failure


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


#: the version of the checks a row passed: 3 = convert's defaults, logits under the same grad mode, the
#: rule's op counted at run time; 4 = and the auto map receives a gradient; rows of older sweeps have no
#: entry (or no ``capture``: example_input given)
CHECKS = 4


def library_commit() -> str:
    """The commit of the guided_swap checkout the sweep runs from (``+`` when its files differ from it)."""
    def git(*args):
        return subprocess.run(["git", "-C", HERE, *args], capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--", os.path.join(HERE, "..", "guided_swap"))
    return git("rev-parse", "--short", "HEAD") + ("+" if dirty else "")


def check_model(name: str, size: int, max_params: float, rtol: float) -> dict:
    import torch

    import guided_swap as gs
    from guided_swap.checks import reference

    row = {"model": name, "checks": CHECKS, "commit": library_commit()}
    started = time.perf_counter()
    try:
        meta = meta_model(name)
        row["params_m"] = round(sum(p.numel() for p in meta.parameters()) / 1e6, 2)
    except Exception as error:
        meta, row["params_m"] = None, None
        row["meta_build"] = first_line(error)
    if row["params_m"] is not None and row["params_m"] * 1e6 > max_params:
        # counted on the meta device (no memory): how many ReLU models the size limit leaves out
        return dict(row, status="skipped", relu_calls_meta=meta_relu_count(meta, size),
                    reason=f"{row['params_m']:.0f}M parameters, over {max_params / 1e6:.0f}M")
    if meta is not None and meta_relu_count(meta, size) == 0:
        return dict(row, status="no ReLU", reason="counted on the meta device")
    del meta
    try:
        model = build(name)
    except Exception as error:
        return dict(row, status="build failed", reason=first_line(error))
    if row["params_m"] is None:
        row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    count, x, failure = relu_count_and_input(model, size)
    if count is None:
        return dict(row, status="does not run", reason=failure)
    row.update(input=list(x.shape), relu_calls=count)
    if count == 0:
        return dict(row, status="no ReLU")
    with torch.no_grad():
        logits = model(x)
    if not isinstance(logits, torch.Tensor):
        return dict(row, status="FAIL", reason=f"the model returns a {type(logits).__name__}")
    if logits.dim() == 2:
        target = logits.argmax(dim=1)
    else:  # a feature encoder (timm's *_enc): no classes to pick, so the score is its features' sum
        target, row["target"] = feature_sum, f"the sum of its {tuple(logits.shape[1:])} output features (no logits)"
    try:
        ex = gs.convert(model)  # default arguments: auto resolved on the first input, fx falling back to export
        e = ex.explain(x, target)
    except Exception as error:
        return dict(row, status="FAIL", reason=f"convert/explain: {type(error).__name__}: {first_line(error)}",
                    where=traceback.format_exc().splitlines()[-3][:300])
    row["capture"] = ex.report.capture
    row["swapped"] = len(ex.swapped)
    row["spellings"] = sorted({s.spelling for s in ex.report.swapped})
    row["left_alone"] = sorted({kind for _, kind in ex.report.left_alone})
    row["auto_reason"] = ex.report.layer_reasons.get("auto")
    row["auto_layer"] = next(iter(ex.report.layers.values()))
    with torch.no_grad():
        forwarded, row["swapped_calls"] = calls_through_the_rule(ex, x)
        forward_identical = bool(torch.equal(forwarded, logits))
    # explain runs with autograd on, and some models compute differently then (attention picks another
    # kernel): its logits are compared with the model's own output under autograd
    with_grad = model(x.clone().requires_grad_(True)).detach()
    row["logits_identical"] = forward_identical and bool(torch.equal(e.logits, with_grad))
    expected = reference.input_gradient(model, x, target)
    finite = bool(torch.isfinite(expected).all())
    scale = float(expected.abs().max()) if finite else math.nan
    row["gradient_rel_error"] = float((e.gradient - expected).abs().max()) / scale if scale > 0 else None
    row["gradient_nonzero"] = round(float((expected != 0).float().mean()), 4)
    if not finite:  # float32 overflow in the model's own backward (random weights): compare entry for entry
        row["reference_not_finite"] = round(float((~torch.isfinite(expected)).float().mean()), 4)
        row["equal_entry_for_entry"] = bool(torch.equal(*(torch.nan_to_num(g, nan=7.0, posinf=8.0, neginf=9.0)
                                                          for g in (e.gradient, expected))))
    try:  # the CAM is computed when first read; a failure there still leaves the other checks recorded
        row["auto_map"] = list(e.cam_raw.shape[1:])
        row["cam_nonzero"] = round(float((e.cam_raw != 0).float().mean()), 4)
        # Grad-CAM can be all zero for a class (random weights); a map that receives no gradient at all
        # cannot explain anything (a token map whose patches do not reach the class token the head reads)
        row["map_grad_nonzero"] = round(float((e.layers["auto"].feature_grad != 0).float().mean()), 4)
    except Exception as error:
        row["auto_map"], row["cam_error"] = [], f"{type(error).__name__}: {first_line(error)}"
    problems = []
    if not row["logits_identical"]:
        problems.append("logits differ")
    if row["swapped"] != count:
        problems.append(f"swapped {row['swapped']} call sites for {count} run-time calls")
    if row["swapped_calls"] != count:
        problems.append(f"{row['swapped_calls']} of {count} run-time calls went through the rule")
    if "reference_not_finite" in row:
        problems.append(f"the fx-free reference's guided gradient is not finite in {row['reference_not_finite']:.0%} "
                        "of its entries (float32 overflow in the model's own backward with random weights); "
                        + ("guided_swap's equals it entry for entry, NaNs included" if row["equal_entry_for_entry"]
                           else "guided_swap's differs from it"))
    elif row["gradient_rel_error"] is None or row["gradient_nonzero"] < 0.01:
        problems.append("reference gradient all zero")
    elif row["gradient_rel_error"] > rtol:
        problems.append(f"gradient error {row['gradient_rel_error']:.1e}")
    if "cam_error" in row:
        problems.append(f"CAM: {row['cam_error']}")
    elif math.prod(row["auto_map"]) <= 1:
        problems.append(f"auto map {row['auto_map']}")
    elif row["map_grad_nonzero"] == 0:
        problems.append(f"the auto map ({row['auto_layer']}) receives no gradient: its CAM is zero for every class")
    row["seconds"] = round(time.perf_counter() - started, 1)
    return dict(row, status="FAIL" if problems else "ok", reason="; ".join(problems))


def feature_sum(outputs):
    """The score of a model that returns features, not logits: one number per sample."""
    return outputs.flatten(1).sum(dim=1)


def calls_through_the_rule(ex, x):
    """``ex(x)`` and how many rectifier calls of its forward carried the rule (every capture path swaps to it).

    A swapped call takes the native ReLU with the rule's gradient hook (``ops.native_path`` says yes) or
    ``RectifierFunction``. Both are looked up at each call (a module global, a class attribute), so counting
    wrappers set there for the length of one forward see every swapped call that really runs (loops and
    repeated modules included), which a count of call sites in the graph cannot.
    """
    from guided_swap.capture import ops

    original_path, original_forward, calls = getattr(ops, "native_path", None), ops.RectifierFunction.forward, [0]

    def counting_path(*args, **kwargs):
        native = original_path(*args, **kwargs)
        calls[0] += bool(native)  # otherwise RectifierFunction runs and is counted there
        return native

    def counting_forward(ctx, *args):
        calls[0] += 1
        return original_forward(ctx, *args)

    if original_path is not None:
        ops.native_path = counting_path
    ops.RectifierFunction.forward = staticmethod(counting_forward)
    try:
        out = ex(x)
    finally:
        ops.RectifierFunction.forward = staticmethod(original_forward)
        if original_path is not None:
            ops.native_path = original_path
    return out, calls[0]


def worker(names, size, max_params, rtol, threads) -> None:
    """Check ``names`` one after the other; tell the supervisor on stdout when each starts and ends."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    for name in names:
        print("START " + name, flush=True)
        try:
            row = check_model(name, size, max_params, rtol)
        except Exception as error:  # a bug in a check must not stop the sweep
            row = {"model": name, "status": "FAIL", "reason": f"{type(error).__name__}: {first_line(error)}",
                   "where": traceback.format_exc().splitlines()[-3][:300]}
        print("DONE " + json.dumps(row), flush=True)
        gc.collect()


# --- the supervisor ----------------------------------------------------------------------------------

def load_progress(progress: str) -> dict:
    rows = {}
    if os.path.exists(progress):
        with open(progress) as handle:
            for line in handle:
                line = line.strip()
                if line:
                    row = json.loads(line)
                    rows[row["model"]] = row
    return rows


def append_progress(progress: str, row: dict) -> None:
    os.makedirs(os.path.dirname(progress), exist_ok=True)
    with open(progress, "a") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def run_worker(names, args, done_callback) -> list:
    """Run a worker on ``names``; returns the names it did not reach (after a crash or a timeout)."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--threads", str(args.threads),
               "--size", str(args.size), "--max-params", str(args.max_params), "--rtol", str(args.rtol),
               "--models", *names]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               start_new_session=True)
    current, started = None, time.monotonic()
    remaining = list(names)
    try:
        while True:
            ready, _, _ = select.select([process.stdout], [], [], 5.0)
            if ready:
                line = process.stdout.readline()
                if not line:  # the worker exited
                    break
                if line.startswith("START "):
                    current, started = line[6:].strip(), time.monotonic()
                elif line.startswith("DONE "):
                    row = json.loads(line[5:])
                    done_callback(row)
                    remaining.remove(row["model"])
                    current = None
            if current is not None and time.monotonic() - started > args.timeout:
                os.killpg(process.pid, 9)
                process.wait()
                done_callback({"model": current, "status": "timeout",
                               "reason": f"over {args.timeout:.0f} s (2 CPU cores)"})
                remaining.remove(current)
                return remaining
        code = process.wait()
        if current is not None:
            done_callback({"model": current, "status": "crashed", "reason": f"worker exit code {code}"})
            remaining.remove(current)
        return remaining
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
            process.wait()


#: rows with these statuses are checked again on a resume (a fix may have landed since)
UNFINISHED = ("FAIL", "fx failed", "timeout", "crashed")


def to_check(names, done: dict, redo: bool = False) -> list:
    """The names to check, in order: unfinished rows again, then names never checked, then ok rows of an
    older sweep through torch.export, then those it converted with ``example_input`` (not convert's defaults;
    they have no ``capture`` entry)."""
    if redo:
        return list(names)
    again = [n for n in names if n in done and done[n]["status"] in UNFINISHED]
    new = [n for n in names if n not in done]
    older = [n for n in names if n in done and done[n]["status"] == "ok" and done[n].get("checks", 0) < CHECKS]
    # first the rows through export (swept before the layouts reached that path), then those converted
    # with example_input; the rest of the older rows only lack the run-time count of the rule's calls
    export = [n for n in older if capture_path(done[n]) == "export"]
    example_input = [n for n in older if "capture" not in done[n]]
    return again + new + export + example_input


def supervise(args) -> None:
    import timm

    names = args.models or timm.list_models()
    done = load_progress(paths(args.results)["progress"])
    pending = to_check(names, done, redo=args.redo and bool(args.models))
    print(f"{len(names)} models, {len(names) - len(pending)} done before, {len(pending)} to go", flush=True)

    lock = threading.Lock()

    def record(row):
        with lock:
            append_progress(paths(args.results)["progress"], row)
            done[row["model"]] = row
            write_summary(done, args)
            print(f"{row['model']:45s} {row['status']:12s} {row.get('reason', '')}", flush=True)

    def shard(names):
        while names:
            batch, names = names[:args.restart_every], names[args.restart_every:]
            while batch:
                batch = run_worker(batch, args, record)

    threads = [threading.Thread(target=shard, args=(pending[i::args.workers],)) for i in range(args.workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    write_summary(done, args)


# --- the summary ---------------------------------------------------------------------------------------

ORDER = ("ok", "FAIL", "timeout", "crashed", "does not run", "build failed", "skipped", "no ReLU")
CHECKED = ("ok", "FAIL", "timeout", "crashed")


def capture_path(row: dict) -> str:
    return row.get("capture", "").split(" (")[0]


#: root causes found for a failure on the export path, by a phrase of its reason
KNOWN_CAUSES = {
    "receives no gradient": "root cause: guided_swap/layouts.py `_class_token_read` looks for `operator.getitem` "
                            "only; the export graph reads the class token with `aten.select.int`, so auto takes "
                            "the pooled-model rule and captures the last token map, whose patch tokens never "
                            "reach the head; the fx path (vit_small_resnet26d_224) picks the last attention's input",
}


def commits(models) -> dict:
    """How many ReLU rows (checked or failed) each guided_swap commit produced; older sweeps did not record it."""
    found = {}
    for row in models:
        if row["status"] in CHECKED:
            key = row.get("commit", "not recorded")
            found[key] = found.get(key, 0) + 1
    return found


def cam_layout_only(row: dict) -> bool:
    """A FAIL on the export path whose only problem is the CAM's layout (see the summary's failures)."""
    reason = row.get("reason", "")  # the CAM is the last check: a reason starting with it has no other problem
    return (row["status"] == "FAIL" and capture_path(row) == "export" and reason.startswith("CAM: LayerError")
            and "cannot read" in reason)


def write_summary(rows: dict, args) -> None:
    import timm
    import torch

    from guided_swap._files import atomic_write

    listed = timm.list_models()
    rows = {name: rows[name] for name in listed if name in rows}
    counts = {status: sum(r["status"] == status for r in rows.values()) for status in ORDER}
    counts["fx failed (old sweep)"] = sum(r["status"] == "fx failed" for r in rows.values())
    for path in ("export", "runtime"):
        counts[f"ok via {path}"] = sum(r["status"] == "ok" and capture_path(r) == path for r in rows.values())
    counts["ok, rule calls counted at run time"] = sum(r["status"] == "ok" and r.get("checks", 0) >= 3
                                                       for r in rows.values())
    counts["ok, auto map gradient checked"] = sum(r["status"] == "ok" and r.get("checks", 0) >= 4
                                                  for r in rows.values())
    counts["skipped, ReLU on the meta device"] = sum(r["status"] == "skipped" and bool(r.get("relu_calls_meta"))
                                                     for r in rows.values())
    counts["skipped, ReLU not counted"] = sum(r["status"] == "skipped" and r.get("relu_calls_meta") is None
                                              for r in rows.values())
    counts["ok, converted with example_input (older sweep)"] = sum(r["status"] == "ok" and "capture" not in r
                                                                   for r in rows.values())
    settings = {"date": datetime.date.today().isoformat(), "timm": timm.__version__, "torch": torch.__version__,
                "python": platform.python_version(), "size": args.size, "batch": 1, "max_params": args.max_params,
                "rtol": args.rtol, "timeout_s": args.timeout, "listed": len(listed), "threads": args.threads,
                "weights": "random (pretrained=False, seed 0), BatchNorm statistics randomised",
                "convert": "gs.convert(model): default arguments (layer='auto', rule='guided', capture='auto', "
                           "no example_input)"}
    summary = {"settings": settings, "counts": counts, "swept": len(rows),
               "complete": len(rows) == len(listed) and not any(r["status"] in UNFINISHED[1:] for r in rows.values()),
               "relu_models_checked": sum(counts[s] for s in CHECKED) + counts["fx failed (old sweep)"],
               "models": [rows[name] for name in sorted(rows)]}
    with atomic_write(paths(args.results)["json"]) as path:
        with open(path, "w") as handle:
            json.dump(summary, handle, indent=1)
    with atomic_write(paths(args.results)["md"]) as path:
        with open(path, "w") as handle:
            handle.write(markdown(summary))


def markdown(summary: dict) -> str:
    s, counts, models = summary["settings"], summary["counts"], summary["models"]
    by_status = {status: [r for r in models if r["status"] == status] for status in ORDER + ("fx failed",)}
    unreached = "" if summary["complete"] else f", {s['listed'] - summary['swept']} not reached"
    lines = ["# timm sweep: every timm model that calls ReLU or ReLU6", "",
             f"{s['date']}; timm {s['timm']}, torch {s['torch']}, Python {s['python']}; CPU, {s['threads']} thread(s). "
             f"{s['weights']}; eval mode; batch 1, a photograph at {s['size']} px, or at the model's own input size "
             f"when it takes only that one; {s['convert']}.", "",
             "Checks on every model that calls ReLU/ReLU6 at run time (counted by the fx-free reference, "
             "guided_swap/reference.py, in every spelling): `explain`'s logits equal the model's own bit for bit "
             "under autograd, and `ex(x)` equals `model(x)` under no_grad (both modes are compared because some "
             "attention kernels differ between them: maxvit/maxxvit `rmlp` use a relative-position bias that "
             "requires grad, and SDPA then runs another CPU kernel); the swapped call sites and the rule's op "
             "calls counted at run time equal the run-time rectifier count; the guided gradient equals the "
             f"reference within {s['rtol']:g} of its largest entry and is not all zero; `auto` gives a map "
             "larger than 1x1.", "",
             f"**{'Complete' if summary['complete'] else 'PARTIAL (stopped by the time box)'}**: "
             f"{summary['swept']} of {s['listed']} names listed by `timm.list_models()` swept" + unreached + ".", "",
             f"- **{summary['relu_models_checked']} call ReLU/ReLU6 at run time**: **{counts['ok']} exact** "
             f"({counts['ok via export']} through the torch.export path because fx cannot trace them, "
             f"{counts['ok via runtime']} through the run-time path), {counts['FAIL']} FAIL, "
             f"{counts['timeout']} timed out (over {s['timeout_s']:.0f} s), {counts['crashed']} crashed"
             + (f", {counts['fx failed (old sweep)']} left from an older sweep (fx failed, not re-run)"
                if counts["fx failed (old sweep)"] else "") + ".",
             f"- Of the exact rows, {counts['ok, rule calls counted at run time']} also passed the run-time count "
             f"of the rule's op calls and {counts['ok, auto map gradient checked']} the check that the auto map "
             f"receives a gradient (both added late)" +
             ("" if counts["ok, auto map gradient checked"] == counts["ok"] else
              "; the others were swept before, with the call-site count only") + (f"; {counts['ok, converted with example_input (older sweep)']} of them were converted "
                        f"with `example_input` by an older sweep, not with the defaults"
                        if counts["ok, converted with example_input (older sweep)"] else "") + ".",
             "- guided_swap commit of the checked rows: " + ", ".join(
                 f"{commit} ({n})" for commit, n in sorted(commits(models).items(), key=lambda kv: -kv[1])) +
             " (the checkout's HEAD when the row ran; commits that changed only benchmarks/ and tests/ leave the "
             "library the same).",
             f"- Not checked: {counts['no ReLU']} without any ReLU/ReLU6 call, {counts['skipped']} skipped "
             f"({counts['skipped, ReLU on the meta device']} of them call ReLU/ReLU6 in a forward on the meta "
             f"device, {counts['skipped, ReLU not counted']} not counted), "
             f"{counts['does not run']} that do not run, {counts['build failed']} that do not build.", ""]
    failed = [r for r in models if r["status"] in UNFINISHED]
    cam_only = [r for r in failed if cam_layout_only(r)]
    lines += [f"## Failures ({len(failed)})", ""]
    if cam_only:
        lines += [f"- {len(cam_only)} through the torch.export path pass every other check (logits bit for bit, "
                  "every run-time rectifier call through the rule, guided gradient against the reference) but "
                  "reading the CAM raises `LayerError: ... has a layout guided_swap cannot read (no channel axis "
                  "could be followed ...)`: guided_swap/axes.py matches graph targets by `__name__`, which for the "
                  "export graph's aten ops is `conv2d.default`, `batch_norm.default`, `add.Tensor`, so no channel "
                  "axis is ever found there: " + ", ".join(f"`{r['model']}`" for r in cam_only)]
    for row in failed:
        if row not in cam_only:
            cause = next((text for key, text in KNOWN_CAUSES.items() if key in row.get("reason", "") and
                          capture_path(row) == "export"), "")
            lines.append(f"- `{row['model']}` ({capture_path(row) or 'no capture'}): {row['status']}: "
                         f"{row.get('reason', '')}" + (f" ({cause})" if cause else ""))
    lines += [] if failed else ["None."]
    lines += ["", f"## Skipped or not run ({sum(counts[x] for x in ('skipped', 'does not run', 'build failed'))})", ""]
    reasons = {}
    for r in by_status["skipped"]:
        reasons.setdefault(f"over {s['max_params'] / 1e6:.0f}M parameters (not built)", []).append(r["model"])
    for status in ("does not run", "build failed"):
        for r in by_status[status]:
            reasons.setdefault(f"{status}: {r.get('reason', '')}", []).append(r["model"])
    for reason, names in reasons.items():
        lines.append(f"- {reason} ({len(names)}): " + ", ".join(f"`{n}`" for n in names))
    lines += ["", "## Every model that calls ReLU/ReLU6", "",
              "| model | status | capture | params (M) | input | ReLU calls | swapped sites | rule calls | "
              "gradient rel. error | auto layer | auto map | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rank = {status: i for i, status in enumerate(ORDER)}
    for row in sorted(models, key=lambda r: (rank.get(r["status"], 1), r["model"])):
        if row["status"] in ("no ReLU", "skipped", "does not run", "build failed"):
            continue
        error = row.get("gradient_rel_error")
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            row["model"], row["status"], capture_path(row), row.get("params_m", ""),
            "x".join(str(v) for v in row.get("input", [])[2:]), row.get("relu_calls", ""), row.get("swapped", ""),
            row.get("swapped_calls", ""), "" if error is None else f"{error:.1e}", row.get("auto_layer", ""),
            "x".join(str(v) for v in row.get("auto_map", [])), str(row.get("reason", "")).replace("|", "/")))
    no_relu = sorted(r["model"] for r in by_status["no ReLU"])
    lines += ["", f"Models without a ReLU/ReLU6 call at run time ({len(no_relu)}): " + ", ".join(no_relu), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="model names (default: every timm.list_models() entry)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--max-params", type=float, default=100e6)
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per model")
    parser.add_argument("--restart-every", type=int, default=20, help="a fresh worker process every N models")
    parser.add_argument("--redo", action="store_true", help="check the --models named again")
    parser.add_argument("--workers", type=int, default=1, help="worker processes side by side")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    parser.add_argument("--summary-only", action="store_true")
    parser.add_argument("--results", default=os.path.join(HERE, "results"), help="folder of the progress log and summary")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.models, args.size, args.max_params, args.rtol, args.threads)
    elif args.summary_only:
        write_summary(load_progress(paths(args.results)["progress"]), args)
    else:
        supervise(args)


if __name__ == "__main__":
    main()
