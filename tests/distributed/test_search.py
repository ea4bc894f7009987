"""qcast.sensitivity and quantize(eval_fn=, max_drop=) split across gloo processes: one process is the oracle.

2 and 3 processes (torch.multiprocessing, spawn, a FileStore rendezvous) run the same calls on the same model and
data as this process; every rank must hold the one-process report (same rows, same numbers, bit for bit) and the
same chosen float layers and quantized outputs. A rank whose eval_fn raises, or that dies, fails every rank with an
error naming it.
"""
from __future__ import annotations

import os
import pickle
import random
import traceback

import pytest
import torch
import torch.multiprocessing as mp

import qcast
from qcast.accuracy import _next_step, _speculate
from tests.models.planted import PlantedMLP

FAST = qcast.QuantConfig(calibration="minmax")
DEPTH = 22  # int8 compute layers: >= 20 candidates


def make():
    torch.manual_seed(0)
    model = PlantedMLP(DEPTH, 16).eval()  # layers 6 and 15 must stay float (tests/models/planted.py)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(8, 16, generator=g) for _ in range(3)]
    held = [torch.randn(8, 16, generator=g) for _ in range(2)]
    return model, data, held


def rel_error_fn(model, held):
    with torch.no_grad():
        refs = [model(x) for x in held]

    @torch.no_grad()
    def fn(m):
        num = sum((r - m(x)).pow(2).sum() for r, x in zip(refs, held))
        den = sum(r.pow(2).sum() for r in refs)
        return -float((num / den).sqrt())
    return fn


def run_calls(fail_on_rank: int | None = None, die: bool = False, skip_on_rank: int | None = None) -> dict:
    """What each process computes: the default-metric sensitivity and the accuracy search (or the failing search).
    ``skip_on_rank``: that rank keeps layers.3 float (other candidates than the other ranks): sensitivity only."""
    torch.set_num_threads(1)
    model, data, held = make()
    fn = rel_error_fn(model, held)
    out: dict = {}
    if skip_on_rank is not None:
        odd = torch.distributed.get_rank() == skip_on_rank
        qcast.sensitivity(model, data, config=FAST.replace(skip=("layers.3",) if odd else ()), progress=False,
                          cache=False)
        return out
    if fail_on_rank is None:
        report = qcast.sensitivity(model, data, config=FAST, progress=False, cache=False)
        out["rows"] = [(r.name, r.op, r.value, r.delta) for r in report.rows]
        out["base"] = (report.baseline, report.quantized, report.float)
    calls = [0]

    def eval_fn(m):
        calls[0] += 1
        if fail_on_rank is not None and torch.distributed.get_rank() == fail_on_rank and calls[0] == 3:
            if die:
                os._exit(7)
            raise ValueError("validation shard missing on this node")
        return fn(m)

    qmodel = qcast.quantize(model, data, config=FAST, eval_fn=eval_fn, max_drop=0.2, progress=False,
                            check_speed=False)
    search = qmodel.qcast_meta["accuracy_search"]
    out["ranking"] = search.ranking
    out["steps"] = [(s.float_layers, s.metric, s.meets, s.note) for s in search.steps]
    out["float_layers"] = search.float_layers
    with torch.no_grad():
        out["output"] = qmodel(held[0])
    return out


def _worker(rank: int, world: int, tmp: str, jobs: tuple) -> None:
    """Runs each job (``(fail_on_rank, die)``) in turn in one process group: a raised error leaves the group usable."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    results = []
    for job in jobs:
        try:
            results.append({"ok": run_calls(*job)})
        except Exception as e:  # noqa: BLE001 - reported to the test
            results.append({"error": (type(e).__name__, str(e)), "trace": traceback.format_exc()})
        with open(f"{tmp}/rank{rank}.pkl", "wb") as f:
            pickle.dump(results, f)
    torch.distributed.destroy_process_group()


def spawn(world: int, tmp, *jobs) -> list[list[dict] | None]:
    """Each rank's results of ``jobs``, or None for a rank that wrote none (it died first)."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, world, str(tmp), jobs)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        if p.is_alive():
            p.kill()
            pytest.fail(f"a rank of {world} still ran after 300 s: the job hangs")
    out = []
    for r in range(world):
        path = tmp / f"rank{r}.pkl"
        out.append(pickle.loads(path.read_bytes()) if path.exists() else None)
    return out


@pytest.fixture(scope="module")
def one_process():
    return run_calls()


def check_same(ref, got, rank, world):
    assert got["rows"] == ref["rows"], f"rank {rank} of {world}: sensitivity rows differ"
    assert got["base"] == ref["base"]
    assert got["ranking"] == ref["ranking"]
    assert got["steps"] == ref["steps"], f"rank {rank} of {world}: search steps differ"
    assert got["float_layers"] == ref["float_layers"]
    assert torch.equal(got["output"], ref["output"]), f"rank {rank} of {world}: quantized outputs differ"


def test_the_one_process_oracle_is_a_real_search(one_process):
    ref = one_process
    assert len(ref["rows"]) >= 20
    assert {"layers.6", "layers.15"} == set(ref["float_layers"]), ref["steps"]  # the search found the two culprits
    assert {"layers.6", "layers.15"} == {r[0] for r in ref["rows"][:2]}  # and the sensitivity ranks them first
    assert len(ref["steps"]) > 3  # ranked, all-float, binary search, pruning: not the trivial all-int8 answer


def test_two_ranks_get_the_one_process_ranking_and_model_and_other_candidates_fail(one_process, tmp_path):
    for rank, res in enumerate(spawn(2, tmp_path, (None, False), (None, False, 1))):
        assert res is not None and "ok" in res[0], f"rank {rank}: {res and res[0].get('trace')}"
        check_same(one_process, res[0]["ok"], rank, 2)
        # then rank 1 quantizes another set of layers: both ranks fail, naming it, instead of mixing the reports
        assert "error" in res[1], f"rank {rank}: {res[1]}"
        cls, msg = res[1]["error"]
        assert cls == "DistributedError" and "rank(s) [1] of 2" in msg and "same model" in msg, msg


def test_three_ranks_get_the_same_and_a_raising_rank_fails_every_rank_naming_it(one_process, tmp_path):
    results = spawn(3, tmp_path, (None, False), (1, False))
    for rank, res in enumerate(results):
        assert res is not None and len(res) == 2, f"rank {rank}: {res}"
        assert "ok" in res[0], f"rank {rank}: {res[0].get('trace')}"
        check_same(one_process, res[0]["ok"], rank, 3)
        assert "error" in res[1], f"rank {rank} did not fail: {res[1]}"
        cls, msg = res[1]["error"]
        assert cls == "EvalError", res[1]["trace"]
        assert "rank 1 of 3" in msg and "validation shard missing" in msg, msg


def test_a_rank_that_dies_fails_the_others_naming_it(tmp_path):
    results = spawn(2, tmp_path, (1, True))
    assert results[1] is None  # it died before writing anything
    cls, msg = results[0][0]["error"]
    assert cls == "DistributedError", results[0][0]["trace"]
    assert "rank(s) [1]" in msg, msg


# ------------------------------------------------------------------------------------------------
# the speculative driver follows the one-process path exactly (no processes needed)
# ------------------------------------------------------------------------------------------------
def _path(ranking, oracle, size):
    """(recorded steps, evaluations) of the driver loop of qcast.accuracy with ``size`` evaluations per round."""
    results, recorded, outcomes, evaluated = {}, {}, [], 0
    steps = []
    while (req := _next_step(ranking, outcomes)) is not None:
        key = frozenset(req[0])
        if key in recorded:
            outcomes.append(recorded[key])
            continue
        if key not in results:
            batch = _speculate(ranking, outcomes, dict(results), size) if size > 1 else [req]
            assert req in batch and len(batch) <= size
            for b in batch:
                results[frozenset(b[0])] = oracle(b[0])
                evaluated += 1
        recorded[key] = results[key]
        steps.append((req[0], req[1], results[key]))
        outcomes.append(results[key])
    return steps, evaluated


@pytest.mark.parametrize("size", [2, 3, 8])
def test_speculation_records_the_sequential_steps(size):
    rng = random.Random(0)
    for trial in range(200):
        n = rng.randrange(1, 30)
        ranking = tuple(f"l{i}" for i in range(n))
        if trial % 2:  # monotone: meets once the k most sensitive are float
            need = rng.randrange(0, n + 1)
            oracle = lambda layers, need=need: set(ranking[:need]) <= set(layers)  # noqa: E731
        else:  # arbitrary (calibration noise): a fixed random answer per set
            memo: dict = {}
            oracle = lambda layers, memo=memo: memo.setdefault(frozenset(layers), rng.random() < 0.5)  # noqa: E731
        seq, n_seq = _path(ranking, oracle, 1)
        spec, n_spec = _path(ranking, oracle, size)
        assert spec == seq
        assert n_spec >= n_seq


def test_no_candidates_means_no_steps():
    assert _next_step((), []) is None
