"""Which timm models that use ReLU or ReLU6 torch.fx symbolic tracing cannot take, and where it fails.

Every model is built on the meta device (no weights are allocated) and traced with guided_swap's tracer.
One line per failing model: its name, the user-code line where fx stopped, and the error's first line.

    python benchmarks/fx_failures_timm.py [--all-variants] [--modules vgg,nfnet]
"""
import argparse
import sys
import time
import warnings

import timm
import torch
from torch import nn

from guided_swap.capture.graph import trace as trace_module
from guided_swap.capture.graph.export_trace import fx_failure_site

# Families of transformers / MLP-mixers are left out: the question is which ReLU CNNs need the export path.
SKIP_MODULES = {
    "beit", "cait", "coat", "convit", "crossvit", "davit", "deepseek_vit", "deit", "eva", "gemma4_vit", "hiera",
    "hieradet_sam2", "mlp_mixer", "mvitv2", "naflexvit", "pit", "pvt_v2", "qwen3_vit", "swin_transformer",
    "swin_transformer_v2", "swin_transformer_v2_cr", "tnt", "twins", "vision_transformer",
    "vision_transformer_relpos", "vision_transformer_sam", "volo", "xcit", "nest", "sequencer", "gcvit",
}


def uses_relu(model: nn.Module) -> bool:
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            return True
        if isinstance(module, nn.Hardtanh) and module.min_val == 0 and module.max_val == 6:
            return True
    return False


def model_names(modules, all_variants: bool):
    names = []
    for module in modules:
        found = timm.list_models(module=module)
        names.extend(found if all_variants else found[:1] + [n for n in found[1:] if "tiny" in n or "small" in n][:1])
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all-variants", action="store_true", help="every model name, not one or two per family")
    parser.add_argument("--modules", default="", help="comma-separated timm module names (default: all CNN families)")
    args = parser.parse_args(argv)
    modules = args.modules.split(",") if args.modules else [m for m in timm.list_modules() if m not in SKIP_MODULES]
    relu_models, failures = 0, []
    for name in model_names(modules, args.all_variants):
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = timm.create_model(name, pretrained=False).eval()
        except Exception as error:  # a model that cannot be built is not our question
            print(f"# {name}: not built ({type(error).__name__})", file=sys.stderr)
            continue
        if not uses_relu(model):
            continue
        relu_models += 1
        start = time.perf_counter()
        try:
            trace_module.trace(model)
        except Exception as error:
            cause = error.__cause__ or error
            first = str(cause).strip().splitlines()[0][:100] if str(cause).strip() else ""
            failures.append(name)
            print(f"FAIL {name}: {fx_failure_site(cause)}: {type(cause).__name__}: {first}", flush=True)
        else:
            print(f"ok   {name} ({time.perf_counter() - start:.1f} s)", flush=True)
    print(f"{relu_models} ReLU models, fx failed on {len(failures)}: {', '.join(failures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
