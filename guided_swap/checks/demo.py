"""The offline demos: two small CNNs trained here on images that ship with scikit-image, weights in the package.

* **faces** (:func:`load_demo`, ``guided-swap demo``): faces against non-faces from ``lfw_subset``, 48 x 48 grey.
  The model calls ReLU the ways real code does (in-place ``nn.ReLU``, ``F.relu(..., inplace=True)``,
  ``Tensor.relu_``, and ``torch.relu`` in an MLP head after the last conv), so hook-based guided backprop gets
  it wrong and guided_swap does not. The source images are 25 x 25 pixels, so its pixel-level maps are coarse.
* **photos** (:func:`load_photos`, the worked example in ``docs/worked_example.md``): four classes (cat, coffee,
  rocket, astronaut) learnt from random crops of four colour photographs, explained at 128 px.

Training is seeded and deterministic (fixed thread count, deterministic algorithms): ``python -m
guided_swap.checks.demo --train`` rebuilds the shipped faces checkpoint bit for bit on the same torch and CPU, into a
new file.

>>> model, images, labels = load_demo()
>>> tuple(images.shape), labels[:2]
((8, 1, 48, 48), ['face', 'face'])
"""
import argparse
import contextlib
import functools
import os
import sys
from typing import Dict, Iterator, List, Tuple

import torch
import torch.nn.functional as F
from skimage import data
from torch import nn

from .._files import atomic_write
from ..media.labels import IMAGENET_MEAN, IMAGENET_STD
from ..media.viz import figure, save_png
from ..run.convert import convert

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")  # guided_swap/data
WEIGHTS = os.path.join(DATA, "demo_cnn.pt")
CLASSES = ("non-face", "face")
SIZE = 48
DEMO_INDICES = (3, 17, 42, 77, 105, 130, 161, 190)  # four faces, four non-faces
TRAIN_THREADS = 2  # the shipped checkpoints were trained with 2 threads; the thread count changes the sums' order

PHOTO_WEIGHTS = os.path.join(DATA, "photo_cnn.pt")
PHOTO_CLASSES = ("cat", "coffee", "rocket", "astronaut")
PHOTO_SOURCES = ("chelsea", "coffee", "rocket", "astronaut")  # scikit-image's names for the four photographs
PHOTO_CROP = 64
PHOTO_SIZE = 128


@contextlib.contextmanager
def deterministic(threads: int = TRAIN_THREADS) -> Iterator[None]:
    """Fixed intra-op threads and deterministic algorithms for the duration, restored afterwards."""
    previous_threads, previous_mode = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_mode)


def _save_new(payload: dict, path: str, overwrite: bool) -> str:
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; choose another path or pass overwrite=True (--overwrite)")
    with atomic_write(path, suffix=".pt") as temporary:
        torch.save(payload, temporary)
    return path


def largest_difference(path: str, reference: str) -> float:
    """The largest absolute difference between two checkpoints' weights (0.0: bit for bit the same)."""
    a = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(reference, map_location="cpu", weights_only=True)["state_dict"]
    if a.keys() != b.keys():
        raise ValueError(f"{path} and {reference} hold different models")
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


# --- faces -------------------------------------------------------------------------------------------------

class DemoCNN(nn.Module):
    """Three conv blocks and an MLP head; 1 x 48 x 48 grey input, 2 classes."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv3, self.bn3 = nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.act = nn.ReLU(inplace=True)
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, len(CLASSES))

    def forward(self, x):
        x = F.max_pool2d(self.act(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x)), inplace=True), 2)
        x = self.bn3(self.conv3(x)).relu_()
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def dataset() -> Tuple[torch.Tensor, torch.Tensor]:
    """All 200 images of ``skimage.data.lfw_subset()`` at 48 x 48 (raw [0, 1]) and labels (1 = face)."""
    faces = torch.from_numpy(data.lfw_subset()).float().unsqueeze(1)
    images = F.interpolate(faces, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    labels = torch.cat([torch.ones(100), torch.zeros(100)]).long()  # the first 100 are faces
    return images, labels


def train(path: str, seed: int = 0, epochs: int = 120, overwrite: bool = False) -> float:
    """Train the faces CNN deterministically and save it to ``path`` (a new file unless ``overwrite``);
    returns the held-out accuracy. With the defaults it rebuilds ``WEIGHTS`` exactly (same torch and CPU)."""
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; choose another path or pass overwrite=True (--overwrite)")
    with deterministic():
        torch.manual_seed(seed)
        images, labels = dataset()
        mean, std = float(images.mean()), float(images.std())
        x = (images - mean) / std
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        test, fit = order[:40], order[40:]
        model = DemoCNN()
        optimiser = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
        for _ in range(epochs):
            model.train()
            batch = x[fit]
            batch = torch.where(torch.rand(len(batch), 1, 1, 1) < 0.5, batch, batch.flip(-1))  # mirror half
            loss = F.cross_entropy(model(batch), labels[fit])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        model.eval()
        with torch.no_grad():
            accuracy = float((model(x[test]).argmax(1) == labels[test]).float().mean())
    _save_new({"state_dict": model.state_dict(), "mean": mean, "std": std, "test_accuracy": accuracy,
               "test_indices": test.tolist(), "classes": CLASSES, "seed": seed, "epochs": epochs,
               "threads": TRAIN_THREADS, "torch": str(torch.__version__)}, path, overwrite)
    return accuracy


@functools.lru_cache(maxsize=1)
def checkpoint() -> dict:
    """The shipped demo checkpoint: weights, input mean/std, held-out accuracy (read once per process)."""
    return torch.load(WEIGHTS, map_location="cpu", weights_only=True)


def load_demo() -> Tuple[nn.Module, torch.Tensor, List[str]]:
    """The trained demo model (eval mode), eight normalised demo images and their true labels."""
    stats = checkpoint()
    model = DemoCNN()
    model.load_state_dict(stats["state_dict"])
    images, labels = dataset()
    index = list(DEMO_INDICES)
    x = (images[index] - stats["mean"]) / stats["std"]
    return model.eval(), x, [CLASSES[int(labels[i])] for i in index]


def run_demo(out_dir: str = "guided_swap_demo") -> str:
    """Explain the demo images with every map and write ``demo.png``; returns its path."""
    model, x, truth = load_demo()
    stats = checkpoint()
    explainer = convert(model, layer="auto", example_input=x[:1])
    explanation = explainer.explain(x)
    fig = figure(explanation, x, labels=list(CLASSES), mean=(stats["mean"],), std=(stats["std"],),
                 notes=[f"true: {label}" for label in truth], explainer=explainer)
    return save_png(fig, os.path.join(out_dir, "demo.png"))


# --- photos ------------------------------------------------------------------------------------------------

class PhotoCNN(nn.Module):
    """Four conv blocks and a linear head; RGB input of any size from 32 px, 4 classes."""

    def __init__(self, widths=(16, 32, 64, 64)):
        super().__init__()
        channels = (3,) + tuple(widths)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(channels, channels[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm2d(b) for b in widths)
        self.fc = nn.Linear(widths[-1], len(PHOTO_CLASSES))

    def forward(self, x):
        for index, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = F.relu(norm(conv(x)))
            if index < len(self.convs) - 1:
                x = F.max_pool2d(x, 2)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@functools.lru_cache(maxsize=1)
def photographs() -> Tuple[torch.Tensor, ...]:
    """The four source photographs as (3, H, W) tensors in [0, 1], shorter side 256 px."""
    photos = []
    for name in PHOTO_SOURCES:
        photo = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1).float().div(255)
        scale = 256 / min(photo.shape[1:])
        size = (round(photo.shape[1] * scale), round(photo.shape[2] * scale))
        photos.append(F.interpolate(photo[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0])
    return tuple(photos)


def random_crops(count: int, generator: torch.Generator, smallest: float = 0.25, largest: float = 0.75):
    """``count`` random square crops (side ``smallest..largest`` of the photo's shorter side, half mirrored)
    at ``PHOTO_CROP`` px, and their classes."""
    photos, crops, classes = photographs(), [], []
    for _ in range(count):
        label = int(torch.randint(len(photos), (1,), generator=generator))
        photo = photos[label]
        height, width = photo.shape[1:]
        side = int(min(height, width) * (smallest + (largest - smallest) * float(torch.rand(1, generator=generator))))
        top = int(torch.randint(height - side + 1, (1,), generator=generator))
        left = int(torch.randint(width - side + 1, (1,), generator=generator))
        crop = F.interpolate(photo[None, :, top:top + side, left:left + side], size=(PHOTO_CROP, PHOTO_CROP),
                             mode="bilinear", antialias=True, align_corners=False)[0]
        crops.append(crop.flip(-1) if float(torch.rand(1, generator=generator)) < 0.5 else crop)
        classes.append(label)
    return _normalise(torch.stack(crops)), torch.tensor(classes)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def train_photos(path: str, seed: int = 0, crops: int = 1024, epochs: int = 6, overwrite: bool = False) -> float:
    """Train the photo CNN deterministically on random crops and save it (a new file unless ``overwrite``);
    returns the accuracy on 400 other random crops (of the same four photographs: a toy, not a benchmark)."""
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; choose another path or pass overwrite=True (--overwrite)")
    with deterministic():
        torch.manual_seed(seed)
        x, y = random_crops(crops, torch.Generator().manual_seed(seed))
        model = PhotoCNN()
        optimiser = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
        shuffle = torch.Generator().manual_seed(seed + 1)
        for _ in range(epochs):
            model.train()
            for batch in torch.randperm(crops, generator=shuffle).split(64):
                loss = F.cross_entropy(model(x[batch]), y[batch])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        model.eval()
        test_x, test_y = random_crops(400, torch.Generator().manual_seed(seed + 1000))
        with torch.no_grad():
            accuracy = float((model(test_x).argmax(1) == test_y).float().mean())
    _save_new({"state_dict": model.state_dict(), "classes": PHOTO_CLASSES, "test_accuracy": accuracy,
               "seed": seed, "crops": crops, "epochs": epochs, "threads": TRAIN_THREADS,
               "torch": str(torch.__version__)}, path, overwrite)
    return accuracy


@functools.lru_cache(maxsize=1)
def photo_checkpoint() -> dict:
    return torch.load(PHOTO_WEIGHTS, map_location="cpu", weights_only=True)


def load_photos(size: int = PHOTO_SIZE) -> Tuple[nn.Module, torch.Tensor, List[str]]:
    """The trained photo CNN (eval mode), the four photographs centre-cropped to ``size`` px and normalised
    (ImageNet mean and std), and their class names."""
    model = PhotoCNN()
    model.load_state_dict(photo_checkpoint()["state_dict"])
    x = torch.stack([_centre_square(photo, size) for photo in photographs()])
    return model.eval(), _normalise(x), list(PHOTO_CLASSES)


def collage(quadrant: int = 96) -> torch.Tensor:
    """The four photographs in a 2 x 2 grid (cat, coffee / rocket, astronaut), normalised: (1, 3, 2q, 2q)."""
    tiles = [_centre_square(photo, quadrant) for photo in photographs()]
    grid = torch.cat([torch.cat(tiles[:2], dim=2), torch.cat(tiles[2:], dim=2)], dim=1)
    return _normalise(grid[None])


def _centre_square(photo: torch.Tensor, size: int) -> torch.Tensor:
    height, width = photo.shape[1:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = photo[None, :, top:top + side, left:left + side]
    return F.interpolate(square, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


# --- command line ------------------------------------------------------------------------------------------

MODELS: Dict[str, Tuple] = {"faces": (train, WEIGHTS), "photos": (train_photos, PHOTO_WEIGHTS)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run the faces demo, or retrain a demo model into a new file")
    parser.add_argument("--train", choices=sorted(MODELS), nargs="?", const="faces",
                        help="retrain a demo model (default: faces) deterministically and compare it with the "
                             "shipped checkpoint")
    parser.add_argument("--out", help="where --train writes (default: NAME_retrained.pt in this folder)")
    parser.add_argument("--overwrite", action="store_true", help="let --train replace an existing --out file")
    args = parser.parse_args(argv)
    if args.train is None:
        print(run_demo())
        return 0
    trainer, shipped = MODELS[args.train]
    out = args.out or f"{args.train}_retrained.pt"
    if os.path.abspath(out) == os.path.abspath(shipped) and not args.overwrite:
        parser.error(f"--out is the shipped checkpoint {shipped}; add --overwrite to replace it")
    try:
        accuracy = trainer(out, overwrite=args.overwrite)
    except FileExistsError as error:
        parser.error(str(error))
    difference = largest_difference(out, shipped)
    same = "bit for bit the same as" if difference == 0.0 else f"largest weight difference {difference:.3g} from"
    print(f"held-out accuracy {accuracy:.3f}; weights in {out}: {same} the shipped {shipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
