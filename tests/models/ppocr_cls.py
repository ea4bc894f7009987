"""PaddleOCR's text-direction classifier (PP-OCR mobile v2.0 "cls"), rebuilt from the real weights in a wheel.

The ``rapidocr-onnxruntime`` wheel ships ``models/ch_ppocr_mobile_v2.0_cls_infer.onnx`` (585 kB): a MobileNetV3-small
backbone at width 0.35 (hardswish, squeeze-excite gates with Paddle's hard sigmoid ``clip(0.2 x + 0.5, 0, 1)``,
depthwise 3x3 and 5x5 convs, linear bottlenecks, residual adds; the text-recognition variant, whose stride-2 stages
halve only the height), a 2x2 max-pool, a global average and a 2-way linear head: is a text line upright
(``0``) or upside down (``180``)? PaddleOCR runs it on every detected text line before recognition.

The network is re-declared here as a plain ``nn.Module`` (PaddleOCR's own names: ``conv1``, ``blocks.N``,
``conv_last``, ``fc``) and its weights are read from the ONNX file's constants (the ``onnx`` package parses it; the
wheel is found without importing it, since its package imports OpenCV). The forward returns logits; the ONNX
graph ends in a softmax. ``tests/realweights/test_ppocr_cls.py`` checks the rebuild against ONNX Runtime running
the original file.

Input: ``(N, 3, 48, 192)`` in ``[-1, 1]`` (RGB/255, minus 0.5, over 0.5), text resized to height 48 keeping its
aspect ratio and zero-padded on the right (:func:`preprocess`, as ``rapidocr``'s ``resize_norm_img``).
"""
from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ONNX_NAME = "ch_ppocr_mobile_v2.0_cls_infer.onnx"
INPUT_SHAPE = (3, 48, 192)
LABELS = ("0", "180")
SCALE = 0.35

# MobileNetV3-small as PaddleOCR's rec_mobilenet_v3 declares it: kernel, expanded, out, squeeze-excite, activation,
# stride (a pair halves the height only)
_CFG = [
    (3, 16, 16, True, "relu", (2, 1)),
    (3, 72, 24, False, "relu", (2, 1)),
    (3, 88, 24, False, "relu", 1),
    (5, 96, 40, True, "hardswish", (2, 1)),
    (5, 240, 40, True, "hardswish", 1),
    (5, 240, 40, True, "hardswish", 1),
    (5, 120, 48, True, "hardswish", 1),
    (5, 144, 48, True, "hardswish", 1),
    (5, 288, 96, True, "hardswish", (2, 1)),
    (5, 576, 96, True, "hardswish", 1),
    (5, 576, 96, True, "hardswish", 1),
]


def onnx_path() -> str | None:
    """Path of the classifier's ONNX file inside the installed ``rapidocr-onnxruntime`` wheel, or None."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", ONNX_NAME)
    return path if os.path.exists(path) else None


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvBN(nn.Sequential):
    """conv (no bias) -> BatchNorm -> optional activation (Paddle's ConvBNLayer)."""

    def __init__(self, cin, cout, k, stride=1, groups=1, act=None):
        layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act == "relu":
            layers.append(nn.ReLU(inplace=True))
        elif act == "hardswish":
            layers.append(nn.Hardswish(inplace=True))
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    """global average -> 1x1 conv -> relu -> 1x1 conv -> Paddle's hard sigmoid -> scale the input."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels // reduction, 1)
        self.conv2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        s = self.conv2(F.relu(self.conv1(s)))
        return x * torch.clamp(0.2 * s + 0.5, 0.0, 1.0)  # Paddle's hardsigmoid(slope=0.2, offset=0.5)


class ResidualUnit(nn.Module):
    """expand 1x1 -> depthwise kxk -> [squeeze-excite] -> linear 1x1 (+ input when shapes match)."""

    def __init__(self, cin, mid, cout, k, stride, se, act):
        super().__init__()
        self.expand_conv = ConvBN(cin, mid, 1, act=act)
        self.bottleneck_conv = ConvBN(mid, mid, k, stride, groups=mid, act=act)
        self.mid_se = SqueezeExcite(mid) if se else None
        self.linear_conv = ConvBN(mid, cout, 1)
        self.shortcut = stride == 1 and cin == cout

    def forward(self, x):
        y = self.bottleneck_conv(self.expand_conv(x))
        if self.mid_se is not None:
            y = self.mid_se(y)
        y = self.linear_conv(y)
        return x + y if self.shortcut else y


class PPOCRTextDirection(nn.Module):
    """MobileNetV3-small (x0.35, rec strides) + 2x2 max-pool + global average + linear: logits for 0 / 180 degrees."""

    def __init__(self, scale: float = SCALE, num_classes: int = 2):
        super().__init__()
        cin = _make_divisible(16 * scale)
        self.conv1 = ConvBN(3, cin, 3, stride=2, act="hardswish")
        blocks = []
        for k, exp, c, se, act, s in _CFG:
            mid, cout = _make_divisible(scale * exp), _make_divisible(scale * c)
            blocks.append(ResidualUnit(cin, mid, cout, k, s, se, act))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.conv_last = ConvBN(cin, _make_divisible(scale * 576), 1, act="hardswish")
        self.pool = nn.MaxPool2d(2, 2)
        self.fc = nn.Linear(_make_divisible(scale * 576), num_classes)

    def forward(self, x):
        x = self.pool(self.conv_last(self.blocks(self.conv1(x))))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def _onnx_constants(path: str) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and not node.output[0].startswith("Constant@"):
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def _bn_names(prefix: str, module: str) -> dict[str, str]:
    return {f"{module}.weight": f"{prefix}_bn_scale", f"{module}.bias": f"{prefix}_bn_offset",
            f"{module}.running_mean": f"{prefix}_bn_mean", f"{module}.running_var": f"{prefix}_bn_variance"}


def _name_map() -> dict[str, str]:
    """torch state_dict key -> Paddle/ONNX constant name."""
    names = {"conv1.0.weight": "conv1_weights", **_bn_names("conv1", "conv1.1"),
             "conv_last.0.weight": "conv_last_weights", **_bn_names("conv_last", "conv_last.1")}
    for i, (_k, _e, _c, se, _a, _s) in enumerate(_CFG):
        p, m = f"conv{i + 2}", f"blocks.{i}"
        for part, mod in (("expand", "expand_conv"), ("depthwise", "bottleneck_conv"), ("linear", "linear_conv")):
            names[f"{m}.{mod}.0.weight"] = f"{p}_{part}_weights"
            names.update(_bn_names(f"{p}_{part}", f"{m}.{mod}.1"))
        if se:
            for j in (1, 2):
                names[f"{m}.mid_se.conv{j}.weight"] = f"{p}_se_{j}_weights"
                names[f"{m}.mid_se.conv{j}.bias"] = f"{p}_se_{j}_offset"
    return names


def ppocr_text_direction(path: str | None = None) -> PPOCRTextDirection:
    """The classifier with PaddleOCR's trained weights, in eval mode."""
    path = path or onnx_path()
    if path is None:
        raise FileNotFoundError(f"{ONNX_NAME} not found: `pip install --no-deps rapidocr-onnxruntime==1.4.4` "
                                "(make test does) and `pip install onnx` to read it")
    consts = _onnx_constants(path)
    model = PPOCRTextDirection()
    state = {}
    for key, name in _name_map().items():
        state[key] = torch.from_numpy(np.ascontiguousarray(consts[name])).float()
    state["fc.weight"] = torch.from_numpy(np.ascontiguousarray(consts["fc_0.w_0"].T)).float()  # MatMul (in, out)
    state["fc.bias"] = torch.from_numpy(consts["fc_0.b_0"]).float()
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise KeyError(f"no ONNX constant for {missing}")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise ValueError(f"{k}: ONNX constant has shape {tuple(v.shape)}, the rebuilt layer {tuple(own[k].shape)}")
    for m in model.modules():  # Paddle's BatchNorm epsilon
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-5
    model.load_state_dict(state, strict=False)
    return model.eval()


def preprocess(image: np.ndarray) -> torch.Tensor:
    """One HxWx3 (or HxW) uint8 image of a text line -> (3, 48, 192) float input, as rapidocr prepares it.

    Resized to height 48 keeping the aspect ratio (bilinear; rapidocr uses cv2.resize), width capped at 192,
    scaled to [-1, 1] and zero-padded on the right.
    """
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    c, h_out, w_max = INPUT_SHAPE
    h, w = image.shape[:2]
    w_out = min(w_max, int(math.ceil(h_out * w / float(h))))
    t = torch.from_numpy(np.array(image[:, :, :3])).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=(h_out, w_out), mode="bilinear", align_corners=False)[0]
    out = torch.zeros(c, h_out, w_max)
    out[:, :, :w_out] = (t / 255.0 - 0.5) / 0.5
    return out
