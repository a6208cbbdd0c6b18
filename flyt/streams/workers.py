"""Which DataLoader worker this is, and its share of a list of shards, for every torch stream of flyt."""

from __future__ import annotations

from typing import Sequence, TypeVar

T = TypeVar("T")


def current_worker() -> tuple[int, int]:
    """(id, number) of the DataLoader worker running this code; (0, 1) outside a worker process."""
    import torch

    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def worker_share(items: Sequence[T], rank: int = 0, world_size: int = 1) -> Sequence[T]:
    """This worker's items: every (world_size * workers)-th one, from slot rank * workers + id, so the
    workers of all ranks take disjoint shares that cover the list (a worker beyond its length gets none)."""
    worker, workers = current_worker()
    return items[rank * workers + worker :: world_size * workers]


def damage_forward() -> list | None:
    """Where a stream collects its damaged shards for the main process to name (see
    :class:`flyt.data.webdataset.DamagedShards`): a list in a DataLoader worker, None in the main process."""
    import torch

    return [] if torch.utils.data.get_worker_info() is not None else None
