"""Loading images as model inputs: the usual ImageNet resize, centre crop and normalisation, configurable.

Files are shown the way a phone or a viewer shows them (EXIF orientation applied). An image smaller than the
model's input is upsampled with a warning that names its size: its maps show the upsampling, not detail.
:func:`guided_swap.media.labels.preprocessing` gives the keywords a torchvision or timm model declares.

>>> import numpy as np
>>> load_image(np.zeros((300, 400), dtype=np.uint16)).shape   # 16-bit grayscale, to 3 channels
torch.Size([3, 224, 224])
"""
import os
import warnings
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image
from skimage import io as skio
from skimage.transform import resize as sk_resize

from .labels import IMAGENET_MEAN, IMAGENET_STD

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")


def to_unit_float(image: np.ndarray) -> np.ndarray:
    """Any image array as float in [0, 1], (H, W, 3): grayscale is repeated, alpha is composited on white,
    integers are scaled by their type's range (8- and 16-bit alike)."""
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.float64)
    elif np.issubdtype(image.dtype, np.integer):
        image = image.astype(np.float64) / np.iinfo(image.dtype).max
    elif np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float64)
        if image.size and (image.min() < 0 or image.max() > 1):
            raise ValueError(f"a float image must lie in [0, 1]; got values in [{image.min():.3g}, {image.max():.3g}]")
    else:
        raise TypeError(f"unsupported image dtype {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"expected an (H, W), (H, W, 3) or (H, W, 4) image, got shape {image.shape}")
    if image.shape[-1] in (2, 4):  # with alpha: composite on white
        colour, alpha = image[..., :-1], image[..., -1:]
        image = colour * alpha + (1 - alpha)
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


EXIF_ORIENTATION = 0x0112


def read_image(path: str) -> np.ndarray:
    """Read an image file, turned upright by its EXIF orientation; a clear error names the file when it cannot
    be read."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no image file at {path!r}")
    mode, frames = _pil_mode(path)
    try:
        if mode in NOT_RGB:  # CMYK, Lab, HSV, YCbCr: read as is, their channels would be taken for RGB (K for alpha)
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
        else:
            pixels = skio.imread(path)
    except Exception as error:  # imageio/PIL raise many types for bad files
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"cannot read image {path!r}: {reason}") from None
    if frames > 1 and pixels.ndim >= 3 and pixels.shape[0] == frames:  # animated, or a stack of pages
        warnings.warn(f"{path}: {frames} frames (or pages); the first is explained", UserWarning, stacklevel=2)
        pixels = pixels[0]
    if np.issubdtype(pixels.dtype, np.signedinteger) or (
            np.issubdtype(pixels.dtype, np.integer) and pixels.dtype.itemsize > 2):
        raise ValueError(f"cannot read image {path!r}: its pixels are {pixels.dtype} (values {pixels.min()} to "
                         f"{pixels.max()}), whose range is not known; save it with 8 or 16 bits unsigned, or as floats "
                         "in [0, 1]")
    return apply_orientation(pixels, exif_orientation(path))


#: Pillow modes whose channels are not grey or RGB (with alpha): converted to RGB by Pillow.
NOT_RGB = frozenset({"CMYK", "LAB", "HSV", "YCbCr", "RGBX"})


def _pil_mode(path: str):
    """The Pillow mode and frame count of an image file; (None, 1) when Pillow does not open it."""
    try:
        with Image.open(path) as image:
            return image.mode, int(getattr(image, "n_frames", 1) or 1)
    except Exception:  # not an image Pillow reads (some TIFFs): imageio decides
        return None, 1


def exif_orientation(path: str) -> int:
    """The EXIF orientation tag of an image file (1..8), 1 (upright) when it has none or cannot say."""
    try:
        with Image.open(path) as image:
            value = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # not an image PIL reads (e.g. some TIFFs): no EXIF to apply
        return 1
    return int(value) if value in range(1, 9) else 1


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Turn an (H, W[, C]) array as EXIF ``orientation`` (1..8) says, the way viewers and ``PIL.ImageOps.
    exif_transpose`` do: 6 (a phone held upright) is a quarter turn clockwise.

    >>> a = np.arange(6).reshape(2, 3)
    >>> apply_orientation(a, 6).tolist()
    [[3, 0], [4, 1], [5, 2]]
    """
    turns = {1: lambda a: a, 2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud,
             5: lambda a: np.swapaxes(a, 0, 1), 6: lambda a: np.rot90(a, -1),
             7: lambda a: np.swapaxes(np.rot90(a, 2), 0, 1), 8: lambda a: np.rot90(a, 1)}
    if orientation not in turns:
        raise ValueError(f"EXIF orientation must be 1..8, got {orientation}")
    return np.ascontiguousarray(turns[orientation](image))


def load_image(path_or_array: Union[str, np.ndarray], resize: int = 256, crop: int = 224,
               mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
               channels: int = 3) -> torch.Tensor:
    """A (C, crop, crop) normalised tensor: shorter side resized to ``resize``, then a centre crop.

    ``resize=None`` skips resizing, ``crop=None`` skips cropping; ``channels=1`` gives a grey input.
    """
    name = path_or_array if isinstance(path_or_array, str) else "array"
    image = read_image(path_or_array) if isinstance(path_or_array, str) else path_or_array
    try:
        image = to_unit_float(image)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{name}: {error}") from None
    _warn_if_small(name, image.shape[:2], crop or resize)
    if resize is not None:
        h, w = image.shape[:2]
        scale = resize / min(h, w)
        image = sk_resize(image, (max(crop or 1, round(h * scale)), max(crop or 1, round(w * scale))), anti_aliasing=True)
    if crop is not None:
        h, w = image.shape[:2]
        if h < crop or w < crop:
            raise ValueError(f"{name}: image of size {h}x{w} is smaller than the crop {crop}; pass resize=")
        top, left = (h - crop) // 2, (w - crop) // 2
        image = image[top:top + crop, left:left + crop]
    if channels == 1:
        image = image.mean(axis=-1, keepdims=True)
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
    mean_t = torch.tensor(mean[:channels], dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std[:channels], dtype=torch.float32).view(-1, 1, 1)
    return (tensor - mean_t) / std_t


def _warn_if_small(name: str, size, model_size) -> None:
    height, width = size
    if model_size is not None and min(height, width) < model_size:
        warnings.warn(f"{name}: image is {height}x{width} pixels, smaller than the model's {model_size}x{model_size} "
                      f"input; it is upsampled {model_size / min(height, width):.1f}x, so its maps show the "
                      "upsampling rather than detail", UserWarning, stacklevel=3)


def find_images(paths: Sequence[str]):
    """Image files named or found (recursively, sorted) under directories; (path, relative name) pairs."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            for root, _, files in sorted(os.walk(path)):
                for file in sorted(files):
                    if file.lower().endswith(IMAGE_SUFFIXES):
                        full = os.path.join(root, file)
                        found.append((full, os.path.relpath(full, path)))
        else:
            found.append((path, os.path.basename(path)))
    return found
