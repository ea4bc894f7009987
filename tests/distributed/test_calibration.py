"""Distributed calibration (qcast/distributed/calibration.py): 2 and 3 gloo processes on this machine, each with its
own shard, against one process calibrated on the union: identical qparams and bit-identical int8 outputs."""
from __future__ import annotations

import torch
import torch.multiprocessing as mp

from qcast.distributed import group
from tests.distributed import _workers as W

# kl / percentile histograms merge exactly like mse's (tests/test_observers.py checks every estimator's merge)
ALL = ["default", "minmax", "adaround", "smoothquant"]


def spawn(tmp_path, world: int, names: list[str], empty_rank=None, bad_rank=None) -> list[dict]:
    init = f"file://{tmp_path}/pg"
    mp.spawn(W.worker, args=(world, init, str(tmp_path), names, empty_rank, bad_rank), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r, res in enumerate(results):
        assert "crash" not in res, f"rank {r}:\n{res['crash']}"
    return results


def reference(name: str) -> dict:
    return W.run(name, W.data(W.SCENARIOS[name][0]))


def assert_same(ref: dict, got: dict, name: str) -> None:
    assert got["batches"] == ref["batches"] == 12, name
    assert [n for n, _ in got["qparams"]] == [n for n, _ in ref["qparams"]], name
    for (n, a), (_, b) in zip(ref["qparams"], got["qparams"]):
        assert a == b, f"{name}: {n}: {a} vs {b}"
    for a, b in zip(ref["outputs"], got["outputs"]):
        assert torch.equal(a, b), f"{name}: outputs differ by up to {float((a - b).abs().max())}"
    assert got["meta"] == ref["meta"] or name == "adaround", name  # AdaRound's report carries its timings


def test_two_ranks_equal_one_process(tmp_path):
    results = spawn(tmp_path, 2, ALL + ["ema"])
    for name in ALL:
        ref = reference(name)
        assert len(ref["qparams"]) >= 2
        for res in results:
            assert_same(ref, res[name], name)
    assert results[0]["smoothquant"]["meta"]["smoothquant"]["smoothed"] == 1  # the outlier channel was seen
    # EMA is order-dependent: across ranks it is defined as the shards in rank order, equal to one process over
    # their concatenation up to float64 rounding
    ref = reference("ema")
    for res in results:
        for (n, a), (_, b) in zip(ref["qparams"], res["ema"]["qparams"]):
            assert a.zero_point == b.zero_point and abs(a.scale - b.scale) <= 1e-12 * a.scale, n


def test_three_ranks_one_of_them_empty_and_a_failing_rank(tmp_path):
    results = spawn(tmp_path, 3, ["default"], empty_rank=1, bad_rank=2)
    for name in ("default",):
        ref = reference(name)
        for res in results:
            assert_same(ref, res[name], name)
    for r, res in enumerate(results):
        kind, msg = res["error"]
        assert kind == "DistributedError" and "rank 2 of 3" in msg and "NaN" in msg, (r, kind, msg)


def test_torchrun_without_a_process_group_in_the_script(tmp_path):
    """``torchrun --nproc_per_node 2`` of a script that never touches torch.distributed: qcast initialises the
    group (gloo) and the two ranks' strided shards give one process's qparams and outputs."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    os.path.join(root, "tests", "distributed", "_torchrun_script.py"), str(tmp_path)],
                   check=True, cwd=root, env=env, timeout=600, capture_output=True)
    ref = reference("default")
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert got["world"] == 2
        assert_same(ref, got, "torchrun")


def test_one_process_group_helpers_are_identities():
    assert not group.active() and group.rank() == 0 and group.world_size() == 1
    t = torch.tensor([1.0, 2.0])
    assert group.all_reduce(t, "max") is t and group.broadcast_object("x") == "x"
    assert group.all_gather_object(3) == [3]
    assert list(group.shard(range(7), 1, 3)) == [1, 4]
