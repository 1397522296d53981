"""One process or many under torchrun: rank, world size, device, and the few collectives the trainer needs.

gloo on CPU, NCCL on CUDA, chosen from the device. A single process needs no process group at all, so
`python -m steps.train` runs without torchrun.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

# A file that one node's processes rendezvous through (set by pipelines/trainer_launch.py for one node, many processes).
RENDEZVOUS_FILE = "NLG_RENDEZVOUS_FILE"


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Sum small tensors over ranks in one collective."""
        flat = torch.stack([t.detach().float().reshape(()) for t in tensors]).to(self.device)
        if self.world > 1:
            dist.all_reduce(flat)
        return list(flat.unbind())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(device_choice: str) -> Dist:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); a single process makes no process group (the
    original always made one, which needs a rendezvous even for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1:
        backend = "nccl" if use_cuda else "gloo"
        rendezvous = os.environ.get(RENDEZVOUS_FILE)
        if rendezvous:  # the finetune flow's single-node launch: a file, no network listener
            dist.init_process_group(backend, init_method=Path(rendezvous).resolve().as_uri(), rank=rank, world_size=world)
        else:  # torchrun (several nodes): its TCP store, on the endpoint the user configured
            dist.init_process_group(backend)
    return Dist(rank, world, device)


def resolve_precision(choice: str, device: torch.device) -> str:
    """`auto` -> bf16 when the device has native bf16 matmuls (then about twice as fast as fp32), else fp32."""
    if choice != "auto":
        return choice
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    except (AttributeError, RuntimeError):
        return "fp32"


def shutdown(env: Dist) -> None:
    if env.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
