"""export: the quantized model as a file another engine runs on its own.

* ``.onnx``: canonical QDQ ONNX, the pattern ONNX Runtime's int8 fusions take (``qcast.backends.onnxruntime``);
* ``.xml``: an OpenVINO IR (``.xml`` + ``.bin``), the model the openvino backend compiles.

Both are made from the model's QDQ graph (qcast's own qparams and weights, whatever backend runs the model here), so
an exported file computes what ``qcast.explain`` / ``qcast.compare`` describe. Files are written next to the target
and renamed into place: an existing file is never left half-written.
"""
from __future__ import annotations

import os
import tempfile

from .errors import UnsupportedError
from .quantized import QuantizedModel

FORMATS = {".onnx": "ONNX (canonical QDQ, for ONNX Runtime)", ".xml": "OpenVINO IR (.xml + .bin)"}


def _op_of(qdq, name: str) -> str:
    return next(n.meta.get("qcast_op", "") for n in qdq.graph.nodes if n.meta.get("qcast_name", n.name) == name)


def export(qmodel: QuantizedModel, path: str | os.PathLike) -> str:
    """Write ``qmodel`` as the engine file its extension names (``.onnx`` or ``.xml``); returns the path."""
    from .convert import example_call

    if not isinstance(qmodel, QuantizedModel):
        raise UnsupportedError(f"export() needs a model returned by qcast.quantize/convert, got {type(qmodel).__name__}")
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise UnsupportedError(f"export({path!r}): unknown format {ext or '(no extension)'!r}; export writes "
                               + ", ".join(f"{k} {v}" for k, v in FORMATS.items()))
    qdq = qmodel.qcast_qdq
    if qdq is None:
        raise UnsupportedError("export() needs the model's QDQ graph, which a model read by qcast.load() does not hold "
                               "yet (files keep the torch backend's lowering): export the model returned by "
                               "qcast.quantize/convert")
    from .backends import get_backend
    engine = "onnxruntime" if ext == ".onnx" else "openvino"
    backend = get_backend(engine)  # UnsupportedError with the pip command if missing
    held = [n.meta.get("qcast_name", n.name) for n in qdq.graph.nodes if n.meta.get("qcast_op") in backend.torch_ops]
    if held:
        raise UnsupportedError(f"export({path!r}): {held[:3]} ({', '.join(sorted({_op_of(qdq, h) for h in held}))}) "
                               f"cannot go into a {ext} file: {engine}'s converter fails on them, and the {engine} "
                               "backend runs them in torch between its stages. Use qcast.save() and "
                               f"qcast.load(path, backend={engine!r}), or keep them out of the model")
    args, kwargs = example_call(qdq)
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.TemporaryDirectory(dir=folder, prefix=".qcast-export-") as tmp:
        staged = os.path.join(tmp, os.path.basename(path))
        if ext == ".onnx":
            from .backends.onnxruntime import export_qdq_onnx
            export_qdq_onnx(qdq, args, staged)
            moves = [(staged, path)]
        else:
            import openvino as ov

            from .backends.openvino import to_openvino
            model = to_openvino(qdq, args, kwargs)[0]
            ov.save_model(model, staged, compress_to_fp16=False)
            moves = [(staged, path), (staged[:-4] + ".bin", path[:-4] + ".bin")]
        for src, dst in moves:
            os.replace(src, dst)
    return path
