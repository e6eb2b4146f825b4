"""Side-by-side benchmark: guided_swap against the hook-based approach, speed, memory and correctness.

Every method explains the same batch for the same targets. Time is measured in interleaved rounds after a
warm-up; memory as the bytes of unique storages saved for backward (deterministic) and as peak RSS with the
method alone in its own process (noisy: median of several). Each method's map is compared with the true one
from :mod:`guided_swap.checks.reference`, so a fast but wrong peer shows as such.

On a GPU (``--device cuda``) every call is timed between ``torch.cuda.synchronize()`` calls, TF32 is off, and
the peak CUDA memory of each method is measured from a reset before its warm-up calls (which compile and, with
CUDA graphs, record it) to the end of its first timed call, above what was allocated before. Compiled methods
(``*_compiled``) use ``torch.compile`` with ``--compile-mode`` (``reduce-overhead``, CUDA graphs, by default on a
GPU). Targets reach every method as a CPU tensor, the way that costs guided_swap no device synchronisation;
the other methods copy them to the device without waiting. The GPU table goes to ``results_gpu.{json,md}``,
and :func:`readme_table` renders the summary the README shows, naming the device and the torch version.

>>> results = run(Config(models=(("resnet18", "layer4", 32),), batches=(1,), rounds=1, warmup=0, rss_repeats=0,
...                      conversion=False, methods=("plain", "gs_guided")))
>>> sorted(results["rows"][0]["methods"])
['gs_guided', 'plain']
"""
import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torchvision
from torch import Tensor, nn

from .._files import atomic_write
from ..core import cam as cam_maths
from . import reference
from ..run import compiled
from ..run.convert import convert
from ..run.program import export_program

DEFAULT_MODELS = (("resnet50", "layer4", 224), ("vgg16", "features.29", 224), ("densenet121", "features", 224),
                  ("googlenet", "inception5b", 224))
EAGER_METHODS = ("plain", "gs_guided", "gs_all", "gs_exported", "seed_hooks", "captum_gbp", "captum_ggc", "gradcam_lib")
COMPILED_METHODS = ("plain_compiled", "gs_guided_compiled", "gs_all_compiled")
ALL_METHODS = EAGER_METHODS + COMPILED_METHODS
DEFAULT_GPU_BATCHES = (1, 32, 128)
DESCRIPTIONS = {
    "plain": "plain input gradient (forward + one backward): the floor",
    "gs_guided": "guided_swap guided backprop",
    "gs_all": "guided_swap all maps at once (guided + Grad-CAM + Guided Grad-CAM)",
    "gs_exported": "guided_swap exported .pt2 program, all maps",
    "plain_compiled": "plain input gradient, forward and backward compiled as one torch.compile graph",
    "gs_guided_compiled": "guided_swap guided backprop, Explainer.compile",
    "gs_all_compiled": "guided_swap all maps at once, Explainer.compile",
    "seed_hooks": "backward hook on every nn.ReLU that clamps the gradient (inplace=False copy)",
    "captum_gbp": "Captum GuidedBackprop",
    "captum_ggc": "Captum GuidedGradCam (two passes)",
    "gradcam_lib": "pytorch-grad-cam GuidedBackpropReLUModel + GradCAM (batch-1 loop for guided)",
}
Method = Callable[[Tensor, Tensor], Dict[str, Tensor]]
# A factory takes (model, layer name, input size, torch.compile options) and returns a Method. The model is on
# the benchmark's device; the target reaches the method as a CPU tensor.


@dataclass
class Config:
    models: Sequence[Tuple[str, str, int]] = DEFAULT_MODELS
    batches: Sequence[int] = (1, 16)
    methods: Sequence[str] = EAGER_METHODS
    warmup: int = 1
    rounds: int = 5
    rss_repeats: int = 3
    rss_batch: int = 16
    rss_methods: Sequence[str] = ("plain", "gs_guided", "gs_all", "captum_gbp", "captum_ggc")
    conversion: bool = True
    seed: int = 0
    device: str = "cpu"
    compile_options: Dict[str, object] = field(default_factory=dict)


def build_model(name: str, seed: int = 0) -> nn.Module:
    """A torchvision model with random weights from ``seed`` and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    kwargs = {"init_weights": True, "aux_logits": False} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return model.eval()


# --- the methods -----------------------------------------------------------------------------------------

def _score(logits: Tensor, target: Tensor) -> Tensor:
    return logits.gather(1, target.view(-1, 1)).sum()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _on(target: Tensor, device: torch.device) -> Tensor:
    # From pageable memory a non-blocking copy is staged at once: the host does not wait for the device.
    return target.to(device, non_blocking=True)


def plain_gradient(model: nn.Module, layer: str, size: int = 224, options: Optional[dict] = None) -> Method:
    device = _device(model)

    def run(x, target):
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(_score(model(x), _on(target, device)), x)
        return {"gradient": grad}
    return run


def plain_compiled(model: nn.Module, layer: str, size: int = 224, options: Optional[dict] = None) -> Method:
    """The plain gradient compiled the way ``Explainer.compile`` compiles: one graph, dynamic batch."""
    options, device = dict(options or {}), _device(model)

    def gradient_pass(x, target):
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(_score(model(leaf), target), leaf)
        return grad

    function = compiled.compile_pass(gradient_pass, options)
    copy = compiled.uses_cudagraphs(options) and device.type == "cuda"

    def run(x, target):
        x, target = x.detach(), _on(target, device)
        compiled.mark_batch_dynamic([x, target])
        grad = compiled.run_traced(function, x, target)
        return {"gradient": grad.clone() if copy else grad}  # explain copies its CUDA-graph outputs too
    return run


def gs_guided(model: nn.Module, layer: str, size: int = 224, options: Optional[dict] = None) -> Method:
    return _guided_method(convert(model, layer=None))


def gs_all(model: nn.Module, layer: str, size: int = 224, options: Optional[dict] = None) -> Method:
    return _all_maps_method(convert(model, layer=layer))


def gs_guided_compiled(model: nn.Module, layer: str, size: int = 224, options: Optional[dict] = None) -> Method:
    explainer = convert(model, layer=None)
    explainer.compile(**(options or {}))
    return _guided_method(explainer)


def gs_all_compiled(model: nn.Module, layer: str, size: int = 224, options: Optional[dict] = None) -> Method:
    explainer = convert(model, layer=layer)
    explainer.compile(**(options or {}))
    return _all_maps_method(explainer)


def _guided_method(explainer) -> Method:
    return lambda x, target: {"gradient": explainer.explain(x, target).gradient}


def _all_maps_method(explainer) -> Method:
    def run(x, target):
        e = explainer.explain(x, target)
        return {"gradient": e.gradient, "cam": e.cam, "guided_gradcam": e.guided_gradcam}
    return run


def gs_exported(model: nn.Module, layer: str, size: int = 224, options: Optional[dict] = None) -> Method:
    device = _device(model)
    program = export_program(convert(model, layer=layer), torch.randn(2, 3, size, size, device=device)).module()
    return lambda x, target: program(x, _on(target, device))


def seed_hooks(model: nn.Module, layer: str, size: int = 224, options: Optional[dict] = None) -> Method:
    """The approach most blog code and seed projects use: clamp the gradient in a hook on each nn.ReLU."""
    hooked = copy.deepcopy(model)
    for module in hooked.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False  # full backward hooks refuse in-place outputs
            module.register_full_backward_hook(lambda m, grad_in, grad_out: (grad_in[0].clamp(min=0),))
    return plain_gradient(hooked, layer)


def captum_gbp(model: nn.Module, layer: str, size: int = 224, options: Optional[dict] = None) -> Method:
    from captum.attr import GuidedBackprop  # optional: captum is a dev dependency, a peer compared against

    method, device = GuidedBackprop(copy.deepcopy(model)), _device(model)
    return lambda x, target: {"gradient": method.attribute(x, target=_on(target, device))}


def captum_ggc(model: nn.Module, layer: str, size: int = 224, options: Optional[dict] = None) -> Method:
    from captum.attr import GuidedGradCam  # optional: captum is a dev dependency, a peer compared against

    copied, device = copy.deepcopy(model), _device(model)
    method = GuidedGradCam(copied, copied.get_submodule(layer))
    return lambda x, target: {"guided_gradcam": method.attribute(x, target=_on(target, device),
                                                                 interpolate_mode="bilinear")}


def gradcam_lib(model: nn.Module, layer: str, size: int = 224, options: Optional[dict] = None) -> Method:
    # optional: pytorch-grad-cam (grad-cam) is a dev dependency, a peer compared against
    from pytorch_grad_cam import GradCAM, GuidedBackpropReLUModel
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    # Two copies: GuidedBackpropReLUModel puts *new* nn.ReLU modules back after each call, which silently
    # detaches GradCAM's hooks when the target layer is a ReLU (VGG's features.29) and both share a model.
    device = _device(model)
    guided = GuidedBackpropReLUModel(copy.deepcopy(model), device=device)
    for_cam = copy.deepcopy(model)
    gradcam = GradCAM(model=for_cam, target_layers=[for_cam.get_submodule(layer)])

    def run(x, target):
        classes = [int(t) for t in target]  # a CPU tensor: no device synchronisation
        cams = gradcam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
        maps = [torch.from_numpy(guided(x[i:i + 1].clone(), target_category=c)).permute(2, 0, 1)
                for i, c in enumerate(classes)]  # its guided backprop explains one image per call
        return {"gradient": torch.stack(maps), "cam": torch.from_numpy(cams)}
    return run


FACTORIES: Dict[str, Callable[..., Method]] = {
    "plain": plain_gradient, "gs_guided": gs_guided, "gs_all": gs_all, "gs_exported": gs_exported,
    "seed_hooks": seed_hooks, "captum_gbp": captum_gbp, "captum_ggc": captum_ggc, "gradcam_lib": gradcam_lib,
    "plain_compiled": plain_compiled, "gs_guided_compiled": gs_guided_compiled, "gs_all_compiled": gs_all_compiled,
}


# --- measurements ----------------------------------------------------------------------------------------

def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(methods: Dict[str, Method], x: Tensor, target: Tensor, calls: int) -> Dict[str, dict]:
    """Each method's warm-up calls (compiling and CUDA-graph recording happen here), one method at a time:
    the first call's seconds and, on CUDA, the peak memory above what was allocated before the method ran."""
    measures: Dict[str, dict] = {}
    for name, method in methods.items():
        _synchronize(x.device)
        if x.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(x.device)
            before = torch.cuda.memory_allocated(x.device)
        entry = {}
        for call in range(max(calls, 1) if x.device.type == "cuda" else calls):
            start = time.perf_counter()
            method(x, target)
            _synchronize(x.device)
            if call == 0:
                entry["first_call_s"] = time.perf_counter() - start
        if x.device.type == "cuda":
            entry["peak_cuda_mib"] = (torch.cuda.max_memory_allocated(x.device) - before) / 2 ** 20
        measures[name] = entry
    return measures


def interleaved(calls: Dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                clock: Callable[[], float] = time.perf_counter,
                settle: Callable[[], None] = lambda: None) -> Dict[str, List[float]]:
    """``clock`` seconds of each call, in rounds that visit every call once (so a slow spell of the machine
    falls on every method alike), after ``warmup`` rounds. ``settle`` runs before each timing starts and
    inside it, after the call (a device synchronisation, so a call's time includes its device time)."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: Dict[str, List[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            settle()
            start = clock()
            call()
            settle()
            times[name].append(clock() - start)
    return times


def time_interleaved(methods: Dict[str, Method], x: Tensor, target: Tensor, warmup: int, rounds: int) -> Dict[str, List[float]]:
    """Seconds per call of each method on ``(x, target)`` (:func:`interleaved`; on CUDA between
    synchronisations, so a call's time is its device time too)."""
    calls = {name: (lambda method=method: method(x, target)) for name, method in methods.items()}
    return interleaved(calls, rounds, warmup, settle=lambda: _synchronize(x.device))


def saved_bytes(method: Method, x: Tensor, target: Tensor) -> int:
    """Bytes of unique storages saved for backward during one call (storages are kept alive while counting,
    so a second pass cannot reuse an address and hide its bytes)."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        method(x, target)
    return sum(storage.nbytes() for storage in storages.values())


def truth(model: nn.Module, layer: str, x: Tensor, target: Tensor) -> Dict[str, Tensor]:
    """The true guided gradient and Guided Grad-CAM, from the fx-free reference."""
    target = target.to(x.device)
    gradient = reference.input_gradient(model, x, target, "guided")
    heat = cam_maths.upsample(reference.gradcam(model, x, target, model.get_submodule(layer)), x.shape[2:])
    return {"gradient": gradient, "guided_gradcam": cam_maths.guided_gradcam(heat, gradient)}


def deviation(result: Dict[str, Tensor], expected: Dict[str, Tensor]) -> Optional[float]:
    """Max relative deviation of a method's guided map from the truth (None for the plain gradient)."""
    for key in ("guided_gradcam", "gradient"):
        if key in result and key in expected:
            scale = expected[key].abs().max().clamp_min(1e-30)
            return float((result[key].detach().float().to(expected[key].device) - expected[key]).abs().max() / scale)
    return None


def peak_rss_delta(model_name: str, layer: str, size: int, method: str, batch: int, seed: int) -> float:
    """MiB the peak RSS rises above the process's RSS after set-up, with ``method`` alone in a new process."""
    command = [sys.executable, "-m", "guided_swap.checks.benchmark", "--rss-probe", model_name, layer, str(size), method,
               str(batch), str(seed)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])["delta_mib"]


def _rss_probe(model_name: str, layer: str, size: int, method: str, batch: int, seed: int) -> None:
    warnings.simplefilter("ignore")
    model = build_model(model_name, seed)
    run_method = FACTORIES[method](model, layer, size)
    x, target = _inputs(model, batch, size, seed)
    base = _reset_peak_rss()
    run_method(x, target)
    print(json.dumps({"delta_mib": max(_peak_rss() - base, 0) / 2 ** 20}))


def _status_bytes(field_name: str) -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field_name + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak_rss() -> int:
    """Reset the high-water mark to the current RSS (Linux: clear_refs 5); return the current RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return _status_bytes("VmRSS")
    except OSError:  # not Linux: fall back to the lifetime peak, which may include set-up
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss() -> int:
    try:
        return _status_bytes("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _inputs(model: nn.Module, batch: int, size: int, seed: int) -> Tuple[Tensor, Tensor]:
    """The batch, on the model's device, and its argmax classes as a CPU tensor."""
    generator = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(batch, 3, size, size, generator=generator).to(_device(model))
    with torch.no_grad():
        target = model(x).argmax(dim=1).cpu()
    return x, target


def conversion_times(names: Sequence[Tuple[str, str]], repeats: int = 3) -> Dict[str, float]:
    """Median seconds of ``convert`` per model."""
    result = {}
    for name, layer in names:
        model = build_model(name)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            convert(model, layer=layer)
            samples.append(time.perf_counter() - start)
        result[name] = statistics.median(samples)
    return result


CONVERSION_MODELS = (("resnet18", "layer4"), ("resnet34", "layer4"), ("resnet50", "layer4"), ("resnet101", "layer4"),
                     ("resnet152", "layer4"), ("densenet121", "features"), ("densenet161", "features"),
                     ("densenet169", "features"), ("densenet201", "features"))


# --- the run -------------------------------------------------------------------------------------------

def run(config: Config, log: Callable[[str], None] = lambda line: None,
        partial: Callable[[dict], None] = lambda results: None) -> dict:
    warnings.simplefilter("ignore")
    device = torch.device(config.device)
    if device.type == "cuda":  # fp32 as written: TF32 would change the maps (recorded in machine())
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    rows = []
    for model_name, layer, size in config.models:
        model = build_model(model_name, config.seed).to(device)
        methods = {name: FACTORIES[name](model, layer, size, config.compile_options) for name in config.methods}
        for batch in config.batches:
            x, target = _inputs(model, batch, size, config.seed)
            expected = truth(model, layer, x, target)
            row = {"model": model_name, "layer": layer, "size": size, "batch": batch, "methods": {}}
            warm = warm_up(methods, x, target, config.warmup)
            times = time_interleaved(methods, x, target, 0, config.rounds)
            for name, method in methods.items():
                row["methods"][name] = {
                    "median_s": statistics.median(times[name]), "min_s": min(times[name]), "max_s": max(times[name]),
                    # a static exported or compiled graph saves nothing through autograd (see peak RSS/CUDA)
                    "saved_bytes": None if name == "gs_exported" or name in COMPILED_METHODS
                    else saved_bytes(method, x, target),
                    "deviation": None if name == "plain" else deviation(method(x, target), expected),
                    **warm[name],
                }
            if batch == config.rss_batch and config.rss_repeats:
                for name in [m for m in methods if m in config.rss_methods]:
                    samples = [peak_rss_delta(model_name, layer, size, name, batch, config.seed)
                               for _ in range(config.rss_repeats)]
                    row["methods"][name]["peak_rss_mib"] = statistics.median(samples)
            _add_ratios(row)
            rows.append(row)
            partial({"machine": machine(config.device), "config": asdict(config), "rows": rows})
            log(f"{model_name} batch {batch}: " + ", ".join(
                f"{n} {m['median_s'] * 1000:.0f} ms ({m['time_ratio']:.2f}x)" for n, m in row["methods"].items()))
    results = {"machine": machine(config.device), "config": asdict(config), "rows": rows}
    if config.conversion:
        results["conversion_s"] = conversion_times(CONVERSION_MODELS)
    return results


def _add_ratios(row: dict) -> None:
    """Time, saved bytes and peak memory as multiples of the eager plain gradient's; a compiled method's peak
    CUDA memory and ``compiled_ratio`` (time) as multiples of the compiled plain gradient's when it ran."""
    methods = row["methods"]
    floor, compiled_floor = methods.get("plain"), methods.get("plain_compiled")
    for name, entry in methods.items():
        entry["time_ratio"] = entry["median_s"] / floor["median_s"] if floor else float("nan")
        known = floor and floor["saved_bytes"] and entry["saved_bytes"] is not None
        entry["saved_ratio"] = entry["saved_bytes"] / floor["saved_bytes"] if known else None
        if floor and "peak_rss_mib" in entry and floor.get("peak_rss_mib"):
            entry["rss_ratio"] = entry["peak_rss_mib"] / floor["peak_rss_mib"]
        memory_floor = compiled_floor if name in COMPILED_METHODS and compiled_floor else floor
        if memory_floor and "peak_cuda_mib" in entry and memory_floor.get("peak_cuda_mib"):
            entry["cuda_ratio"] = entry["peak_cuda_mib"] / memory_floor["peak_cuda_mib"]
        if name in COMPILED_METHODS and compiled_floor:
            entry["compiled_ratio"] = entry["median_s"] / compiled_floor["median_s"]


def machine(device: str = "cpu") -> dict:
    info = {"cpu": _cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "date": time.strftime("%Y-%m-%d"), "device": device}
    if torch.device(device).type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(torch.device(device)), cuda=torch.version.cuda,
                    tf32=torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def _where(m: dict) -> str:
    """The device a result was measured on, in words."""
    if m.get("gpu"):
        return f"{m['gpu']} (CUDA {m.get('cuda')}, TF32 {'on' if m.get('tf32') else 'off'}), host {m['cpu']}"
    return f"{m['cpu']}, {m['cores']} cores ({m['threads']} torch threads)"


def to_markdown(results: dict) -> str:
    m, on_gpu = results["machine"], bool(results["machine"].get("gpu"))
    options = results["config"].get("compile_options") or {}
    lines = [f"Measured on {_where(m)}, torch {m['torch']}, {m['date']}. Time: median of {results['config']['rounds']} "
             "interleaved rounds" + (", each call between CUDA synchronisations" if on_gpu else "") + ". Ratios are "
             "to the plain gradient. Deviation: max relative deviation of the method's guided map from the true one."
             + (f" Compiled methods: torch.compile({_options_text(options)}); first call: compile included." if any(
                 n in COMPILED_METHODS for n in results["config"]["methods"]) else ""), ""]
    memory = "| peak CUDA Δ MiB | × plain CUDA |" if on_gpu else "| peak RSS Δ MiB | × plain RSS |"
    header = ("| model | batch | method | median ms | min–max ms | × plain time | saved MiB | × plain saved "
              + memory + " deviation | first call s |")
    lines += [header, "|---" * (header.count("|") - 1) + "|"]
    for row in results["rows"]:
        for name, e in row["methods"].items():
            key = "cuda" if on_gpu else "rss"
            peak = f"{e[f'peak_{key}_mib']:.0f}" if f"peak_{key}_mib" in e else ""
            peak_ratio = f"{e[f'{key}_ratio']:.2f}" if f"{key}_ratio" in e else ""
            saved_ratio = f"{e['saved_ratio']:.3f}" if e["saved_ratio"] is not None else ""
            dev = "" if e["deviation"] is None else f"{e['deviation']:.1e}"
            first = f"{e['first_call_s']:.1f}" if "first_call_s" in e else ""
            lines.append(f"| {row['model']} | {row['batch']} | {name} | {e['median_s'] * 1000:.1f} | "
                         f"{e['min_s'] * 1000:.1f}–{e['max_s'] * 1000:.1f} | {e['time_ratio']:.2f} | "
                         f"{'n/a' if e['saved_bytes'] is None else format(e['saved_bytes'] / 2 ** 20, '.1f')} | "
                         f"{saved_ratio} | {peak} | {peak_ratio} | {dev} | {first} |")
    if "conversion_s" in results:
        lines += ["", "| model | gs.convert seconds |", "|---|---|"]
        lines += [f"| {name} | {seconds:.3f} |" for name, seconds in results["conversion_s"].items()]
    lines += ["", "Methods:"] + [f"- `{k}`: {v}" for k, v in DESCRIPTIONS.items()
                                 if k in results["config"]["methods"]]
    return "\n".join(lines) + "\n"


def _options_text(options: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items())


WRONG_ABOVE = 1e-3  # a map that deviates more than this from the true one is marked wrong


def readme_table(results: dict) -> str:
    """The README's summary: per model and batch, the plain gradient's time and every method's ratio to it,
    **wrong** beside a map that is not the true guided map, and (GPU) the peak-memory ratios of all maps."""
    m, on_gpu = results["machine"], bool(results["machine"].get("gpu"))
    names = [n for n in results["config"]["methods"] if n != "plain"]
    extra = ["gs_all_compiled ÷ plain_compiled", "gs_all mem", "gs_all_compiled mem"] if on_gpu else []
    header = "| model | batch | plain ms | " + " | ".join(names + extra) + " |"
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for row in results["rows"]:
        methods = row["methods"]
        cells = [_ratio_cell(methods[n]) if n in methods else "" for n in names]
        if on_gpu:
            cells += [_number(methods.get("gs_all_compiled", {}).get("compiled_ratio"))]
            cells += [_number(methods.get(n, {}).get("cuda_ratio")) for n in ("gs_all", "gs_all_compiled")]
        plain = f"{methods['plain']['median_s'] * 1000:.1f}" if "plain" in methods else ""
        lines.append(f"| {row['model']} | {row['batch']} | {plain} | " + " | ".join(cells) + " |")
    options = results["config"].get("compile_options") or {}
    compiled = any(n in COMPILED_METHODS for n in names)
    lines += ["", f"Time as a multiple of the eager plain input gradient's (forward + one backward), median of "
                  f"{results['config']['rounds']} interleaved rounds; {_where(m)}; torch {m['torch']}; {m['date']}."
              + (f" `*_compiled`: torch.compile({_options_text(options)})." if compiled else "")
              + (" mem: peak CUDA memory as a multiple of the plain gradient's (eager) or the compiled plain "
                 "gradient's (compiled)." if on_gpu else "")
              + " **wrong**: the map deviates from the true guided map by that much."]
    return "\n".join(lines) + "\n"


def _number(ratio: Optional[float]) -> str:
    return "" if ratio is None else f"{ratio:.2f}×"


def _ratio_cell(entry: dict) -> str:
    cell = f"{entry['time_ratio']:.2f}×"
    if entry.get("deviation") is not None and entry["deviation"] > WRONG_ABOVE:
        cell += f" **wrong ({entry['deviation']:.0%})**"
    return cell


def write(results: dict, directory: str) -> Tuple[str, ...]:
    """``results.{json,md}`` (CPU) or ``results_gpu.{json,md}`` and ``readme_gpu.md`` (GPU), written atomically."""
    os.makedirs(directory, exist_ok=True)
    stem = "results_gpu" if results["machine"].get("gpu") else "results"
    outputs = {f"{stem}.json": json.dumps(results, indent=1), f"{stem}.md": to_markdown(results)}
    if results["machine"].get("gpu"):
        outputs["readme_gpu.md"] = readme_table(results)
    paths = []
    for name, text in outputs.items():
        path = os.path.join(directory, name)
        with atomic_write(path, suffix=os.path.splitext(name)[1]) as temporary:
            with open(temporary, "w") as handle:
                handle.write(text)
        paths.append(path)
    return tuple(paths)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="guided-swap bench", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    parser.add_argument("--models", nargs="*", help="NAME:LAYER:SIZE entries (default: resnet50, vgg16, densenet121, googlenet)")
    parser.add_argument("--batches", nargs="*", type=int, help="default: 1 16 on the CPU, 1 32 128 on a GPU")
    parser.add_argument("--methods", nargs="*", choices=ALL_METHODS,
                        help="default: the eager methods on the CPU (compiling takes minutes there), all on a GPU")
    parser.add_argument("--compile-mode", help="torch.compile mode of the *_compiled methods "
                                               "(default: reduce-overhead on a GPU, torch's default on the CPU)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, help="warm-up calls per method (default: 1 on the CPU, 3 on a GPU: "
                                                   "compile, CUDA-graph warm-up, recording)")
    parser.add_argument("--rss-repeats", type=int, help="default: 3 on the CPU, 0 on a GPU")
    parser.add_argument("--rss-methods", nargs="*", default=list(Config.rss_methods), choices=ALL_METHODS)
    parser.add_argument("--no-conversion", action="store_true")
    parser.add_argument("--no-isolate", action="store_true", help="run all models in this one process")
    parser.add_argument("--merge", nargs="*", metavar="RESULTS_JSON", help="also include rows of earlier runs")
    parser.add_argument("--rss-probe", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_probe:
        name, layer, size, method, batch, seed = args.rss_probe
        _rss_probe(name, layer, int(size), method, int(batch), int(seed))
        return 0
    _fill_device_defaults(args)
    models = DEFAULT_MODELS if not args.models else [_model_spec(spec) for spec in args.models]
    config = Config(models=models, batches=args.batches, methods=args.methods, rounds=args.rounds, warmup=args.warmup,
                    rss_repeats=args.rss_repeats, rss_batch=max(args.batches), rss_methods=args.rss_methods,
                    conversion=not args.no_conversion, device=args.device,
                    compile_options={"mode": args.compile_mode} if args.compile_mode else {})
    earlier = [json.load(open(path)) for path in args.merge or []]
    if len(models) > 1 and not args.no_isolate:
        results = _run_isolated(args, models)
        if config.conversion:
            results["conversion_s"] = conversion_times(CONVERSION_MODELS)
    else:
        results = run(config, log=lambda line: print(line, flush=True), partial=lambda r: write(r, args.out))
    results = merge(earlier + [results]) if earlier else results
    for path in write(results, args.out):
        print("wrote", path)
    return 0


def _fill_device_defaults(args) -> None:
    on_gpu = torch.device(args.device).type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device here")
    if args.batches is None:
        args.batches = list(DEFAULT_GPU_BATCHES if on_gpu else (1, 16))
    if args.methods is None:
        args.methods = list(ALL_METHODS if on_gpu else EAGER_METHODS)
    if args.compile_mode is None and on_gpu:
        args.compile_mode = "reduce-overhead"
    if args.warmup is None:
        args.warmup = 3 if on_gpu else 1
    if args.rss_repeats is None:
        args.rss_repeats = 0 if on_gpu else 3


def merge(parts: Sequence[dict]) -> dict:
    """One result from several runs (each model in its own process, or a run resumed after a failure)."""
    merged = {"machine": parts[0]["machine"], "config": dict(parts[0]["config"]), "rows": []}
    for part in parts:
        merged["rows"] += part["rows"]
        if "conversion_s" in part:
            merged["conversion_s"] = part["conversion_s"]
    merged["config"]["models"] = [[r["model"], r["layer"], r["size"]] for r in merged["rows"]]
    return merged


def _run_isolated(args, models) -> dict:
    """Each model in a process of its own: one process holding every method's copy of every model (and the
    allocator's high-water marks from batch 16) ran a 24 GB machine out of memory."""
    parts = []
    for name, layer, size in models:
        with tempfile.TemporaryDirectory() as directory:
            command = [sys.executable, "-m", "guided_swap.checks.benchmark", "--no-isolate", "--no-conversion",
                       "--models", f"{name}:{layer}:{size}", "--out", directory, "--rounds", str(args.rounds),
                       "--warmup", str(args.warmup), "--rss-repeats", str(args.rss_repeats),
                       "--batches", *map(str, args.batches), "--methods", *args.methods,
                       "--rss-methods", *args.rss_methods, "--device", args.device]
            command += ["--compile-mode", args.compile_mode] if args.compile_mode else []
            subprocess.run(command, check=True)
            stem = "results_gpu" if torch.device(args.device).type == "cuda" else "results"
            with open(os.path.join(directory, f"{stem}.json")) as handle:
                parts.append(json.load(handle))
        write(merge(parts), args.out)
    return merge(parts)


def _model_spec(spec: str) -> Tuple[str, str, int]:
    parts = spec.split(":")
    if len(parts) != 3 or not parts[2].isdigit():
        raise SystemExit(f"--models takes NAME:LAYER:SIZE, e.g. resnet50:layer4:224; got {spec!r}")
    return parts[0], parts[1], int(parts[2])


if __name__ == "__main__":
    sys.exit(main())
