"""What the command line's ``--model`` and ``--weights`` name, read into a model with its class names and
preprocessing.

``--model``: a torchvision name (``resnet50``), ``package.module:factory`` (called with no arguments) or
``demo`` (the bundled face/non-face CNN). ``--weights``: a checkpoint file or a torchvision weights name
(``DEFAULT``, ``IMAGENET1K_V1``, ``ResNet50_Weights.IMAGENET1K_V2``). A checkpoint may be

- a state dict, with or without a ``module.`` (DataParallel) or ``_orig_mod.`` (torch.compile) prefix;
- a dict wrapping one under ``state_dict``, ``model``, ``model_state_dict``, ``net``, ``ema``...;
- a ``.safetensors`` file;
- a whole pickled model (``torch.save(model)``), with ``--model`` left out: unpickling it runs code from the
  file, so it is loaded only with ``--trust-weights`` (``trust=True`` here), and when its class can be imported.

A state dict is read with ``torch.load(weights_only=True)``, which rebuilds tensors and plain containers and
nothing else; the plain-data classes training scripts save beside the weights (``argparse.Namespace``, numpy
scalars) are added to what it rebuilds, their contents still checked the same way. A file that ``weights_only``
refuses (it holds other Python objects) is never retried unsafely on its own: it is refused with a message,
unless ``--trust-weights`` says the file is trusted.

Everything that can be checked without building the model (an unknown name, a missing file) is checked by
:func:`check`, so a usage error comes before the model is loaded.

>>> check("resnet19")
Traceback (most recent call last):
...
guided_swap.core.errors.CommandError: unknown model 'resnet19' (did you mean resnet18, resnet152, resnet101?); use a torchvision name (guided-swap explain --help) or package.module:factory
"""
import argparse
import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import os
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torchvision
from safetensors.torch import load_file as load_safetensors
from torch import nn

from ..checks import demo
from ..core.errors import CommandError
from ..media import labels
from ..media.labels import IMAGENET_MEAN, IMAGENET_STD
from ..run.saved import HEADER

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module", "ema", "model_ema",
                "state_dict_ema")
PREFIXES = ("module.", "_orig_mod.", "model.")
RANDOM_SEED = 0


@dataclass
class Preprocessing:
    """How an image becomes the model's input: shorter side to ``resize``, centre crop ``crop``, normalise."""

    resize: int = 256
    crop: int = 224
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    source: str = "ImageNet defaults"


@dataclass
class Source:
    """What ``--model``/``--weights`` name, resolved without building anything (see :func:`check`)."""

    model: Optional[str]
    weights: Optional[str]
    kind: str  # "torchvision", "factory", "demo", "pickled" (whole model in the weights file)
    weights_kind: str  # "file", "enum", "random", "bundled"
    weights_sha256: Optional[str] = None
    weights_url: Optional[str] = None
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    categories: Optional[List[str]] = None
    trust: bool = False  # --trust-weights: the weights file may be unpickled (that runs code from the file)

    def settings(self) -> Dict[str, Any]:
        """The part of a run's settings that says which model made a result."""
        weights = self.weights if self.weights_kind in ("file", "enum") else self.weights_kind
        if self.weights_kind == "random":
            weights = f"random (seed {RANDOM_SEED})"
        return {"model": self.model if self.kind != "pickled" else "whole model in the weights file",
                "weights": weights, "weights_sha256": self.weights_sha256, "weights_url": self.weights_url}


def _torchvision_names() -> List[str]:
    return torchvision.models.list_models()


def _did_you_mean(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _enum_weights(model: str, name: str):
    """The torchvision weights enum entry ``name`` names for ``model``, or None."""
    try:
        enum = torchvision.models.get_model_weights(model)
    except (ValueError, KeyError):
        return None
    member = name.split(".", 1)[1] if name.startswith(enum.__name__ + ".") else name
    return enum.__members__.get(member)


def _enum_preprocessing(weights) -> Preprocessing:
    try:
        declared = labels.preprocessing(weights)
    except ValueError:  # weights without image-classification transforms
        return Preprocessing()
    return Preprocessing(declared["resize"], declared["crop"], declared["mean"], declared["std"], f"{weights} transforms")


def _class_names(weights) -> Optional[List[str]]:
    return labels.class_names(weights)


def check(model: Optional[str], weights: Optional[str] = None, trust: bool = False) -> Source:
    """Resolve ``--model``/``--weights`` without building the model: usage errors come here, early. ``trust``
    (``--trust-weights``) allows unpickling the weights file, which runs code from it."""
    if model is None:
        if weights is None:
            raise CommandError("--model is required (a torchvision name, package.module:factory or demo), unless "
                               "--weights holds a whole pickled model (with --trust-weights)")
        if not os.path.isfile(weights):
            raise CommandError(f"no weights file at {weights!r}")
        if not trust:
            raise CommandError(f"without --model, --weights {weights} must be a whole pickled model, and unpickling "
                               "it runs code from the file: pass --trust-weights if you trust where it came from, or "
                               "name the architecture with --model and give a state dict")
        return Source(None, weights, "pickled", "file", sha256(weights), trust=True)
    if model == "demo":
        if weights is not None:
            raise CommandError("--model demo comes with its own weights; leave out --weights")
        stats = demo.checkpoint()
        return Source("demo", None, "demo", "bundled", sha256(demo.WEIGHTS),
                      preprocessing=Preprocessing(demo.SIZE, demo.SIZE, (stats["mean"],), (stats["std"],),
                                                  "the demo checkpoint"),
                      categories=list(demo.CLASSES))
    if ":" in model:
        kind = "factory"
        module_name = model.partition(":")[0]
        if importlib.util.find_spec(module_name.split(".")[0]) is None:
            raise CommandError(f"cannot load model factory {model!r}: no module named {module_name.split('.')[0]!r}")
    else:
        kind = "torchvision"
        names = _torchvision_names()
        if model not in names:
            raise CommandError(f"unknown model {model!r}{_did_you_mean(model, names)}; use a torchvision name "
                               "(guided-swap explain --help) or package.module:factory")
    if weights is None:
        return Source(model, None, kind, "random")
    if os.path.isfile(weights):
        return Source(model, weights, kind, "file", sha256(weights), trust=trust)
    enum = _enum_weights(model, weights) if kind == "torchvision" else None
    if enum is not None:
        return Source(model, str(enum), kind, "enum", weights_url=enum.url, preprocessing=_enum_preprocessing(enum),
                      categories=_class_names(enum))
    hint = " or a torchvision weights name (DEFAULT, IMAGENET1K_V1, ...)" if kind == "torchvision" else ""
    raise CommandError(f"no weights file at {weights!r}; --weights takes a checkpoint file{hint}")


def _stderr(message: str) -> None:
    print(f"guided-swap: warning: {message}", file=sys.stderr)


def build(source: Source, say: Callable[[str], None] = _stderr) -> nn.Module:
    """The model ``source`` names, weights loaded, in eval mode. Random weights are seeded (the same on every
    run and every rank) and announced through ``say``, as is loading a pickled model."""
    if source.kind == "demo":
        return demo.load_demo()[0]
    if source.kind == "pickled":
        content = read_checkpoint(source.weights, say, trust=source.trust)
        if not isinstance(content, nn.Module):
            raise CommandError(f"{source.weights!r} holds a state dict, not a whole model; name the architecture "
                               "with --model")
        return content.eval()
    if source.weights_kind == "enum":
        return _torchvision_with_enum(source)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model = _architecture(source.model, source.kind)
    if source.weights_kind == "random":
        say(f"{source.model} has random weights (seed {RANDOM_SEED}); pass --weights FILE for a trained model")
        return model.eval()
    checkpoint = read_checkpoint(source.weights, say, trust=source.trust)
    if isinstance(checkpoint, nn.Module):
        raise CommandError(f"{source.weights!r} holds a whole pickled model ({type(checkpoint).__name__}); "
                           "leave out --model to use it as it is")
    load_weights(model, checkpoint, source.weights, source.model)
    return model.eval()


def _architecture(spec: str, kind: str) -> nn.Module:
    if kind == "factory":
        module_name, _, factory_name = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), factory_name)
        except (ImportError, AttributeError) as error:
            raise CommandError(f"cannot load model factory {spec!r}: {error}") from None
        model = factory()
    else:
        model = torchvision.models.get_model(spec, weights=None)
    if not isinstance(model, nn.Module):
        raise CommandError(f"{spec!r} did not give a torch.nn.Module but a {type(model).__name__}")
    return model


def _torchvision_with_enum(source: Source) -> nn.Module:
    try:
        return torchvision.models.get_model(source.model, weights=source.weights.split(".", 1)[1]).eval()
    except OSError as error:  # URLError and friends: no internet, no cached copy
        raise CommandError(f"could not get {source.weights} from {source.weights_url}: {error}; download it "
                           f"where there is internet into {torch.hub.get_dir()}/checkpoints, or pass "
                           "--weights FILE") from None


def read_checkpoint(path: str, say: Callable[[str], None] = _stderr, trust: bool = False) -> Any:
    """A checkpoint file's content: a state dict (unwrapped, prefixes not yet stripped) or a whole model.

    It is read with ``weights_only=True``; a file that this refuses is unpickled only when ``trust`` is True
    (``--trust-weights``), and refused otherwise: unpickling runs code from the file.
    """
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    try:
        with _data_classes():
            content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only refused a class: a whole model, or other objects
        if not trust:
            raise CommandError(_refused_message(path, error)) from None
        content = _read_pickled(path, say)
    except Exception as error:  # noqa: BLE001 -- weights_only runs no code: any other error is a file torch cannot read
        if isinstance(error, (KeyboardInterrupt, MemoryError)):
            raise
        if _is_saved_explainer(path):
            raise CommandError(f"{path!r} is a saved guided_swap explainer (ex.save), not a checkpoint: open it with "
                               "gs.load(path) in Python; --weights takes a state dict or a .safetensors file") from None
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if not isinstance(error, (RuntimeError, EOFError, OSError)):  # the unpickler tripped over bytes it does not know
            reason = f"not a file torch.save writes ({type(error).__name__}: {reason})"
        raise CommandError(f"cannot read {path!r} as a PyTorch checkpoint: {reason}") from None
    return _unwrap(content, path)


def _is_saved_explainer(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return HEADER in archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def _data_classes():
    """``torch.load(weights_only=True)`` also taking the plain-data classes training scripts save beside the
    weights: the run's ``argparse.Namespace`` (torchvision's reference scripts, timm) and numpy scalars and dtypes
    (metrics). Their contents still go through the same restricted unpickler; nothing else is added."""
    safe = getattr(torch.serialization, "safe_globals", None)
    if safe is None:  # an older torch: its own weights_only list only
        return contextlib.nullcontext()
    classes = [argparse.Namespace]
    try:
        multiarray = getattr(np, "_core", None) or np.core
        classes += [multiarray.multiarray.scalar, np.dtype]
        dtypes = vars(getattr(np, "dtypes", object)).values()
        classes += [c for c in dtypes if isinstance(c, type) and issubclass(c, np.dtype)]
    except (ImportError, AttributeError):
        pass
    return safe(classes)


def _refused_message(path: str, error: Exception) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    what = f" (it names {found.group(1)})" if found else ""
    return (f"{path!r} holds pickled Python objects besides tensors{what}, which torch.load(weights_only=True) "
            "refuses: unpickling them runs code from the file. If you trust where it came from, pass --trust-weights "
            "(for a whole pickled model also leave out --model); otherwise save model.state_dict() (or a "
            ".safetensors file) and load that")


def _read_pickled(path: str, say: Callable[[str], None]) -> Any:
    say(f"{path} holds pickled Python objects; --trust-weights was given, so it is unpickled, which runs code from "
        "the file")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (AttributeError, ImportError) as error:
        raise CommandError(
            f"{path!r} holds a whole pickled model whose class cannot be imported here ({error}); make the module "
            "that defines it importable (PYTHONPATH), or save model.state_dict() instead and name the architecture "
            "with --model") from None
    except (pickle.UnpicklingError, EOFError, KeyError, IndexError, ValueError, TypeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CommandError(f"cannot read {path!r} as a PyTorch checkpoint ({type(error).__name__}: {reason})") from None


def _unwrap(content: Any, path: str) -> Any:
    for _ in range(4):
        if isinstance(content, nn.Module):
            return content
        if not isinstance(content, Mapping):
            raise CommandError(f"{path!r} holds a {type(content).__name__}, not a state dict or a model")
        if content and all(isinstance(v, torch.Tensor) for v in content.values()):
            return dict(content)
        inner = next((content[k] for k in WRAPPER_KEYS if isinstance(content.get(k), (Mapping, nn.Module))), None)
        if inner is None:
            keys = ", ".join(repr(k) for k in list(content)[:8])
            raise CommandError(f"{path!r} is a dict with keys {keys} but none holds a state dict (looked for "
                               f"{', '.join(WRAPPER_KEYS)})")
        content = inner
    raise CommandError(f"{path!r}: state dict nested too deep")


def strip_prefixes(state: Dict[str, torch.Tensor], wanted: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Drop ``module.``-style prefixes that every key carries and the model's own keys do not.

    >>> sorted(strip_prefixes({"module.fc.weight": 1, "module.fc.bias": 2}, ["fc.weight", "fc.bias"]))
    ['fc.bias', 'fc.weight']
    """
    wanted = set(wanted)
    changed = True
    while changed and state and not set(state) & wanted:
        changed = False
        for prefix in PREFIXES:
            if all(key.startswith(prefix) for key in state):
                state = {key[len(prefix):]: value for key, value in state.items()}
                changed = True
                break
    return state


def load_weights(model: nn.Module, state: Dict[str, torch.Tensor], path: str, name: str) -> None:
    """Load ``state`` into ``model``; a mismatch names the first missing, unexpected and misshapen keys."""
    own = model.state_dict()
    state = strip_prefixes(state, list(own))
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshapen = [f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})" for k in own
                 if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = [f"{len(keys)} {what} key(s), first: {', '.join(keys[:3])}"
                for keys, what in ((missing, "missing"), (unexpected, "unexpected"), (misshapen, "misshapen")) if keys]
    if problems:
        raise CommandError(f"weights {path!r} do not fit {name}: " + "; ".join(problems))
    model.load_state_dict(state)
