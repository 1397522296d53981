"""One process or many under torchrun: rank, world size, device, and the few collectives the trainer needs.

gloo on CPU, NCCL on CUDA, chosen from the device. A single process needs no process group at all, so
`python -m steps.train` runs without torchrun.

Rank 0 is the one that writes (work dir, reports, MLflow). On several nodes it must sit on the node that keeps
the outputs, but torchrun's c10d rendezvous orders nodes by host name, not by `--node_rank`. So the trainer
numbers the ranks itself: a process started with NLG_OUTPUT_NODE=1 (the finetune flow on node_rank 0 sets it)
makes its node's processes ranks 0..n-1, the others follow in torchrun's order. Without the variable anywhere,
torchrun's ranks are kept. Collectives still address processes by torchrun's rank (`Dist.main_global_rank`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from steps.core.common import InputError

# A file that one node's processes rendezvous through (set by pipelines/trainer_launch.py for one node, many processes).
RENDEZVOUS_FILE = "NLG_RENDEZVOUS_FILE"
BROADCAST_CHUNK = 1 << 26  # bytes per collective when a file is sent to every rank (64 MiB of device memory at a time)
# "1" on the node whose processes write the outputs (rank 0 and its neighbours); see the module docstring.
OUTPUT_NODE = "NLG_OUTPUT_NODE"
# "1" when every node is on this machine (set by pipelines.loopback_torchrun): stores listen on loopback only.
LOOPBACK_STORE = "NLG_LOOPBACK_STORE"


@dataclass
class Dist:
    rank: int  # 0 writes the outputs; on several nodes, 0 is on the output node (see the module docstring)
    world: int
    device: torch.device
    main_global_rank: int = 0  # torchrun's rank of the process that has rank 0 here: the source of broadcasts

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

    def read_on_main(self, path: Path) -> bytes | None:
        """The bytes of `path` as rank 0 reads them, on every rank; None when rank 0 has no such file.

        Nodes need not share a filesystem: after an elastic restart a node that never wrote the resume state
        still resumes from the one rank 0 wrote. A file rank 0 cannot read arrives as b"" (every rank then
        reports it damaged, instead of one rank failing and the others waiting for it).
        """
        data = None
        if self.main and path.is_file():
            try:
                data = path.read_bytes()
            except OSError:
                data = b""
        if self.world == 1:
            return data
        size = torch.tensor([-1 if data is None else len(data)], dtype=torch.int64, device=self.device)
        dist.broadcast(size, src=self.main_global_rank)
        length = int(size.item())
        if length < 0:
            return None
        received = bytearray()
        for start in range(0, length, BROADCAST_CHUNK):  # in pieces: a full fine-tune's state is gigabytes
            count = min(BROADCAST_CHUNK, length - start)
            if self.main:
                piece = torch.frombuffer(bytearray(data[start:start + count]), dtype=torch.uint8).to(self.device)
            else:
                piece = torch.empty(count, dtype=torch.uint8, device=self.device)
            dist.broadcast(piece, src=self.main_global_rank)
            if not self.main:
                received += piece.cpu().numpy().tobytes()
        return data if self.main else bytes(received)


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
        elif os.environ.get(LOOPBACK_STORE) and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            # torchrun with nodes on this machine, workers not sharing its store: rank 0 hosts theirs on loopback
            dist.init_process_group(backend, store=workers_store(rank, world), rank=rank, world_size=world)
            return output_node_first(rank, world, device)
        else:  # torchrun (several nodes): its TCP store, on the endpoint the user configured
            dist.init_process_group(backend)
            return output_node_first(rank, world, device)
    return Dist(rank, world, device)


def loopback_address(host: str | None) -> str:
    """Where to listen for a store named `host`: the host itself when it is a loopback address (::1 included), else
    127.0.0.1."""
    import ipaddress

    try:
        return host if host and ipaddress.ip_address(host).is_loopback else "127.0.0.1"
    except ValueError:
        return "127.0.0.1"


def listen_on_loopback(host: str, port: int) -> tuple[int, int]:
    """A listening TCP socket on the loopback address `host` (port 0: any free one), for TCPStore's master_listen_fd
    (torch's own stores bind every interface); returns (its descriptor, which the store then owns, its port)."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        # torchrun treats a RuntimeError from a store it tried to host as "another process hosts it" and connects.
        raise RuntimeError(f"cannot listen on {host} port {port}: {exc}") from None
    port = sock.getsockname()[1]
    return sock.detach(), port


def workers_store(rank: int, world: int) -> dist.TCPStore:
    """The store torchrun's workers meet in (MASTER_ADDR:MASTER_PORT), hosted by rank 0 on loopback."""
    from torch.distributed.constants import default_pg_timeout

    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    listen_fd = None
    if rank == 0:
        listen_fd, port = listen_on_loopback(loopback_address(host), port)
    return dist.TCPStore(host, port, world, is_master=rank == 0, timeout=default_pg_timeout, multi_tenant=True,
                         master_listen_fd=listen_fd)


current: Dist | None = None  # this process's layout once torchrun's group is made (steps.training.status asks it)


def output_node_first(global_rank: int, world: int, device: torch.device) -> Dist:
    """Renumber torchrun's ranks so that the processes started with NLG_OUTPUT_NODE=1 come first (rank 0 writes).

    Every process shares (is it on the output node, its node's group rank); the new order is the output
    node's processes, then the rest, each in torchrun's order. Two nodes both claiming the outputs is an error:
    two flows would each expect the adapter in their own work dir.
    """
    mine = torch.tensor([int(os.environ.get(OUTPUT_NODE) == "1"), int(os.environ.get("GROUP_RANK", "0"))], device=device)
    table = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(table, mine)
    flags = [int(row[0]) for row in table]
    owners = {int(row[1]) for row in table if row[0]}
    if len(owners) > 1:
        raise InputError(f"{len(owners)} nodes were started as the output node ({OUTPUT_NODE}=1, i.e. flow.torchrun.node_rank 0); "
                         "give every node its own node_rank, 0 on exactly one")
    order = sorted(range(world), key=lambda r: (not flags[r], r))  # torchrun ranks, the output node's first
    global current
    current = Dist(order.index(global_rank), world, device, main_global_rank=order[0])
    return current


def is_main_process() -> bool:
    """Whether this process writes the outputs: rank 0 after renumbering, torchrun's RANK 0 before, or alone."""
    if current is not None:
        return current.main
    return int(os.environ.get("RANK", "0")) == 0


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
