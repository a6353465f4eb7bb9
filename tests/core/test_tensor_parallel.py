"""Real tensor parallelism: 4 gloo processes with megatron-core parallel_state, TP=4 then TP=2.

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
