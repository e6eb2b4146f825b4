"""CPU cost of a swapped rectifier in eager mode, before and after the native-node path (guided_swap.capture.ops).

"Before" is every rectifier through the rule's Python ``autograd.Function`` (``RectifierFunction``), which is
what a rule without ``incoming()`` still takes; "after" is the native ReLU node with the rule's ``incoming``
as a gradient pre-hook. Three measures, each the median of interleaved rounds (every method once per round):

1. a chain of 64 rectifiers on a tiny tensor (1x16x4x4), forward + backward: the cost per rectifier with no
   arithmetic to hide it, beside a plain ``torch.relu`` chain;
2. ``torch.profiler`` on one guided ``explain`` of each model at batch 1 on a small input (``--profile-size``,
   so that the kernels' arithmetic does not hide the overhead), beside the plain gradient: the per-call time of
   the rectifier events (the forward op or Function, and the engine's evaluate_function of its backward node,
   which runs the pre-hook). Python outside ops (the graph's wrapper, registering the hook) is not an event:
   measure 1 counts it;
3. ``explain`` (guided only, and all maps) against the plain input gradient, eager, at batch 1, ``--size``.

    OMP_NUM_THREADS=1 python benchmarks/profile_rectifiers.py --models resnet18 resnet50 --rounds 7

It writes ``benchmarks/results/rectifier_cpu.{json,md}``.
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
from torch.profiler import ProfilerActivity, profile

import guided_swap as gs
from guided_swap.checks import benchmark
from guided_swap.capture import ops
from guided_swap._files import atomic_write
from guided_swap.core.rules import get_rule

LAYERS = {"resnet18": "layer4", "resnet50": "layer4", "vgg16": "features.29", "densenet121": "features",
          "googlenet": "inception5b", "mobilenet_v2": "features"}


@contextlib.contextmanager
def function_path():
    """Every rectifier through RectifierFunction: the state before the native-node path."""
    native = ops.native_path
    ops.native_path = lambda rule, x, inplace: False
    try:
        yield
    finally:
        ops.native_path = native


def on_function_path(fn: Callable) -> Callable:
    def run(*args):
        with function_path():
            return fn(*args)
    return run


def interleaved(methods: Dict[str, Callable], rounds: int, warmup: int = 1) -> Dict[str, float]:
    """Median CPU seconds of this process per call of each method, over rounds that call every method once.
    Process CPU time, not wall time: on a loaded machine it leaves out the time spent waiting for a core."""
    times = benchmark.interleaved(methods, rounds, warmup, clock=time.process_time)
    return {name: statistics.median(values) for name, values in times.items()}


def chain(rounds: int, length: int = 64, repeats: int = 20) -> Dict[str, float]:
    """Microseconds per rectifier (forward + backward) in a chain of ``length``, tiny tensors."""
    slot = ops.RuleSlot(get_rule("guided"))
    x = torch.randn(1, 16, 4, 4)

    def run(step: Callable) -> Callable:
        def call():
            for _ in range(repeats):
                leaf = x.clone().requires_grad_(True)
                y = leaf * 1.0
                for _ in range(length):
                    y = step(y)
                y.sum().backward()
        return call

    def relu_with_noop_hook(t):
        out = torch.relu(t)
        out.grad_fn.register_prehook(_noop)
        return out

    methods = {"plain relu": run(torch.relu), "plain relu + a no-op pre-hook (registering and calling it)":
               run(relu_with_noop_hook), "guided, native node + incoming hook": run(lambda t: ops.rectify(t, slot)),
               "guided, autograd.Function": on_function_path(run(lambda t: ops.rectify(t, slot))),
               "identity (t * 1.0)": run(lambda t: t * 1.0)}
    seconds = interleaved(methods, rounds)
    return {name: s / (repeats * length) * 1e6 for name, s in seconds.items()}


def _noop(grad_outputs):
    return None


RECTIFIER_EVENTS = {  # profiler event -> what it is
    "aten::relu_": "native forward (in place)", "aten::relu": "native forward",
    "autograd::engine::evaluate_function: ReluBackward0": "native backward node (with the hook: native)",
    "RectifierFunction": "Function forward",
    "autograd::engine::evaluate_function: RectifierFunctionBackward": "Function backward node",
    "aten::threshold_backward": "the ReLU mask kernel", "aten::clamp": "max(g, 0) (the hook)",
    "aten::clamp_": "max(g, 0) (the Function)",
}


def profiled(fn: Callable) -> Dict[str, Dict[str, float]]:
    """Calls and mean CPU-total microseconds of the rectifier events in one call of ``fn``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    out = {}
    for event in prof.key_averages():
        if event.key in RECTIFIER_EVENTS:
            out[event.key] = {"calls": event.count, "cpu_total_us": event.cpu_time_total / event.count}
    return out


def model_measures(name: str, size: int, rounds: int, profile_rounds: int, profile_size: int) -> dict:
    model = benchmark.build_model(name)
    layer = LAYERS[name]
    x, target = benchmark._inputs(model, 1, size, 0)
    plain = benchmark.plain_gradient(model, layer)
    guided, every = gs.convert(model, layer=None), gs.convert(model, layer=layer)
    calls = {
        "plain gradient": lambda: plain(x, target),
        "guided (native)": lambda: guided.explain(x, target),
        "guided (Function)": on_function_path(lambda: guided.explain(x, target)),
        "all maps (native)": lambda: every.explain(x, target).guided_gradcam,
        "all maps (Function)": on_function_path(lambda: every.explain(x, target).guided_gradcam),
    }
    seconds = interleaved(calls, rounds)
    small, small_target = benchmark._inputs(model, 1, profile_size, 0)
    profiled_calls = {"plain": lambda: plain(small, small_target),
                      "native": lambda: guided.explain(small, small_target),
                      "Function": on_function_path(lambda: guided.explain(small, small_target))}
    events: Dict[str, List[dict]] = {path: [] for path in profiled_calls}
    for _ in range(profile_rounds):  # interleaved too
        for path, fn in profiled_calls.items():
            events[path].append(profiled(fn))
    medians = {path: {key: {"calls": runs[0][key]["calls"],
                            "cpu_total_us": statistics.median(r[key]["cpu_total_us"] for r in runs)}
                      for key in runs[0]} for path, runs in events.items()}
    return {"model": name, "size": size, "profile_size": profile_size, "rectifiers": len(guided.swapped),
            "seconds": seconds, "ratio_to_plain": {k: v / seconds["plain gradient"] for k, v in seconds.items()},
            "profile": medians}


def to_markdown(results: dict) -> str:
    m = results["machine"]
    lines = ["# CPU cost of a swapped rectifier, eager: autograd.Function (before) vs native node + incoming hook "
             "(after)", "",
             f"{m['cpu']}, torch {m['torch']}, {results['threads']} torch thread(s), {m['date']}. The machine was "
             f"shared and loaded (load average {results['load']} on {m['cores']} cores): every figure is a median of "
             f"{results['rounds']} interleaved rounds (each method once per round), so the methods saw the same load, "
             "timed as this process's CPU time (time.process_time: waiting for a core left out). The profiler "
             "table is wall time, median of the profiled calls.",
             "", "## Per rectifier, forward + backward (a chain of 64 on a 1x16x4x4 tensor)", "",
             "| path | µs per rectifier |", "|---|---|"]
    lines += [f"| {name} | {us:.1f} |" for name, us in results["chain_us"].items()]
    sizes = sorted({row["profile_size"] for row in results["models"]})
    lines += ["", f"## torch.profiler, one call at batch 1, {'/'.join(map(str, sizes))} px (wall µs per event call, "
              "median of the profiled calls)", "", "The profiler inflates events that run Python (the pre-hook, the "
              "Function's backward) several-fold, so read this table for what runs per rectifier, and the chain "
              "above for what it costs.", "",
              "| model | event | what | calls | plain gradient | guided, native | guided, Function |",
              "|---|---|---|---|---|---|---|"]
    for row in results["models"]:
        profile_ = row["profile"]
        keys = [k for k in RECTIFIER_EVENTS if any(k in profile_[path] for path in profile_)]
        for key in keys:
            calls = next(profile_[path][key]["calls"] for path in profile_ if key in profile_[path])
            cells = [f"{profile_[path][key]['cpu_total_us']:.0f}" if key in profile_[path] else ""
                     for path in ("plain", "native", "Function")]
            lines.append(f"| {row['model']} | `{key}` | {RECTIFIER_EVENTS[key]} | {calls} | " + " | ".join(cells) + " |")
    lines += ["", "## explain against the plain input gradient, eager, batch 1", "",
              "| model | px | swapped | plain ms | guided: Function → native | all maps: Function → native |",
              "|---|---|---|---|---|---|"]
    for row in results["models"]:
        r, s = row["ratio_to_plain"], row["seconds"]
        lines.append(f"| {row['model']} | {row['size']} | {row['rectifiers']} | {s['plain gradient'] * 1000:.0f} | "
                     f"{r['guided (Function)']:.3f}× → {r['guided (native)']:.3f}× | "
                     f"{r['all maps (Function)']:.3f}× → {r['all maps (native)']:.3f}× |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=["resnet18", "resnet50"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--profile-rounds", type=int, default=5)
    parser.add_argument("--profile-size", type=int, default=32)
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = parser.parse_args(argv)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    results = {"machine": benchmark.machine(), "threads": torch.get_num_threads(), "rounds": args.rounds,
               "chain_us": chain(args.rounds * 3), "models": []}
    for name in args.models:
        results["models"].append(model_measures(name, args.size, args.rounds, args.profile_rounds, args.profile_size))
        print(name, json.dumps(results["models"][-1]["ratio_to_plain"]), file=sys.stderr)
    results["load"] = f"{load} at the start, " + ", ".join(f"{v:.1f}" for v in os.getloadavg()) + " at the end"
    for suffix, text in ((".json", json.dumps(results, indent=1)), (".md", to_markdown(results))):
        path = os.path.join(args.out, "rectifier_cpu" + suffix)
        with atomic_write(path, suffix=suffix) as temporary:
            with open(temporary, "w") as handle:
                handle.write(text)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
