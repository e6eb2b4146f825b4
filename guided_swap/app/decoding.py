"""Images decoded and preprocessed in ``torch.utils.data.DataLoader`` workers while the model works.

>>> import numpy as np, os, tempfile
>>> from skimage import io
>>> from guided_swap.app.results import Item
>>> from guided_swap.app.model_spec import Preprocessing
>>> path = os.path.join(tempfile.mkdtemp(), "a.png")
>>> io.imsave(path, np.zeros((40, 50, 3), np.uint8), check_contrast=False)
>>> items = [Item(path, "a.png"), Item(path + ".missing", "b.png")]
>>> decoded = Decoded(items, [0, 1], Preprocessing(32, 32), channels=3)
>>> [(i, None if t is None else tuple(t.shape), e is None) for i, t, e in decoded]
[(0, (3, 32, 32), True), (1, None, False)]
"""
from typing import Sequence

import torch

from .._console import quiet_child
from ..media.images import load_image
from .model_spec import Preprocessing
from .results import Item


class Decoded(torch.utils.data.Dataset):
    """Input ``positions[k]`` decoded: ``(index, tensor, None)``, or ``(index, None, error)`` if unreadable."""

    def __init__(self, items: Sequence[Item], positions: Sequence[int], preprocessing: Preprocessing, channels: int):
        self.items, self.positions, self.preprocessing, self.channels = items, list(positions), preprocessing, channels

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, k: int):
        index = self.positions[k]
        p = self.preprocessing
        try:
            tensor = load_image(self.items[index].path, resize=p.resize, crop=p.crop, mean=p.mean, std=p.std,
                                channels=self.channels)
            return index, tensor, None
        except (ValueError, TypeError, OSError) as error:
            return index, None, str(error).splitlines()[0] if str(error) else type(error).__name__


def _as_list(batch):
    return batch


def loader(dataset: Decoded, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    """Batches as lists of ``(index, tensor, error)``, decoded by ``workers`` processes (0: this one)."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       collate_fn=_as_list, worker_init_fn=quiet_child if workers else None,
                                       prefetch_factor=2 if workers else None)
