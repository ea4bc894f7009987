"""The command line: the fixes it prints are command-line fixes, and engines are spelled as in QuantConfig."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import qcast
from qcast.cli import main
from qcast.backends.torch.kernels import kernels


def build_small():
    """Factory for the CLI tests (``tests.test_cli:build_small``)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(8 * 6 * 6, 4)).eval()


def build_unet():
    """A model with a region qcast keeps in float (its own data-dependent Python)."""
    from tests.models import seed_everything, user_unet
    seed_everything(0)
    return user_unet(width=8).eval()


def _calib(tmp_path, shape=(2, 3, 8, 8)):
    path = tmp_path / "calib.safetensors"
    save_file({f"b{i}": torch.randn(*shape, generator=torch.Generator().manual_seed(i)) for i in range(3)}, str(path))
    return str(path)


def test_ops_by_engine_lists_conv_and_linear_on_qnnpack(capsys):
    """`qcast ops --engine qnnpack` lists what runs int8 on ARM's engine: conv/linear do, when asked."""
    assert main(["ops", "--engine", "qnnpack"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0] for line in out.splitlines()[1:] if line.strip() and not line.startswith(" ")}
    assert {"conv2d", "linear", "add", "cat"} <= rows, out
    assert "linear:dynamic" not in rows  # fbgemm only
    n = len([k for k in kernels("torch") if "qnnpack" in k.engines or "native" in k.engines])
    assert f"{n} int8 ops on engine qnnpack" in out and n > 30


def test_ops_with_an_engine_given_as_backend_says_which_flag_to_use(capsys):
    assert main(["ops", "--backend", "qnnpack"]) == 1
    err = capsys.readouterr().err
    assert "unknown backend 'qnnpack'" in err and "qcast ops --engine qnnpack" in err, err


def test_quantize_with_engine_flag_runs_conv_and_linear_on_that_engine(tmp_path, capsys):
    if "qnnpack" not in torch.backends.quantized.supported_engines:
        pytest.skip("qnnpack is not in this PyTorch build")
    out = tmp_path / "m.qcast"
    assert main(["quantize", "tests.test_cli:build_small", "--calib", _calib(tmp_path), "--out", str(out),
                 "--engine", "qnnpack"]) == 0
    rows = [r for r in qcast.explain(qcast.load(out)) if r.op in ("conv2d", "linear")]
    assert len(rows) == 2 and all(r.precision == "int8" and r.engine == "qnnpack" for r in rows), rows


def test_explain_of_a_file_needing_the_float_model_gives_the_command_line_fix(tmp_path, capsys):
    model = build_unet()
    qmodel = qcast.quantize(model, [torch.randn(1, 3, 16, 16) for _ in range(3)], progress=False, check_speed=False)
    path = str(tmp_path / "u.qcast")
    qcast.save(qmodel, path)
    assert main(["explain", path]) == 1
    err = capsys.readouterr().err
    assert f"qcast explain {path} --model MODULE:FACTORY" in err and "'gate'" in err, err
    assert "model=model" not in err  # the Python spelling is no use on the command line
    assert main(["explain", path, "--model", "tests.test_cli:build_unet"]) == 0
    assert "gate" in capsys.readouterr().out


def test_export_writes_an_onnx_file_that_onnxruntime_runs(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    saved = tmp_path / "m.qcast"
    assert main(["quantize", "tests.test_cli:build_small", "--calib", _calib(tmp_path), "--out", str(saved),
                 "--backend", "torch"]) == 0
    assert main(["export", str(saved), str(tmp_path / "m.onnx")]) == 0
    assert "wrote" in capsys.readouterr().out
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 8, 8)
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        ref = build_small()(x)
    assert out.shape == ref.shape and qcast.report.sqnr(ref, out) > 25.0


def test_ops_for_an_engine_backend_says_it_executes_the_torch_plan(capsys):
    assert main(["ops", "--backend", "openvino"]) == 0
    out = capsys.readouterr().out
    assert "conv2d" in out and "planned by the torch kernel table and executed by openvino" in out


def test_ops_table_has_a_column_per_backend_generated_from_the_registry_and_declarations(capsys):
    """`qcast ops` prints, for every kernel-table entry, what each backend runs it as: Backend.runs over the registry,
    not a hand-written table. The torch column is int8 everywhere; the engines run run-time-quantized ops (LSTM, GRU,
    embeddings) in float unless they declare otherwise, and EmbeddingBag through the torch kernel between their
    stages."""
    from qcast.backends import backend_names, registered
    _BACKENDS = registered()
    assert main(["ops"]) == 0
    out = capsys.readouterr().out.splitlines()
    header = out[0].split()
    names = [n for n in header if n in backend_names()]
    assert names[0] == "torch" and set(names) == set(backend_names())
    rows = {line.split()[0]: line.split() for line in out[1:] if line.strip() and not line.startswith(" ")
            and line.split()[0] in {k.op for k in kernels()}}
    assert set(rows) == {k.op for k in kernels()}
    for k in kernels():
        cells = rows[k.op][3:3 + len(names)]
        assert cells == [_BACKENDS[n].runs(k.op, k.kind) for n in names], (k.op, cells)
        assert cells[0] == "int8"
    assert rows["lstm"][3:3 + len(names)] == ["int8" if n == "torch" else "float" for n in names]
    assert rows["embedding_bag"][3:3 + len(names)] == ["int8" if n == "torch" else "torch-int8" for n in names]
    if "openvino" in names:  # OpenVINO quantizes per-token linears itself, ONNX Runtime does not
        assert rows["linear:dynamic"][3 + names.index("openvino")] == "int8"
        assert rows["linear:dynamic"][3 + names.index("onnxruntime")] == "float"
