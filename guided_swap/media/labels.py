"""Class names and input preprocessing: from a labels file, a torchvision weights enum or a timm model's config.

Only metadata is read: nothing is downloaded, and no weights are needed.

>>> import torchvision
>>> weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
>>> class_names(weights)[:2]
['tench', 'goldfish']
>>> preprocessing(weights)
{'resize': 256, 'crop': 224, 'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225), 'channels': 3}
"""
import math
import os
from typing import List, Optional

from torch import nn
from torchvision.models import WeightsEnum, get_weight

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def read_labels(path: str) -> List[str]:
    """Class names from a text file, one per line: line ``i + 1`` names class ``i``.

    Surrounding spaces and trailing empty lines are dropped; an empty line inside the list is an error (it
    would shift every later name by one).

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "labels.txt")
    >>> _ = open(path, "w").write("cat\\ndog\\n")
    >>> read_labels(path)
    ['cat', 'dog']
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no labels file at {path!r} (expected a text file with one class name per line)")
    try:
        with open(path, encoding="utf-8-sig") as handle:
            text = handle.read()
    except UnicodeDecodeError:
        raise ValueError(f"labels file {path!r} is not UTF-8 text (expected one class name per line)") from None
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise ValueError(f"labels file {path!r} is empty (expected one class name per line)")
    if names[0][:1] in ("[", "{"):
        raise ValueError(f"labels file {path!r} looks like JSON; write one class name per line instead")
    blank = [number for number, name in enumerate(names, start=1) if not name]
    if blank:
        raise ValueError(f"labels file {path!r} has an empty line at line {blank[0]}: every line names one class, "
                         "in class order, so an empty line would shift the names after it")
    return names


def check_labels(names: List[str], num_classes: int, source: str = "labels") -> List[str]:
    """``names`` if it has exactly one name per class; otherwise a ValueError saying both counts.

    >>> check_labels(["cat", "dog"], 2)
    ['cat', 'dog']
    """
    if len(names) != num_classes:
        raise ValueError(f"{source} has {len(names)} names but the model has {num_classes} classes")
    return names


def class_names(source) -> Optional[List[str]]:
    """The class names a model's metadata declares, or None when it declares none.

    ``source``: a torchvision weights enum member (or its name, ``"ResNet50_Weights.DEFAULT"``): its
    ``meta["categories"]``; a timm model or its ``pretrained_cfg`` dict: ``label_names`` when the config has
    them, else the ImageNet names timm infers from the number of classes (the first lemma of each synset).
    Any other ``nn.Module`` declares none.
    """
    weights = _torchvision_weights(source)
    if weights is not None:
        categories = weights.meta.get("categories")
        return list(categories) if categories else None
    config = _timm_config(source)
    if config is not None:
        return _timm_names(source, config)
    return _no_metadata(source)


def preprocessing(source) -> dict:
    """The input preprocessing a model's metadata declares, as :func:`guided_swap.media.images.load_image` keywords:
    ``{"resize", "crop", "mean", "std", "channels"}`` (shorter side resized, then a centre crop).

    ``source``: a torchvision weights enum member or name (its ``transforms()``), or a timm model or
    ``pretrained_cfg`` (timm's ``resolve_data_config``; ``resize = floor(crop / crop_pct)``). A model that
    declares nothing raises ValueError: pass mean and std yourself.
    """
    weights = _torchvision_weights(source)
    if weights is not None:
        return _torchvision_preprocessing(weights)
    config = _timm_config(source)
    if config is not None:
        return _timm_preprocessing(source, config)
    _no_metadata(source)
    raise ValueError(f"{type(source).__name__} declares no preprocessing (it is neither a torchvision weights enum "
                     "nor a timm model): give mean, std and sizes yourself")


def _no_metadata(source) -> None:
    if isinstance(source, nn.Module):
        return None
    raise TypeError(f"expected a torchvision weights enum (or its name), a timm model or its pretrained_cfg dict, "
                    f"or an nn.Module; got {type(source).__name__}")


def _torchvision_weights(source):
    """The torchvision weights enum member ``source`` is or names; None for anything else."""
    if isinstance(source, WeightsEnum):
        return source
    if isinstance(source, str):
        try:
            return get_weight(source)
        except (ValueError, KeyError, AttributeError):
            raise ValueError(f"{source!r} is not a torchvision weights name; names look like "
                             "'ResNet50_Weights.IMAGENET1K_V2' or 'ResNet50_Weights.DEFAULT'") from None
    return None


def _torchvision_preprocessing(weights) -> dict:
    transform = weights.transforms()
    sizes = [getattr(transform, name, None) for name in ("resize_size", "crop_size", "mean", "std")]
    if any(size is None for size in sizes):
        raise ValueError(f"{weights} has no image-classification transforms (resize, crop, mean, std)")
    resize, crop, mean, std = sizes
    return {"resize": int(resize[0]), "crop": int(crop[0]), "mean": tuple(float(v) for v in mean),
            "std": tuple(float(v) for v in std), "channels": 3}


def _timm_config(source) -> Optional[dict]:
    if isinstance(source, dict):
        return source
    config = getattr(source, "pretrained_cfg", None)
    return config if isinstance(config, dict) else None


def _timm_names(source, config: dict) -> Optional[List[str]]:
    if config.get("label_names"):
        return list(config["label_names"])
    try:  # optional: timm is a dev dependency, only needed for timm models
        from timm.data import ImageNetInfo, infer_imagenet_subset
    except ImportError:
        return None
    subset = infer_imagenet_subset(source)
    if subset is None:
        return None
    return [description.split(",")[0].strip() for description in ImageNetInfo(subset).label_descriptions()]


def _timm_preprocessing(source, config: dict) -> dict:
    try:  # optional: timm is a dev dependency, only needed for timm models
        from timm.data import resolve_data_config
    except ImportError:
        raise ValueError("reading a timm config needs timm installed (pip install timm)") from None
    if isinstance(source, dict):
        data = resolve_data_config({}, pretrained_cfg=config)
    else:
        data = resolve_data_config({}, model=source)
    channels, height, width = data["input_size"]
    if height != width:
        raise ValueError(f"timm config asks for a {height}x{width} input; load_image makes square crops only")
    crop_pct = data.get("crop_pct") or 0.875
    return {"resize": math.floor(height / crop_pct), "crop": int(height), "mean": tuple(float(v) for v in data["mean"]),
            "std": tuple(float(v) for v in data["std"]), "channels": int(channels)}
