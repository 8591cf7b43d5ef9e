"""Data parallelism under ``torchrun`` (gloo on CPU, NCCL on GPU) and the per-epoch seeds of every rank."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from MedTuningLib.errors import MedTuningError


@dataclass
class Distributed:
    """This process's place in a ``torchrun`` group (one process alone: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Distributed":
        return cls(rank=int(os.environ.get("RANK", 0)), world=int(os.environ.get("WORLD_SIZE", 1)),
                   local_rank=int(os.environ.get("LOCAL_RANK", 0)))

    def setup(self, device: torch.device) -> None:
        if not self.enabled:
            return
        import torch.distributed as dist

        try:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        except Exception as exc:  # noqa: BLE001 - any rendezvous failure is reported the same way
            raise MedTuningError("DISTRIBUTED_ERROR", f"could not join the torchrun group: {exc}",
                                 "start with 'torchrun --nproc_per_node N -m MedTuningLib train ...' "
                                 "and check MASTER_ADDR / MASTER_PORT") from exc

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank (stop decisions must agree)."""
        if not self.enabled:
            return flag
        import torch.distributed as dist

        value = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def smallest(self, value: int) -> int:
        """The smallest ``value`` of all ranks, on every rank (the epoch plan must agree)."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        tensor = torch.tensor([float(value)])
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def teardown(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def seed_everything(seed: int, epoch: int, rank: int) -> int:
    """Reseed Python, NumPy and torch from (seed, epoch, rank); returns the derived seed."""
    derived = (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % (2**31 - 1)
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)
    return derived
