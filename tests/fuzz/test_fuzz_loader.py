"""The loader under random damage and deliberate tampering: only FormatError, never another exception, never code
execution, the file never changed. qcast files are safetensors + a JSON manifest; nothing is unpickled."""
import base64
import json
import os
import zlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

import qcast
from qcast.serialize import manifest_to_metadata, metadata_to_manifest
from tests.fuzz.graphs import GraphSpec, build

SPEC = GraphSpec(kind="image", channels=3, size=8, blocks=(("conv", 8, 3, 1, 1, True, True, "relu"),
                                                             ("residual", "plus", "relu", True),
                                                             ("float_op", "sin")),
                 head="linear", output="tuple", seed=7)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = build(SPEC)
    q = qcast.quantize(model, [SPEC.make_input(i) for i in range(2)], progress=False, check_speed=False)
    path = tmp_path_factory.mktemp("fuzz") / "m.qcast"
    qcast.save(q, path)
    return path.read_bytes()


def _load_bytes(tmp_path, data: bytes, name: str = "f.qcast"):
    p = tmp_path / name
    p.write_bytes(data)
    try:
        return qcast.load(p, backend="torch")
    finally:
        assert p.read_bytes() == data, "load() changed the file"


@settings(max_examples=60)
@given(cut=st.floats(0, 1, exclude_max=True))
def test_truncated_files_are_format_errors(saved, tmp_path_factory, cut):
    tmp = tmp_path_factory.mktemp("t")
    with pytest.raises(qcast.FormatError):
        _load_bytes(tmp, saved[: int(cut * len(saved))])


@settings(max_examples=80)
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=4))
def test_bit_flipped_files_load_the_same_model_or_are_format_errors(saved, tmp_path_factory, flips):
    """A flip lands in the header (JSON: parse error, wrong offsets), the zlib manifest (its checksum), the tensor data
    (qcast's SHA-256) or padding: either a FormatError, or (a flip in insignificant header whitespace) the same
    model."""
    data = bytearray(saved)
    for where, mask in flips:
        data[int(where * len(data))] ^= mask
    tmp = tmp_path_factory.mktemp("f")
    try:
        q = _load_bytes(tmp, bytes(data))
    except qcast.FormatError:
        return
    ref = _load_bytes(tmp, saved, "ref.qcast")
    x = SPEC.make_input(5)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(q(x), ref(x)))


def _with_manifest(data: bytes, edit) -> bytes:
    """``data`` with its manifest replaced by ``edit(manifest)`` (re-compressed, as a tamperer would)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    manifest = metadata_to_manifest(header["__metadata__"])
    edit(manifest)
    header["__metadata__"] = manifest_to_metadata(manifest)
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + n:]


def _first(manifest, op):
    return next(e for e in manifest["nodes"] if e["op"] == op)


def _payload(path):
    return f"open({str(path)!r}, 'w').write('pwned')"


# each: a manifest edit that would run code (writing the sentinel file) if load() trusted it
ATTACKS = {
    "builtins_exec": lambda m, s: _first(m, "call_function").update(target="builtins.exec", args=[_payload(s)]),
    "builtins_eval": lambda m, s: _first(m, "call_function").update(target="builtins.eval", args=[_payload(s)]),
    "import": lambda m, s: _first(m, "call_function").update(target="builtins.__import__", args=["os"]),
    "torch_load": lambda m, s: _first(m, "call_function").update(target="torch:load", args=[str(s)]),
    "torch_hub": lambda m, s: _first(m, "call_function").update(target="torch.hub:load", args=["x", "y"]),
    "cpp_extension": lambda m, s: _first(m, "call_function").update(
        target="torch.utils.cpp_extension:load_inline", args=["x", "int f(){return 0;}"]),
    "qcast_cli": lambda m, s: _first(m, "call_function").update(target="qcast.cli:main", args=[["demo"]]),
    "dunder_attr": lambda m, s: _first(m, "call_function").update(
        target="builtins.getattr", args=[{"__node__": _first(m, "placeholder")["name"]}, "__class__"]),
    "module_globals": lambda m, s: _first(m, "call_function").update(target="torch:__builtins__.eval",
                                                                      args=[_payload(s)]),
    "method_injection": lambda m, s: _first(m, "call_module").update(
        op="call_method", target=f"relu(); {_payload(s)}; x.relu", args=[{"__node__": _first(m, "placeholder")["name"]}]),
    "dunder_method": lambda m, s: _first(m, "call_module").update(
        op="call_method", target="__reduce_ex__", args=[{"__node__": _first(m, "placeholder")["name"]}, 2]),
    "kwarg_injection": lambda m, s: _first(m, "call_function").update(
        kwargs={"__dict__": [[f"x=({_payload(s)})", 1]]}),
    "target_injection": lambda m, s: _first(m, "call_module").update(target=f'a")or({_payload(s)})or("'),
    "input_name_injection": lambda m, s: m.update(pytree={"orig_args": [f"x=({_payload(s)})"], "in_spec": "",
                                                          "out_spec": None}),
    "class_name_injection": lambda m, s: m.update(class_name=f"X({_payload(s)})"),
    "dtype_tag": lambda m, s: _first(m, "call_function").update(args=[{"__dtype__": "load"}]),
    "node_kind": lambda m, s: _first(m, "call_function").update(op="root"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_tampered_manifests_never_run_code(saved, tmp_path, attack):
    sentinel = tmp_path / "sentinel"
    data = _with_manifest(saved, lambda m: ATTACKS[attack](m, sentinel))
    with pytest.raises(qcast.FormatError):
        q = _load_bytes(tmp_path, data)
        with torch.no_grad():
            q(SPEC.make_input(0))
    assert not sentinel.exists(), f"{attack}: the tampered file ran code"


@settings(max_examples=60)
@given(data=st.data())
def test_randomly_edited_manifests_are_format_errors_or_load(saved, tmp_path_factory, data):
    """Random edits of the decoded manifest (a value replaced by another JSON value), re-compressed so that no
    checksum catches them: load() raises FormatError or returns a model; nothing else escapes."""
    def edit(manifest):
        node = manifest
        for _ in range(data.draw(st.integers(1, 4))):
            if isinstance(node, dict) and node:
                key = data.draw(st.sampled_from(sorted(node)))
            elif isinstance(node, list) and node:
                key = data.draw(st.integers(0, len(node) - 1))
            else:
                break
            if not isinstance(node[key], (dict, list)) or data.draw(st.booleans()):
                node[key] = data.draw(st.one_of(st.none(), st.integers(-3, 10 ** 6), st.text(max_size=8),
                                                st.booleans(), st.lists(st.integers(0, 3), max_size=3), st.just({})))
                return
            node = node[key]

    bad = _with_manifest(saved, edit)
    try:
        _load_bytes(tmp_path_factory.mktemp("e"), bad)
    except qcast.FormatError:
        pass
