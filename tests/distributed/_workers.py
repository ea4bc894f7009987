"""Scenarios run by every rank of a gloo process group (``torch.multiprocessing.spawn``) and by one process, for
tests/distributed/test_calibration.py. Each returns what must agree: the QDQ graph's qparams and the int8 outputs."""
from __future__ import annotations

import os
import traceback

import torch
import torch.nn as nn

import qcast


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.conv2(y) + y)
        return self.head(y.mean((2, 3)))


class Tokens(nn.Module):
    """Linears on (batch, tokens, features) with an outlier input channel: SmoothQuant applies."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    m = Tokens() if kind == "tokens" else Net()
    if kind != "tokens":
        m.bn1.running_mean.uniform_(-0.5, 0.5)
        m.bn1.running_var.uniform_(0.5, 2.0)
    return m.eval()


def data(kind: str, n: int = 12) -> list[torch.Tensor]:
    """Batches whose ranges differ a lot from one to the next (so each rank's shard has its own range)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        scale, shift = 0.25 * (i + 1) ** 1.5, (i % 3 - 1) * 0.5
        if kind == "tokens":
            x = torch.randn(2, 6, 16, generator=g) * scale + shift
            x[..., 3] *= 40.0  # the outlier channel
        else:
            x = torch.randn(2, 3, 10, 10, generator=g) * scale + shift
        out.append(x)
    return out


SCENARIOS = {
    # name: (model/data kind, QuantConfig fields)
    "default": ("cnn", {}),  # mse histograms, bias correction
    "kl": ("cnn", {"calibration": "kl"}),
    "minmax": ("cnn", {"calibration": "minmax", "bias_correction": False}),
    "percentile": ("cnn", {"calibration": "percentile"}),
    "ema": ("cnn", {"calibration": "ema"}),
    "adaround": ("cnn", {"weight_bits": 4, "rounding": "adaround", "adaround_iters": 20}),
    "smoothquant": ("tokens", {"activation": "int8", "smoothquant": 0.5}),
}


def shards(batches: list, world: int, empty_rank: int | None = None) -> list[list]:
    """Contiguous blocks (rank 0 the smallest ranges, the last rank the largest); ``empty_rank`` gets none."""
    ranks = [r for r in range(world) if r != empty_rank]
    out = [[] for _ in range(world)]
    per = -(-len(batches) // len(ranks))
    for j, r in enumerate(ranks):
        out[r] = batches[j * per:(j + 1) * per]
    return out


def run(name: str, batches: list) -> dict:
    kind, fields = SCENARIOS[name]
    m = model(kind)
    qm = qcast.quantize(m, batches, config=qcast.QuantConfig(backend="torch", **fields), progress=False,
                        check_speed=False)
    from qcast.quantized import QDQ
    qparams = [(mod.name, mod.qparams) for mod in qm.qcast_qdq.modules() if isinstance(mod, QDQ)]
    test = data(kind, 15)[-3:]
    with torch.no_grad():
        outs = [qm(x) for x in test]
    return {"qparams": qparams, "outputs": outs, "batches": qm.qcast_meta["calibration_batches"],
            "meta": {k: qm.qcast_meta.get(k) for k in ("smoothquant", "adaround")}}


def worker(rank: int, world: int, init: str, out_dir: str, names: list[str], empty_rank, bad_rank) -> None:
    torch.set_num_threads(1)
    os.environ["QCAST_BACKEND"] = "torch"
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    results = {}
    try:
        for name in names:
            kind = SCENARIOS[name][0]
            mine = shards(data(kind), world, empty_rank)[rank]
            results[name] = run(name, mine)
        if bad_rank is not None:
            mine = shards(data("cnn"), world)[rank]
            if rank == bad_rank:
                mine = list(mine)
                mine[-1] = mine[-1].clone()
                mine[-1][0, 0, 0, 0] = float("nan")
            try:
                run("minmax", mine)
                results["error"] = None
            except Exception as e:  # noqa: BLE001 - what each rank raised is the result
                results["error"] = (type(e).__name__, str(e))
    except Exception:  # noqa: BLE001
        results["crash"] = traceback.format_exc()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        torch.distributed.destroy_process_group()
