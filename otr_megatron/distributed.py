"""Process-group plumbing shared by the demo, the benchmark, the train job and the test harness."""

from __future__ import annotations

import socket

import torch


def free_port() -> int:
    """A free TCP port on loopback for a local rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def teardown_parallel() -> None:
    """Destroy megatron-core's parallel state (if it was set up) and the default process group."""
    try:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
    except Exception:  # megatron-core absent or never initialised: nothing to tear down
        pass
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
