"""torch.distributed for the folder runner: one process per device, inputs sharded by rank.

Started by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous), each process
takes one device (``cuda:LOCAL_RANK`` when CUDA is present, else the CPU) and every ``world``-th input. The
processes exchange only small Python objects (the plan, the records), over gloo, whatever the device.
Without ``torchrun`` (``WORLD_SIZE`` unset or 1) the group is one process and nothing is initialised.

>>> group = start("cpu")
>>> group.rank, group.world, shard(list(range(5)), group)
(0, 1, [0, 1, 2, 3, 4])
"""
import datetime
import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch

TIMEOUT = datetime.timedelta(hours=12)  # ranks wait for each other at the end of their shares


@dataclass(frozen=True)
class Group:
    """This process's place in the run."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def _device(choice: str, local_rank: int) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available here; use --device cpu")
        choice = f"cuda:{local_rank % torch.cuda.device_count()}"
    device = torch.device(choice)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def start(device: str = "auto") -> Group:
    """Join the torchrun group if there is one; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    group = Group(rank, world, _device(device, local_rank))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=TIMEOUT)
    return group


def stop(group: Group) -> None:
    if group.world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def broadcast(value: Any, group: Group) -> Any:
    """Rank 0's ``value`` on every rank."""
    if group.world == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any, group: Group) -> Optional[List[Any]]:
    """Every rank's ``value``, in rank order, on rank 0 (None elsewhere)."""
    if group.world == 1:
        return [value]
    boxes = [None] * group.world if group.main else None
    torch.distributed.gather_object(value, boxes, dst=0)
    return boxes


def shard(items: Sequence[Any], group: Group) -> List[Any]:
    """This rank's share: every ``world``-th item from its rank on (shares differ in size by at most one)."""
    return list(items[group.rank::group.world])
