"""Calibration state (qcast/calibration_state.py): stop at 50%, save, resume in a new process -> the qparams and
int8 outputs of one uninterrupted run; bad files and mismatched models are clear errors; the state's size does not
grow with the number of batches."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import qcast
from qcast.errors import CalibrationError, FormatError
from tests.distributed import _workers as W


def _observed(config=None):
    return qcast.prepare(W.model("cnn"), W.data("cnn")[0], config or qcast.QuantConfig(backend="torch"))


def test_resume_in_a_new_process_gives_the_uninterrupted_qparams(tmp_path):
    data = W.data("cnn")
    path = tmp_path / "cal.qcs"
    half = _observed()
    qcast.calibrate(half, data[:6], progress=False, checkpoint=path)
    assert qcast.CalibrationState.load(path).batches == 6
    script = textwrap.dedent(f"""
        import torch, qcast
        from tests.distributed import _workers as W
        torch.set_num_threads(1)
        obs = qcast.prepare(W.model("cnn"), W.data("cnn")[0], qcast.QuantConfig(backend="torch"))
        qcast.calibrate(obs, W.data("cnn")[6:], progress=False, resume={str(path)!r})
        q = qcast.convert(obs, backend="torch")
        with torch.no_grad():
            torch.save({{"qparams": [o.qparams() for _, o in obs.observers()], "batches": obs.qcast_summary.batches,
                         "out": q(W.data("cnn", 15)[-1])}}, {str(tmp_path / "resumed.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=str(tmp_path.parent.parent), timeout=300,
                   env={**__import__("os").environ, "PYTHONPATH": ":".join(sys.path)})
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)
    whole = _observed()
    qcast.calibrate(whole, data, progress=False)
    assert resumed["batches"] == 12
    assert resumed["qparams"] == [o.qparams() for _, o in whole.observers()]
    with torch.no_grad():
        assert torch.equal(resumed["out"], qcast.convert(whole, backend="torch")(W.data("cnn", 15)[-1]))


def test_checkpoint_every_writes_during_calibration_and_the_state_is_fixed_size(tmp_path):
    path = tmp_path / "c.qcs"
    obs = _observed()
    qcast.calibrate(obs, W.data("cnn")[:5], progress=False, checkpoint=path, checkpoint_every=2)
    assert qcast.CalibrationState.load(path).batches == 5  # the last write: when calibration ended
    small = obs.calibration_state()
    qcast.calibrate(obs, W.data("cnn", 40), progress=False)
    big = obs.calibration_state()
    assert big.batches == 45 and big.nbytes == small.nbytes > 0
    assert "batches=45" in repr(big)


def test_resume_errors_name_the_fix(tmp_path):
    path = tmp_path / "c.qcs"
    obs = _observed()
    qcast.calibrate(obs, W.data("cnn")[:2], progress=False, checkpoint=path)
    other = _observed(qcast.QuantConfig(backend="torch", calibration="kl"))
    with pytest.raises(CalibrationError, match="differently prepared"):
        qcast.calibrate(other, W.data("cnn")[2:4], progress=False, resume=path)
    with pytest.raises(CalibrationError, match="freshly prepared"):
        qcast.calibrate(obs, W.data("cnn")[2:4], progress=False, resume=path)
    bad = tmp_path / "bad.qcs"
    bad.write_bytes(b"not a state")
    with pytest.raises(FormatError):
        qcast.calibrate(_observed(), W.data("cnn")[2:4], progress=False, resume=bad)
    with pytest.raises(CalibrationError, match="checkpoint=PATH"):
        qcast.calibrate(_observed(), W.data("cnn")[2:4], progress=False, checkpoint_every=2)
