"""The process groups of a fine-tuning job: sequence-parallel groups, data-parallel to each other.

``world = dp_size * sp_size`` ranks. Sequence-parallel group ``g`` is the consecutive ranks
``[g * sp_size, (g + 1) * sp_size)`` (the hosts that share one sample, cut into blocks); data-parallel
group ``j`` holds the ``j``-th rank of every sequence-parallel group (the ranks whose gradients are
averaged)::

    world 6, sp_size 3:   SP groups  [0 1 2] [3 4 5]      DP groups  [0 3] [1 4] [2 5]
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch.distributed as dist

from ...errors import StarInputError


@dataclass(frozen=True)
class GroupLayout:
    """Which ranks form which groups (index arithmetic only, no communication)."""

    world_size: int
    rank: int
    sp_size: int

    def __post_init__(self) -> None:
        if self.world_size % self.sp_size:
            error = StarInputError(f"sp_size {self.sp_size} does not divide the {self.world_size} processes; start "
                                   f"a multiple of {self.sp_size} processes or choose an sp_size that divides "
                                   f"{self.world_size}")
            error.on_every_rank = True  # every rank checks the same numbers
            raise error

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    @property
    def dp_rank(self) -> int:
        """The index of this rank's sequence-parallel group (which data the group trains on)."""
        return self.rank // self.sp_size

    def sp_ranks(self, group: int) -> list[int]:
        return list(range(group * self.sp_size, (group + 1) * self.sp_size))

    def dp_ranks(self, position: int) -> list[int]:
        return list(range(position, self.world_size, self.sp_size))


@dataclass(frozen=True)
class TrainGroups:
    """The groups this rank belongs to; a group of one rank is ``None`` (nothing to communicate)."""

    layout: GroupLayout
    world: "dist.ProcessGroup | None"
    sp: "dist.ProcessGroup | None"
    dp: "dist.ProcessGroup | None"

    @classmethod
    def create(cls, world: "dist.ProcessGroup | None", sp_size: int, timeout_s: float) -> "TrainGroups":
        """Every rank calls ``dist.new_group`` for every group, in the same order (all SP groups, then
        all DP groups), as torch requires; each rank keeps the two it belongs to."""
        size = dist.get_world_size(world) if world is not None else 1
        rank = dist.get_rank(world) if world is not None else 0
        layout = GroupLayout(size, rank, sp_size)
        sp = dp = None
        if world is not None:
            timeout = datetime.timedelta(seconds=timeout_s)
            if layout.sp_size > 1:
                for g in range(layout.dp_size):
                    group = dist.new_group(layout.sp_ranks(g), timeout=timeout)
                    if g == layout.dp_rank:
                        sp = group
            if layout.dp_size > 1:
                for j in range(layout.sp_size):
                    group = dist.new_group(layout.dp_ranks(j), timeout=timeout)
                    if j == layout.sp_rank:
                        dp = group
        return cls(layout, world, sp, dp)
