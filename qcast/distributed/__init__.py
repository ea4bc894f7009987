"""qcast under ``torch.distributed`` (torchrun, Slurm, Kubernetes operators): the process-group helpers
(``group.py``). Calibration's reductions across ranks are in ``calibration.py``; sensitivity and the accuracy-aware
search split across ranks in ``search.py`` (docs/scale.md)."""
from .group import (DistributedError, active, all_gather_object, all_reduce,
                    all_reduce_optional, broadcast, broadcast_object,
                    check_ranks, collective, decide_on_main, ensure_group, is_main, rank, shard, world_size)

__all__ = ["DistributedError", "active", "all_gather_object", "all_reduce", "all_reduce_optional", "broadcast", "broadcast_object",
           "check_ranks", "collective", "decide_on_main", "ensure_group", "is_main", "rank", "shard", "world_size"]
