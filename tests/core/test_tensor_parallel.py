"""Real tensor parallelism: 4 gloo processes with megatron-core parallel_state, TP=4 then TP=2; the
logits loss and the fused output layer + loss (with and without sequence parallelism).

Per-token losses, statistics and sharded gradients must equal the single-rank result; the
communication audit proves O(tp) numbers per token, independent of K, and no backward collective.
"""

import json

import pytest
import torch.multiprocessing as mp
from otr_megatron.distributed import free_port

pytest.importorskip("megatron.core")


@pytest.mark.slow
def test_tp2_and_tp4_equal_tp1(tmp_path):
    from tests.core import _tp_worker

    mp.start_processes(_tp_worker.main, args=(4, free_port(), str(tmp_path)), nprocs=4, join=True,
                       start_method="spawn")
    report = json.loads((tmp_path / "rank0.json").read_text())
    print("\nlayout report:", json.dumps(report, indent=1))
    assert report["tp4_sample_collectives"][0][0] == "all_gather_into_tensor"
    # the fused output layer + loss (vocab_parallel_linear_otr_loss): TP=4 and TP=2, with and without
    # sequence parallelism, draw exactly TP=1's samples (losses and gradients are checked in the worker)
    for tp in (4, 2):
        for sp in ("", "_sp"):
            assert report[f"tp{tp}{sp}_linear_sample_mismatch"] == 0
            assert report[f"tp{tp}{sp}_linear_collectives"][1][-1][0] == ("reduce_scatter_tensor" if sp else "all_reduce")
