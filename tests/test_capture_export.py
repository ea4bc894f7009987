"""The torch.export fallback (qcast/capture_export.py): a top-level forward torch.fx cannot trace (Hugging Face
style: a decorator rewriting **kwargs, a branch on an input's shape, a dict output) is captured whole, layers keep
their module paths, other shapes run, and save/load keeps the output structure."""
import functools

import pytest
import torch
import torch.nn as nn

import qcast
from qcast.errors import CaptureError
from tests.helpers import sqnr


def _defaults_into_kwargs(fn):
    """What transformers' decorators do: write into **kwargs (torch.fx hands a Proxy there and fails)."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        kwargs["scale"] = kwargs.get("scale", 1.0)
        return fn(self, *args, **kwargs)
    return wrapper


class TinyEncoder(nn.Module):
    def __init__(self, vocab=50, dim=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, 8)

    @_defaults_into_kwargs
    def forward(self, input_ids, attention_mask=None, **kwargs):
        if input_ids.shape[1] > 1:  # a Python branch on a shape: fine for export, a TraceError for fx
            x = self.norm(self.embed(input_ids))
        else:
            x = self.embed(input_ids)
        x = x + self.fc2(torch.relu(self.fc1(x))) * kwargs["scale"]
        if attention_mask is not None:
            x = x * attention_mask.unsqueeze(-1).to(x.dtype)
        return {"hidden": x, "logits": self.head(x.mean(1))}


def _batch(b, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[0, n // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def quantized():
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    calib = [_batch(4, 16, seed=i) for i in range(4)]
    return model, qcast.quantize(model, calib, progress=False)


def test_fx_fails_on_the_top_level_and_export_captures_it(quantized):
    model, qmodel = quantized
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)
    rows = {r.name: r for r in qcast.explain(qmodel)}
    for layer in ("fc1", "fc2", "head"):  # ATen calls mapped back to the user's layers, by module path
        assert rows[layer].op == "linear" and rows[layer].precision == "int8", rows[layer]
    assert rows["norm"].op == "layer_norm"
    assert all(r.reason for r in rows.values())


def test_other_batch_and_length_keep_fidelity_and_structure(quantized):
    model, qmodel = quantized
    batch = _batch(3, 24, seed=9)  # calibrated at 4 x 16
    with torch.no_grad():
        ref, out = model(**batch), qmodel(**batch)
    assert isinstance(out, dict) and set(out) == {"hidden", "logits"}
    assert out["hidden"].shape == ref["hidden"].shape == (3, 24, 32)
    assert sqnr(ref["hidden"], out["hidden"]) > 25 and sqnr(ref["logits"], out["logits"]) > 20


def test_save_load_keeps_output_structure(quantized, tmp_path):
    _, qmodel = quantized
    qcast.save(qmodel, tmp_path / "m.qcast")
    loaded = qcast.load(tmp_path / "m.qcast")
    batch = _batch(2, 8, seed=3)
    a, b = qmodel(**batch), loaded(**batch)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # depends on the values: neither fx nor export can capture it
            return self.fc(x)
        return x


def test_uncapturable_top_level_names_both_tracers_and_the_fix():
    with pytest.raises(CaptureError) as e:
        qcast.quantize(DataDependent(), [torch.randn(2, 4)], progress=False)
    msg = str(e.value)
    assert "torch.fx" in msg and "torch.export" in msg and "submodule" in msg
