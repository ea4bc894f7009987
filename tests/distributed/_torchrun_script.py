"""Run by ``torchrun --nproc_per_node N`` in tests/distributed/test_calibration.py: no torch.distributed call here,
qcast initialises the group itself (``group.ensure_group``); each rank quantizes its shard and saves what it got."""
import os
import sys

import torch

import qcast
from tests.distributed import _workers as W

torch.set_num_threads(1)
out = sys.argv[1]
shard = list(qcast.distributed.shard(W.data("cnn")))
result = W.run("default", shard)
result["world"] = qcast.distributed.world_size()
torch.save(result, os.path.join(out, f"rank{qcast.distributed.rank()}.pt"))
