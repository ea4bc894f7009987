"""Random models for fuzzing qcast: a spec (frozen dataclass, its repr is valid Python) and the nn.Module it builds.

A spec is drawn through a ``Chooser``: ``HypothesisChooser`` (property tests, shrinkable) or ``RandomChooser``
(``benchmarks/fuzz.py``: graph ``k`` of a long run is ``random_spec(k)``, reproducible without hypothesis). Failing
specs become regression tests by pasting their repr (``tests/fuzz/test_regressions.py``).

Vocabulary, as a new user writes models:

* image models (N, C, H, W): ``nn.Conv2d`` (groups, stride, bias, BN), functional ``F.conv2d`` with a parameter or
  buffer weight, ``nn.ConvTranspose2d``, residual blocks (``a + b``, ``torch.add``, in-place ``+=``), branches joined
  by ``torch.cat`` or a sum, one module called twice (shared), in-place activations (``nn.ReLU(inplace=True)``,
  ``x.relu_()``), every activation qcast knows and some it does not (GELU, SiLU, ELU, leaky ReLU, hardsigmoid),
  pooling, resize, per-channel affine with parameters, ops that have no int8 kernel (``sin``, ``abs``, GroupNorm,
  mean subtraction), shape-dependent Python (a branch on ``x.shape`` inside a submodule) and data-dependent Python
  (a branch on ``x.mean()``), heads written as ``nn.Linear``, ``F.linear(x, self.w)``, ``x @ self.w.t()`` or
  ``torch.matmul(x, self.w)``;
* token models (N, T, F): linears (module, functional, matmul with a weight), LayerNorm, GELU, residual MLPs,
  single-head attention (``q @ k.transpose``, softmax, ``@ v``), ``nn.Conv1d`` over the transposed sequence,
  ``nn.LSTM`` / ``nn.GRU``;
* video models (N, C, T, H, W): ``nn.Conv3d`` and 3-D pooling;
* outputs: a tensor, a tuple or a dict.

Ops other engineers bring to int8 (functional convs, ConvTranspose, Conv3d, LSTM/GRU, more activations) are here as
"may stay float": the properties check that each is in ``explain()`` with a reason, never that it is int8.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------
# choosers: one spec-drawing code for hypothesis and for plain seeds
# ------------------------------------------------------------------------------------------------


class RandomChooser:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def choice(self, options: Sequence):
        return self.rng.choice(list(options))

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def boolean(self) -> bool:
        return self.rng.random() < 0.5


class HypothesisChooser:
    def __init__(self, draw):
        from hypothesis import strategies as st
        self.draw, self.st = draw, st

    def choice(self, options: Sequence):
        return self.draw(self.st.sampled_from(list(options)))

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(self.st.integers(lo, hi))

    def boolean(self) -> bool:
        return self.draw(self.st.booleans())


# ------------------------------------------------------------------------------------------------
# the spec
# ------------------------------------------------------------------------------------------------
IMAGE_BLOCKS = ("conv", "conv", "fconv", "convT", "residual", "branch", "shared", "act", "pool", "float_op",
                "affine", "shape_py", "data_py", "resize")
TOKEN_BLOCKS = ("linear", "flinear", "matmul_w", "layernorm", "act", "mlp", "attention", "conv1d", "rnn", "float_op")
VIDEO_BLOCKS = ("conv3d", "conv3d", "act", "pool3d")
ACTS = ("relu", "relu_inplace", "relu_method", "relu6", "hardswish", "sigmoid", "tanh", "gelu", "silu", "leaky_relu",
        "elu", "hardsigmoid", "hardtanh", "none")
FLOAT_OPS = ("sin", "abs", "group_norm", "center", "square", "clamp")
HEADS = ("none", "linear", "flinear", "matmul_t", "matmul")
OUTPUTS = ("tensor", "tuple", "dict")


@dataclasses.dataclass(frozen=True)
class GraphSpec:
    """A random model: input kind and shape, blocks ``(kind, *params)``, head, output structure, weight seed."""

    kind: str                       # "image" | "tokens" | "video"
    channels: int                   # input channels (features for tokens)
    size: int                       # spatial size (sequence length for tokens)
    blocks: tuple[tuple, ...]
    head: str
    output: str
    seed: int = 0
    batch: int = 2

    def input_shape(self, batch: int | None = None) -> tuple[int, ...]:
        b = self.batch if batch is None else batch
        if self.kind == "image":
            return (b, self.channels, self.size, self.size)
        if self.kind == "video":
            return (b, self.channels, 4, self.size, self.size)
        return (b, self.size, self.channels)

    def make_input(self, seed: int, batch: int | None = None) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(*self.input_shape(batch), generator=g)


def graph_spec(c) -> GraphSpec:
    """Draw one spec with chooser ``c``; every block keeps the shapes valid (channels and size are tracked)."""
    kind = c.choice(("image", "image", "image", "tokens", "video"))
    if kind == "image":
        ch, size = c.choice((1, 3, 4, 8)), c.choice((6, 8, 12, 16))
    elif kind == "video":
        ch, size = c.choice((1, 3)), c.choice((6, 8))
    else:
        ch, size = c.choice((4, 8, 16)), c.choice((3, 5, 8))
    vocab = {"image": IMAGE_BLOCKS, "tokens": TOKEN_BLOCKS, "video": VIDEO_BLOCKS}[kind]
    blocks, cur_c, cur_s = [], ch, size
    for _ in range(c.integer(1, 5)):
        b = c.choice(vocab)
        if b in ("conv", "fconv", "conv3d"):
            out = c.choice((4, 8, 16))
            k = c.choice((1, 3)) if b != "conv3d" else c.choice((1, 3))
            stride = c.choice((1, 1, 2)) if cur_s >= 6 else 1
            groups = c.choice((1, 1, 2)) if b == "conv" and cur_c % 2 == 0 and out % 2 == 0 else 1
            bias = c.boolean()
            extra = (c.boolean(), c.choice(ACTS)) if b != "fconv" else (c.choice(("param", "buffer")), c.choice(ACTS))
            blocks.append((b, out, k, stride, groups, bias, *extra))
            cur_c, cur_s = out, (cur_s + 2 * (k // 2) - k) // stride + 1
        elif b == "convT":
            out = c.choice((4, 8))
            blocks.append((b, out, c.choice(ACTS)))
            cur_c, cur_s = out, cur_s * 2
            if cur_s > 24:
                blocks.append(("pool", "max", 2))
                cur_s //= 2
        elif b == "residual":
            blocks.append((b, c.choice(("plus", "torch_add", "inplace")), c.choice(ACTS), c.boolean()))
        elif b == "branch":
            blocks.append((b, c.choice(("cat", "sum")), c.choice(ACTS)))
            cur_c = cur_c * 2 if blocks[-1][1] == "cat" else cur_c
        elif b == "shared":
            blocks.append((b, c.choice(ACTS)))
        elif b == "act":
            blocks.append((b, c.choice(ACTS)))
        elif b in ("pool", "pool3d"):
            if cur_s >= 4:
                blocks.append((b, c.choice(("max", "avg")), 2))
                cur_s //= 2
        elif b == "float_op":
            op = c.choice(FLOAT_OPS if kind != "tokens" else ("sin", "abs", "center", "square", "clamp"))
            if (op == "group_norm" and cur_c % 2) or (op == "center" and cur_c == 1 and kind != "tokens"):
                op = "abs"
            blocks.append((b, op))
        elif b == "affine":
            blocks.append((b, c.boolean()))
        elif b in ("shape_py", "data_py"):
            blocks.append((b,))
        elif b == "resize":
            if cur_s <= 8:
                blocks.append((b, c.choice(("nearest", "bilinear"))))
                cur_s *= 2
        elif b in ("linear", "flinear", "matmul_w"):
            out = c.choice((8, 16, 24))
            blocks.append((b, out, c.boolean(), c.choice(ACTS)))
            cur_c = out
        elif b == "layernorm":
            blocks.append((b, c.boolean()))
        elif b == "mlp":
            blocks.append((b, c.choice((2, 4)), c.choice(("gelu", "relu", "silu"))))
        elif b == "attention":
            blocks.append((b, c.boolean()))
        elif b == "conv1d":
            out = c.choice((8, 16))
            blocks.append((b, out, c.choice((1, 3)), c.choice(ACTS)))
            cur_c = out
        elif b == "rnn":
            out = c.choice((8, 16))
            blocks.append((b, c.choice(("lstm", "gru")), out))
            cur_c = out
    head = c.choice(HEADS)
    output = c.choice(OUTPUTS)
    return GraphSpec(kind, ch, size, tuple(blocks), head, output, seed=c.integer(0, 2 ** 16))


def random_spec(seed: int) -> GraphSpec:
    """Graph ``seed`` of the long run (``benchmarks/fuzz.py``)."""
    return graph_spec(RandomChooser(seed))


def graph_specs():
    """The hypothesis strategy of specs."""
    from hypothesis import strategies as st

    @st.composite
    def specs(draw):
        return graph_spec(HypothesisChooser(draw))

    return specs()


# ------------------------------------------------------------------------------------------------
# building the model
# ------------------------------------------------------------------------------------------------
def act_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor] | nn.Module:
    return {
        "relu": nn.ReLU(), "relu_inplace": nn.ReLU(inplace=True), "relu6": nn.ReLU6(), "hardswish": nn.Hardswish(),
        "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(), "gelu": nn.GELU(), "silu": nn.SiLU(),
        "leaky_relu": nn.LeakyReLU(0.1), "elu": nn.ELU(), "hardsigmoid": nn.Hardsigmoid(), "hardtanh": nn.Hardtanh(),
        "none": nn.Identity(), "relu_method": _ReluMethod(),
    }[name]


class _ReluMethod(nn.Module):
    def forward(self, x):
        return x.relu_()  # the tensor method, in place


class Conv(nn.Module):
    """nn.ConvNd [+ BatchNorm] [+ activation]; ``relu_method`` is ``y.relu_()`` on the conv's own output."""

    def __init__(self, dims, cin, out, k, stride, groups, bias, bn, act):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        bnm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        self.conv = conv(cin, out, k, stride=stride, padding=k // 2, groups=groups, bias=bias)
        self.bn = bnm(out) if bn else None
        self.inplace_method = act == "relu_method"
        self.act = act_fn("none" if self.inplace_method else act)

    def forward(self, x):
        y = self.conv(x)
        if self.bn is not None:
            y = self.bn(y)
        if self.inplace_method:
            return y.relu_()
        return self.act(y)


class FConv(nn.Module):
    """A conv written as ``F.conv2d(x, self.weight, self.bias, ...)`` with the weight a parameter or a buffer."""

    def __init__(self, cin, out, k, stride, bias, where, act):
        super().__init__()
        w = torch.randn(out, cin, k, k) / (cin * k * k) ** 0.5
        b = torch.randn(out) * 0.1 if bias else None
        if where == "param":
            self.weight = nn.Parameter(w)
            self.bias = nn.Parameter(b) if b is not None else None
        else:
            self.register_buffer("weight", w)
            self.register_buffer("bias", b)
        self.stride, self.padding = stride, k // 2
        self.act = act_fn(act)

    def forward(self, x):
        return self.act(F.conv2d(x, self.weight, self.bias, self.stride, self.padding))


class ConvT(nn.Module):
    def __init__(self, cin, out, act):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, out, 2, stride=2)
        self.act = act_fn(act)

    def forward(self, x):
        return self.act(self.up(x))


class Residual(nn.Module):
    def __init__(self, c, how, act, post_relu):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.act = act_fn(act)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.how, self.post_relu = how, post_relu

    def forward(self, x):
        y = self.conv2(self.act(self.bn1(self.conv1(x))))
        if self.how == "plus":
            y = y + x
        elif self.how == "torch_add":
            y = torch.add(y, x)
        else:
            y += x
        return F.relu(y, inplace=True) if self.post_relu else y


class Branch(nn.Module):
    def __init__(self, c, how, act):
        super().__init__()
        self.a = nn.Conv2d(c, c, 1)
        self.b = nn.Conv2d(c, c, 3, padding=1)
        self.act = act_fn(act)
        self.how = how

    def forward(self, x):
        a, b = self.act(self.a(x)), self.b(x)
        return torch.cat([a, b], dim=1) if self.how == "cat" else a + b


class Shared(nn.Module):
    """One conv called twice."""

    def __init__(self, c, act):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.act = act_fn(act)

    def forward(self, x):
        return self.conv(self.act(self.conv(x)))


class FloatOp(nn.Module):
    def __init__(self, c, op, dim=-1):
        super().__init__()
        self.op, self.dim = op, dim
        self.norm = nn.GroupNorm(2, c) if op == "group_norm" else None

    def forward(self, x):
        if self.op == "sin":
            return torch.sin(x)
        if self.op == "abs":
            return x.abs()
        if self.op == "group_norm":
            return self.norm(x)
        if self.op == "center":
            return x - x.mean(dim=self.dim, keepdim=True)
        if self.op == "square":
            return x * x
        return torch.clamp(x, -0.5, 0.5)


class Affine(nn.Module):
    """Per-channel scale and shift with parameters (``x * self.gamma + self.beta``)."""

    def __init__(self, c, shift):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(1, c, 1, 1) + 0.5)
        self.beta = nn.Parameter(torch.randn(1, c, 1, 1) * 0.1) if shift else None

    def forward(self, x):
        y = x * self.gamma
        return y + self.beta if self.beta is not None else y


class ShapePy(nn.Module):
    """Python that branches on the input's shape (fx cannot trace the ``if``)."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        if x.shape[-1] >= 4:
            return self.conv(x) + F.avg_pool2d(F.pad(x, (0, 0, 0, 0)), 1)
        return self.conv(x)


class DataPy(nn.Module):
    """Python that branches on the data."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if y.mean() > 0:
            return torch.relu(y)
        return y * 0.5


class Resize(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode

    def forward(self, x):
        if self.mode == "nearest":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class Pool(nn.Module):
    def __init__(self, dims, how, k):
        super().__init__()
        self.dims, self.how, self.k = dims, how, k

    def forward(self, x):
        if self.dims == 3:
            return F.max_pool3d(x, (1, self.k, self.k)) if self.how == "max" else F.avg_pool3d(x, (1, self.k, self.k))
        return F.max_pool2d(x, self.k) if self.how == "max" else F.avg_pool2d(x, self.k)


class Act(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.act = act_fn(act)

    def forward(self, x):
        return self.act(x)


class Lin(nn.Module):
    """A linear as a module, as ``F.linear(x, self.weight, self.bias)`` or as ``x @ self.weight.t()``."""

    def __init__(self, how, cin, out, bias, act):
        super().__init__()
        self.how = how
        if how == "linear":
            self.fc = nn.Linear(cin, out, bias=bias)
        else:
            self.weight = nn.Parameter(torch.randn(out, cin) / cin ** 0.5)
            self.bias = nn.Parameter(torch.randn(out) * 0.1) if bias else None
        self.act = act_fn(act)

    def forward(self, x):
        if self.how == "linear":
            y = self.fc(x)
        elif self.how == "flinear":
            y = F.linear(x, self.weight, self.bias)
        else:
            y = x @ self.weight.t()
            if self.bias is not None:
                y = y + self.bias
        return self.act(y)


class LayerNorm(nn.Module):
    def __init__(self, c, module):
        super().__init__()
        self.norm = nn.LayerNorm(c) if module else None
        self.c = c

    def forward(self, x):
        return self.norm(x) if self.norm is not None else F.layer_norm(x, (self.c,))


class MLP(nn.Module):
    def __init__(self, c, ratio, act):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, c * ratio)
        self.act = act_fn(act)
        self.fc2 = nn.Linear(c * ratio, c)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class Attention(nn.Module):
    def __init__(self, c, fused):
        super().__init__()
        self.fused = fused
        self.qkv = nn.Linear(c, 3 * c) if fused else None
        if not fused:
            self.q, self.k, self.v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.proj = nn.Linear(c, c)
        self.scale = c ** -0.5

    def forward(self, x):
        if self.fused:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        a = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        return x + self.proj(a @ v)


class Conv1dTokens(nn.Module):
    def __init__(self, cin, out, k, act):
        super().__init__()
        self.conv = nn.Conv1d(cin, out, k, padding=k // 2)
        self.act = act_fn(act)

    def forward(self, x):
        return self.act(self.conv(x.transpose(1, 2))).transpose(1, 2)


class RNN(nn.Module):
    def __init__(self, kind, cin, out):
        super().__init__()
        self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(cin, out, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


class Head(nn.Module):
    def __init__(self, how, c, classes=5):
        super().__init__()
        self.how = how
        if how == "linear":
            self.fc = nn.Linear(c, classes)
        elif how in ("flinear", "matmul_t"):
            self.weight = nn.Parameter(torch.randn(classes, c) / c ** 0.5)
            self.bias = nn.Parameter(torch.zeros(classes))
        else:
            self.weight = nn.Parameter(torch.randn(c, classes) / c ** 0.5)

    def forward(self, x):
        if self.how == "linear":
            return self.fc(x)
        if self.how == "flinear":
            return F.linear(x, self.weight, self.bias)
        if self.how == "matmul_t":
            return x @ self.weight.t() + self.bias
        return torch.matmul(x, self.weight)


class FuzzNet(nn.Module):
    """The model of a ``GraphSpec``: ``blocks`` in sequence, then an optional pooled head, then the output structure."""

    def __init__(self, spec: GraphSpec):
        super().__init__()
        torch.manual_seed(spec.seed)
        self.spec = spec
        blocks, c = [], spec.channels
        for b in spec.blocks:
            kind = b[0]
            if kind in ("conv", "conv3d"):
                _, out, k, stride, groups, bias, bn, act = b
                m = Conv(3 if kind == "conv3d" else 2, c, out, k, (1, stride, stride) if kind == "conv3d" else stride,
                         groups, bias, bn, act)
                c = out
            elif kind == "fconv":
                _, out, k, stride, _groups, bias, where, act = b
                m, c = FConv(c, out, k, stride, bias, where, act), out
            elif kind == "convT":
                m, c = ConvT(c, b[1], b[2]), b[1]
            elif kind == "residual":
                m = Residual(c, *b[1:])
            elif kind == "branch":
                m = Branch(c, *b[1:])
                c = 2 * c if b[1] == "cat" else c
            elif kind == "shared":
                m = Shared(c, b[1])
            elif kind == "act":
                m = Act(b[1])
            elif kind in ("pool", "pool3d"):
                m = Pool(3 if kind == "pool3d" else 2, b[1], b[2])
            elif kind == "float_op":
                # centred over channels (features for tokens): over a spatial dim, the head's global average of it
                # would be exactly 0 in float, and its SQNR meaningless
                m = FloatOp(c, b[1], dim=-1 if spec.kind == "tokens" else 1)
            elif kind == "affine":
                m = Affine(c, b[1])
            elif kind == "shape_py":
                m = ShapePy(c)
            elif kind == "data_py":
                m = DataPy(c)
            elif kind == "resize":
                m = Resize(b[1])
            elif kind in ("linear", "flinear", "matmul_w"):
                m, c = Lin(kind, c, b[1], b[2], b[3]), b[1]
            elif kind == "layernorm":
                m = LayerNorm(c, b[1])
            elif kind == "mlp":
                m = MLP(c, b[1], b[2])
            elif kind == "attention":
                m = Attention(c, b[1])
            elif kind == "conv1d":
                m, c = Conv1dTokens(c, b[1], b[2], b[3]), b[1]
            elif kind == "rnn":
                m, c = RNN(b[1], c, b[2]), b[2]
            else:
                raise ValueError(f"unknown block {b!r}")
            blocks.append(m)
        self.blocks = nn.ModuleList(blocks)
        self.head = Head(spec.head, c) if spec.head != "none" else None
        # BatchNorm statistics as a trained model has them (folding is not a no-op)
        g = torch.Generator().manual_seed(spec.seed + 1)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        feat = x
        if self.head is None:
            logits = x
        else:
            if self.spec.kind == "tokens":
                pooled = x.mean(dim=1)
            else:
                pooled = torch.flatten(F.adaptive_avg_pool2d(x, 1) if x.dim() == 4 else F.adaptive_avg_pool3d(x, 1), 1)
            logits = self.head(pooled)
        if self.spec.output == "tuple":
            return logits, feat
        if self.spec.output == "dict":
            return {"logits": logits, "features": feat}
        return logits


def build(spec: GraphSpec) -> nn.Module:
    """The model of ``spec``, in eval mode."""
    return FuzzNet(spec).eval()


#: (block kind -> names of its weighted leaf layers and the explain() op they are): what explain() must list
def weighted_sites(spec: GraphSpec) -> list[tuple[str, str]]:
    """(row name prefix, op) of every weighted layer call in the model, in order; a shared module twice."""
    sites: list[tuple[str, str]] = []
    for i, b in enumerate(spec.blocks):
        p, kind = f"blocks.{i}", b[0]
        if kind in ("conv", "conv3d"):
            sites.append((f"{p}.conv", "conv3d" if kind == "conv3d" else "conv2d"))
        elif kind == "fconv":
            sites.append((p, "conv2d"))
        elif kind == "convT":
            sites.append((f"{p}.up", "conv_transpose2d"))
        elif kind == "residual":
            sites += [(f"{p}.conv1", "conv2d"), (f"{p}.conv2", "conv2d")]
        elif kind == "branch":
            sites += [(f"{p}.a", "conv2d"), (f"{p}.b", "conv2d")]
        elif kind == "shared":
            sites += [(f"{p}.conv", "conv2d"), (f"{p}.conv", "conv2d")]
        elif kind in ("shape_py", "data_py"):
            sites.append((f"{p}.conv", "conv2d"))
        elif kind == "linear":
            sites.append((f"{p}.fc", "linear"))
        elif kind in ("flinear", "matmul_w"):
            sites.append((p, "linear"))
        elif kind == "mlp":
            sites += [(f"{p}.fc1", "linear"), (f"{p}.fc2", "linear")]
        elif kind == "attention":
            sites += ([(f"{p}.qkv", "linear")] if b[1] else [(f"{p}.{n}", "linear") for n in "qkv"])
            sites.append((f"{p}.proj", "linear"))
        elif kind == "conv1d":
            sites.append((f"{p}.conv", "conv1d"))
        elif kind == "rnn":
            sites.append((f"{p}.rnn", b[1]))
    if spec.head == "linear":
        sites.append(("head.fc", "linear"))
    elif spec.head != "none":
        sites.append(("head", "linear"))
    return sites

