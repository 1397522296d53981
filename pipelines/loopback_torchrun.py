"""torchrun whose TCP stores listen on 127.0.0.1 only, for nodes that all meet on this machine.

    python -m pipelines.loopback_torchrun [torchrun's options] -m steps.train [trainer options]

torchrun (torch 2.13, measured) binds the stores it hosts, the c10d rendezvous's and the one its workers share, to
every interface whatever address the endpoint names, without authentication, and its agents unpickle what they read
from them. When every node's endpoint is a loopback address (several "nodes" on one machine, or `--standalone`), the
finetune flow runs torchrun through this module: it is torchrun itself, except that each store it hosts gets a
socket already bound to 127.0.0.1 (TCPStore's `master_listen_fd`), and its workers are told (NLG_LOOPBACK_STORE) to
host theirs the same way (steps/training/distributed.py), so nothing listens beyond loopback. Endpoints on
other hosts are not touched: there the stores must be reachable by the other machines (docs/pipeline.md). The
flow also passes `--local_addr` (a loopback address), so the workers look for their store where it listens.
"""

from __future__ import annotations

import os
import sys

import torch.distributed as dist

from steps.training.distributed import LOOPBACK_STORE, listen_on_loopback, loopback_address

ORIGINAL_STORE = dist.TCPStore
STORE_ARGUMENTS = ("host_name", "port", "world_size", "is_master", "timeout", "wait_for_workers", "multi_tenant",
                   "master_listen_fd", "use_libuv")  # TCPStore's, in its order


class LoopbackTCPStore(ORIGINAL_STORE):
    """A TCPStore that, when it hosts, listens on 127.0.0.1 only."""

    def __init__(self, *args, **kwargs):
        bound = dict(zip(STORE_ARGUMENTS, args)) | kwargs
        if bound.get("is_master") and bound.get("master_listen_fd") is None:
            host = loopback_address(bound.get("host_name"))
            bound["master_listen_fd"], bound["port"] = listen_on_loopback(host, int(bound.get("port") or 0))
        super().__init__(**bound)


def install() -> int:
    """Put LoopbackTCPStore wherever torchrun's modules look TCPStore up; returns how many places."""
    import torch.distributed.run  # noqa: F401  (loads the elastic modules that hold their own reference)

    replaced = 0
    for name, module in list(sys.modules.items()):
        if name.startswith("torch.distributed") and getattr(module, "TCPStore", None) is ORIGINAL_STORE:
            module.TCPStore = LoopbackTCPStore
            replaced += 1
    return replaced


def main() -> None:
    install()
    os.environ[LOOPBACK_STORE] = "1"  # for the workers: rank 0 hosts their store on loopback too
    from torch.distributed.run import main as torchrun_main

    torchrun_main()


if __name__ == "__main__":
    main()
