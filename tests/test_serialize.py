"""save/load: bit-exact round trip, no pickle, clear errors for truncated/tampered/newer files."""
import json
import os

import pytest
import torch

import qcast
from qcast.serialize import manifest_to_metadata, metadata_to_manifest
from tests.helpers import run_isolated
from tests.models import ZOO, flatten_output, randomize_bn_stats


def _quantized(name="resnet18"):
    fac, inp = ZOO[name]
    m = fac().eval()
    randomize_bn_stats(m, 0)
    q = qcast.quantize(m, [inp(batch=2, seed=s) for s in range(4)], progress=False)
    return m, q, inp(batch=2, seed=9)


def test_round_trip_is_bit_exact_and_small(tmp_path):
    m, q, x = _quantized("resnet18")
    path = tmp_path / "m.qcast"
    qcast.save(q, path)
    q2 = qcast.load(path)
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))
    assert [r for r in qcast.explain(q2)] == [r for r in qcast.explain(q)]
    torch.save(m.state_dict(), tmp_path / "f.pt")
    assert os.path.getsize(path) <= 0.3 * os.path.getsize(tmp_path / "f.pt")


@pytest.mark.parametrize("name", ["blazeface", "mobilenet_v2"])
def test_file_is_at_most_0_3x_the_float_state_dict(tmp_path, name):
    """Small models are where the manifest weighs: the graph description must not eat the int8 saving."""
    m, q, _ = _quantized(name)
    qcast.save(q, tmp_path / "m.qcast")
    torch.save(m.state_dict(), tmp_path / "f.pt")
    ratio = os.path.getsize(tmp_path / "m.qcast") / os.path.getsize(tmp_path / "f.pt")
    assert ratio <= 0.3, f"{name}: int8 file is {ratio:.3f}x the float file"


def test_file_needs_float_model_for_user_regions(tmp_path):
    m, q, x = _quantized("user_unet")
    path = tmp_path / "u.qcast"
    qcast.save(q, path)
    with pytest.raises(qcast.FormatError, match="model=model"):
        qcast.load(path)
    q2 = qcast.load(path, model=m)
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))


def test_truncated_tampered_and_newer_files(tmp_path):
    _, q, _ = _quantized("cifar_vgg_bn")
    path = tmp_path / "m.qcast"
    qcast.save(q, path)
    data = path.read_bytes()
    (tmp_path / "trunc.qcast").write_bytes(data[: len(data) // 2])
    with pytest.raises(qcast.FormatError, match="truncated|corrupted"):
        qcast.load(tmp_path / "trunc.qcast")
    tampered = bytearray(data)
    tampered[-10] ^= 0xFF
    (tmp_path / "tampered.qcast").write_bytes(bytes(tampered))
    with pytest.raises(qcast.FormatError, match="checksum"):
        qcast.load(tmp_path / "tampered.qcast")
    # a newer format version is refused with the upgrade hint
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    manifest = metadata_to_manifest(header["__metadata__"])
    manifest["version"] = 999
    for name, metadata in (("newer", manifest_to_metadata(manifest)),  # a newer manifest in today's container
                           ("newer_container", {**header["__metadata__"], "qcast_version": "999"})):
        _write_with_metadata(tmp_path / f"{name}.qcast", data, metadata)
        with pytest.raises(qcast.FormatError, match="newer qcast"):
            qcast.load(tmp_path / f"{name}.qcast")
    _write_with_metadata(tmp_path / "garbled.qcast", data, {**header["__metadata__"], "qcast_manifest_zlib": "eJz%%"})
    with pytest.raises(qcast.FormatError, match="manifest cannot be read"):
        qcast.load(tmp_path / "garbled.qcast")
    with pytest.raises(qcast.FormatError, match="no such file"):
        qcast.load(tmp_path / "missing.qcast")


def _write_with_metadata(path, data: bytes, metadata: dict) -> None:
    """Rewrite a safetensors file's header metadata, keeping its tensors byte for byte."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


def _old_format(q, path, version: int) -> None:
    """A file as qcast wrote it before format 3: the torch backend's lowered graph (what a model without its QDQ graph
    is saved as), no "graph" key, version 1 (plain JSON manifest) or 2 (zlib)."""
    qcast.save(qcast.QuantizedModel(q.graph_module, q.qcast_records, q.qcast_meta), path)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    manifest = metadata_to_manifest(json.loads(data[8:8 + n])["__metadata__"])
    assert manifest.pop("graph") == "torch"
    manifest["version"] = version
    metadata = {"qcast_manifest": json.dumps(manifest)} if version == 1 else manifest_to_metadata(manifest)
    _write_with_metadata(path, data, metadata)


@pytest.mark.parametrize("version", [1, 2])
def test_files_of_earlier_versions_still_load(tmp_path, version):
    _, q, x = _quantized("cifar_vgg_bn")
    _old_format(q, tmp_path / "old.qcast", version)
    loaded = qcast.load(tmp_path / "old.qcast")
    assert loaded.qcast_meta["backend"] == "torch" and qcast.explain(loaded) == qcast.explain(q)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    with pytest.raises(qcast.FormatError, match="earlier qcast.*openvino"):
        qcast.load(tmp_path / "old.qcast", backend="openvino")


def test_save_writes_no_pickle(tmp_path):
    _, q, _ = _quantized("cifar_vgg_bn")
    path = tmp_path / "m.qcast"
    qcast.save(q, path)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["qcast_format"] == "qcast" and meta["qcast_version"] == "3"
    assert metadata_to_manifest(meta)["format"] == "qcast"
    assert b"\x80\x04" not in path.read_bytes()[:64]  # not a pickle stream


def test_loaded_model_is_in_eval_mode_and_keeps_a_kernel_per_call_site(tmp_path):
    class Shared(torch.nn.Module):  # one conv called on inputs of very different ranges
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 8, 3)

        def forward(self, big, small):
            return self.conv(big), self.conv(small)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(2, 4, 12, 12, generator=g) * 8.0, torch.randn(2, 4, 12, 12, generator=g)) for _ in range(4)]
    q = qcast.quantize(Shared().eval(), data, progress=False)
    path = tmp_path / "shared.qcast"
    qcast.save(q, path)
    q2 = qcast.load(path)
    assert not q2.training
    assert {n.target for n in q2.graph_module.graph.nodes if n.op == "call_module"} == {"conv", "conv__qcast_site1"}
    with torch.no_grad():
        for a, b in zip(q(*data[0]), q2(*data[0])):
            assert torch.equal(a, b)
    assert qcast.explain(q2) == qcast.explain(q)


def test_round_trip_of_constant_and_number_operands(tmp_path):
    """Int8 kernels holding a quantized parameter/buffer (``y * self.scale``, ``y + self.shift``) or taking a
    number at run time (``y + v``, v a forward() argument) are saved and rebuilt bit-exact."""

    class Operands(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.scale = torch.nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
            self.register_buffer("shift", torch.randn(8, 1, 1))
            self.head = torch.nn.Conv2d(8, 4, 1)

        def forward(self, x, v):
            return self.head(torch.relu(self.conv(x) * self.scale + self.shift) + v)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = Operands().eval()
    q = qcast.quantize(model, [(torch.randn(2, 3, 12, 12, generator=g), 0.25 * i - 0.5) for i in range(5)],
                       progress=False)
    assert [(r.op, r.precision) for r in qcast.explain(q)] == [
        ("conv2d", "int8"), ("mul", "int8"), ("add", "int8"), ("add", "int8"), ("conv2d", "int8")]
    path = tmp_path / "operands.qcast"
    qcast.save(q, path)
    q2 = qcast.load(path)
    assert qcast.explain(q2) == qcast.explain(q)
    assert not [n for n in q2.graph_module.graph.nodes if n.op == "get_attr"]  # the constants live in the kernels
    x = torch.randn(2, 3, 12, 12, generator=g)
    with torch.no_grad():
        for v in (0.3, -0.2):
            assert torch.equal(q(x, v), q2(x, v))
            assert qcast.report.sqnr(model(x, v), q2(x, v)) > 37.0  # measured 41.3 / 40.2 dB


def test_round_trip_keeps_a_bias_created_by_bias_correction(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 1, bias=False)).eval()
    calib = [torch.rand(2, 3, 8, 8) + 2.0 for _ in range(3)]
    q = qcast.quantize(model, calib, config={"bias_correction": True}, progress=False)
    assert q.graph_module.get_submodule("0").bias is not None  # the correction gave the bias-less conv a bias
    qcast.save(q, tmp_path / "m.qcast")
    q2 = qcast.load(tmp_path / "m.qcast")
    x = torch.rand(2, 3, 8, 8) + 2.0
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))
    assert qcast.QuantConfig.from_dict(q2.qcast_meta["config"]).bias_correction is True


class _TinyEncoder(torch.nn.Module):
    """Token embedding, per-token dynamic linears, int8 attention matmuls and softmax: the transformer kernels."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.qkv = torch.nn.Linear(16, 48)
        self.out = torch.nn.Linear(16, 16)

    def forward(self, ids):
        q, k, v = self.qkv(self.emb(ids)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1)
        return self.out(att @ v)


def test_a_fresh_process_loads_transformer_kernels(tmp_path):
    """load() must not depend on quantize() having imported the kernel modules first (it once raised
    'unknown int8 kernel QEmbedding' in a new process)."""
    torch.manual_seed(0)
    m = _TinyEncoder().eval()
    ids = [torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    q = qcast.quantize(m, ids, progress=False)
    kinds = {type(mod).__name__ for mod in q.modules()}
    assert {"QEmbedding", "QLinearDynamic"} <= kinds, kinds
    path, x = tmp_path / "t.qcast", ids[0]
    qcast.save(q, path)
    with torch.no_grad():
        torch.save(q(x), tmp_path / "ref.pt")
    torch.save(x, tmp_path / "x.pt")
    code = ("import torch, qcast\n"
            f"q = qcast.load({str(path)!r})\n"
            f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
            f"ref = torch.load({str(tmp_path / 'ref.pt')!r})\n"
            "with torch.no_grad():\n"
            "    assert torch.equal(q(x), ref)\n")
    done = run_isolated(code, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_load_imports_saved_output_types_only_from_allowed_packages():
    """A file names the modules of its output types; load() imports only those of transformers/torch or of
    packages the caller already imported (the stdlib's ``this`` prints on import: it must stay unimported)."""
    import json as _json
    import sys

    from qcast.serialize import _import_pytree_types

    assert "this" not in sys.modules
    spec = _json.dumps([1, {"type": "this.Anything", "context": "null", "children_spec": []}])
    _import_pytree_types({"in_spec": spec, "out_spec": spec})
    assert "this" not in sys.modules


@pytest.mark.parametrize("write", [lambda m, p: torch.save(m, p), lambda m, p: torch.save(m.state_dict(), p),
                                   lambda m, p: p.write_bytes(__import__("pickle").dumps({"weight": [1.0]}))],
                         ids=["torch.save(model)", "torch.save(state_dict)", "pickle"])
def test_a_torch_save_or_pickle_file_is_named_for_what_it_is(tmp_path, write):
    path = tmp_path / "model.pt"
    write(torch.nn.Conv2d(3, 4, 3), path)
    before = path.read_bytes()
    with pytest.raises(qcast.FormatError) as e:
        qcast.load(path)
    msg = str(e.value)
    assert "not a qcast file" in msg and "truncated or corrupted" not in msg, msg
    assert ("torch.save" in msg) == (path.read_bytes()[:2] == b"PK") and "weights_only=True" in msg
    assert "qcast.quantize" in msg and path.read_bytes() == before  # the user's file is never changed


def test_functions_saved_under_an_earlier_module_name_still_resolve():
    """Files of earlier versions name graph functions by the module they lived in then (``qcast/kernels/`` is now the
    torch backend's ``qcast/backends/torch/kernels/``; masked_softmax moved to ``qcast.nn``)."""
    from qcast.nn import masked_softmax
    from qcast.serialize import _resolve_fn

    assert _resolve_fn("qcast.kernels.attention:masked_softmax", set()) is masked_softmax
    assert _resolve_fn("qcast.nn:masked_softmax", set()) is masked_softmax


def test_aten_operators_named_like_dunders_resolve_and_other_dunders_are_refused():
    """torch.export graphs call ``aten.__and__.Tensor`` (a mask's ``&``): the loader resolves it among ATen's
    operators; any other dunder in a saved target (``__class__``, ``__subclasses__``) stays refused."""
    from qcast.errors import FormatError
    from qcast.serialize import _resolve_fn

    assert _resolve_fn("torch.ops:aten.__and__.Tensor", set()) is torch.ops.aten.__and__.Tensor
    for bad in ("torch.ops:aten.__class__", "torch.ops:__class__.__and__", "torch.ops:aten.__and__.__class__",
                "torch:Tensor.__subclasses__"):
        with pytest.raises(FormatError):
            _resolve_fn(bad, set())
