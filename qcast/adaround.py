"""AdaRound: learned up/down rounding of low-bit weights (Nagel et al. 2020, "Up or Down? Adaptive Rounding for
Post-Training Quantization").

Round-to-nearest minimises each weight's own error, not the layer's output error: at 4 bits the per-weight errors
(up to half a step of ``max|w| / 7``) add up in ``W x`` and the output drifts. AdaRound keeps qcast's weight grid (per
output channel, symmetric, ``s = max|w| / qmax`` with ``qmax = 2^(bits-1) - 1``) and learns, per weight, whether to
round down or up:

    W~ = s * clamp(floor(W / s) + h(V), -qmax, qmax),   h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)

(``h`` is the rectified sigmoid, zeta = 1.1, gamma = -0.1), minimising over the layer's inputs ``x``

    mean_x ||W x - W~ x||^2 / E_nearest  +  lambda * mean(1 - |2 h(V) - 1|^beta)

with Adam (lr 3e-2); V starts at the value that gives ``W~ = W`` exactly and beta anneals linearly from 20 to 2,
which pushes every ``h`` to 0 or 1. At the end the rounding is made hard (``h >= 0.5``, i.e. ``V >= 0``).
``E_nearest`` is the round-to-nearest error on the same rows, so ``lambda`` (``REG`` = 1000) means the same on
every layer whatever the scale of its activations.

Choices, measured on the digits CNN's 6 layers at 4 bits (output error vs nearest on a quarter of the rows held
out, /tmp scripts, not in the repository): at 500 iterations and lr 1e-2, ``lambda`` 10 / 100 / 1000 gained
+3.8..+9.7 / +5.1..+10.6 / +5.5..+10.1 dB (0.01 to 1, on the fitted rows: +0.0..+6.1 dB); lr 3e-2 and 0.1 beat 1e-2
and 3e-3 at 500 iterations; 1000 iterations at 3e-2 gave +7.2..+11.3 dB and 2000 at 1e-2 +7.3..+11.8 (twice the
time). The paper's warm-up (20 % of the iterations without the regulariser) does nothing here: at the start
``W~ = W``, so the reconstruction error and its gradient are zero; dropping it gained 0.1-0.5 dB. Shrinking the objective toward its
diagonal when a layer has fewer rows than inputs (rank-deficient ``E[x x^T]``) was tried and dropped: CREPE at 4 bits
26.6 -> 23.9 dB, zoo ResNet-18 +0.3 dB, MobileNetV2 -0.1 dB.

* **Float inputs, layer by layer.** Each layer's ``x`` is what it sees in the *float* model during calibration
  (the paper's "symmetric" setting; its "asymmetric" variant feeds the quantized model's inputs and also corrects
  the upstream error, at the cost of running the quantized prefix for every layer). So the layers are independent,
  one calibration pass collects every layer's inputs, and the learned weights do not depend on other settings.
* **Sampled rows, capped memory.** ``calibrate()`` keeps, per layer, a uniform sample without replacement of at most
  ``ROWS`` input rows: a linear's input vectors, or a conv's receptive-field patches at sampled output positions
  (gathered directly, never a full ``unfold``), and fewer when a row is wide, so that one layer's rows stay under
  ``ROW_BYTES`` (64 MiB). The sample is shared by every iteration. A layer that sees few rows (a classifier head: one
  per image) fits those rows; the report's errors are on them, not held out.
* **Cost.** Per iteration a mini-batch of ``BATCH_ROWS`` rows (the exact loss over all rows, through the rows'
  Gram matrix, when a row is no wider than that: first layers, depthwise convs). Time is per layer x iterations:
  seconds for a small CNN, minutes for a ResNet on 2 cores (``benchmarks/rounding.py``).
* **Never worse than nearest on the rows.** If the learned rounding's error on the sampled rows is not below
  round-to-nearest's, the layer keeps nearest (``AdaRoundRow.kept_nearest``).
* **When.** ``QuantConfig(rounding="auto")`` (the default) uses it below 8 weight bits only; at 8 bits it gains less
  and costs the same (docs/design.md).

The learned weights are cached on the ObservedModel (recomputed only when calibration adds data or the settings
change) and go into the QDQ graph through ``convert.to_qdq``; bias correction then uses them. The weights at
``+-max|w|`` of each channel stay at ``+-qmax`` (they are on the grid), so the int8 kernels recover the scale.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import NotCalibratedError

ZETA, GAMMA = 1.1, -0.1
#: at most this many input rows kept per layer, and at most ROW_BYTES of them (float32)
ROWS = 2048
ROW_BYTES = 64 << 20
#: rows per Adam step (layers whose rows are at most this wide use the exact Gram-matrix loss instead)
BATCH_ROWS = 256
#: weight of the rounding regulariser relative to the (nearest-normalised) reconstruction error
REG = 1000.0
LR = 3e-2
WARMUP = 0.0
BETA = (20.0, 2.0)


def qmax_of(bits: int) -> int:
    """Largest int of a ``bits``-bit symmetric grid: ``2^(bits-1) - 1`` (127 at 8 bits, 7 at 4 bits)."""
    return 2 ** (int(bits) - 1) - 1


# ------------------------------------------------------------------------------------------------
# input rows
# ------------------------------------------------------------------------------------------------
class InputRows:
    """A uniform sample (without replacement, over all batches seen) of a conv/linear layer's input rows.

    Rows have shape ``[groups, in_per_group]``: a linear's input vector (``groups = 1``) or a conv's zero-padded
    receptive field at one output position, channel-major like the conv weight, so that the layer's output at that
    position is ``einsum('gc,goc->go', row, W.reshape(groups, out_per_group, -1))``. Every candidate row gets a
    pseudo-random key and the ``cap`` smallest keys are kept (priority sampling), so only ``cap`` patches per batch
    are ever gathered.

    The key is a hash of the row's own values (of its projection on a fixed random vector, computed for every
    position at once by the layer's own conv geometry): the sample depends on which rows were seen, not on their
    order or on how the batches were split between processes, so ranks that each sample their shard and merge
    (``merge``: the ``cap`` smallest keys of the union) hold the rows one process would (``qcast.distributed``).
    Identical rows at different positions or in different batches get different keys (the row's position in its
    batch and a hash of the batch are mixed in), so duplicates such as zero patches are sampled like any row. Rows are
    kept sorted by key.
    """

    def __init__(self, layer: nn.Module, rows: int = ROWS, seed: int = 0):
        self.layer = layer
        self.groups = 1 if isinstance(layer, nn.Linear) else layer.groups
        width = layer.weight[0].numel() * self.groups
        self.cap = max(1, min(rows, ROW_BYTES // (4 * width)))
        self.seed = seed
        self.keys = torch.empty(0, dtype=torch.long)
        self.rows: torch.Tensor | None = None
        self.count = 0  # candidate rows seen
        self._probe: torch.Tensor | None = None

    def _hash_keys(self, x: torch.Tensor) -> torch.Tensor:
        """One int64 key per candidate row (same order as ``_positions``): a mixing hash of the float32 bits of the
        row's projection on a fixed random vector (``seed``: the layer's index)."""
        layer = self.layer
        if self._probe is None:
            gen = torch.Generator().manual_seed(1000 + self.seed)
            shape = (layer.in_features,) if isinstance(layer, nn.Linear) else (1, layer.in_channels, *layer.kernel_size)
            self._probe = torch.rand(shape, generator=gen) + 0.5
        if isinstance(layer, nn.Linear):
            proj = x.reshape(-1, x.shape[-1]) @ self._probe
        else:
            conv = F.conv2d if isinstance(layer, nn.Conv2d) else F.conv1d
            proj = conv(x, self._probe, None, layer.stride, layer.padding, layer.dilation, 1)
        h = proj.contiguous().float().flatten().view(torch.int32).long() & 0xFFFFFFFF
        # identical rows (zero patches, padding) at different places must not share a key, or a sample could be all
        # of them: the row's position in its batch and a hash of the batch (both properties of the batch itself,
        # not of the order batches come in) are mixed in
        batch = int(torch.tensor([float(x.sum())], dtype=torch.float32).view(torch.int32)) & 0xFFFFFFFF
        h = self._mix(h) ^ self._mix(torch.arange(h.numel(), dtype=torch.long) + batch * 0x9E3779B1 & 0xFFFFFFFF)
        return self._mix(h)

    @staticmethod
    def _mix(h: torch.Tensor) -> torch.Tensor:
        """A 32-bit integer hash (two multiply-xorshift rounds) of each int64 holding a 32-bit value."""
        for mult in (0x9E3779B1, 0x85EBCA77):
            h = ((h ^ (h >> 16)) * mult) & 0xFFFFFFFF
        return h ^ (h >> 15)

    def update(self, x: torch.Tensor) -> None:
        if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel()):
            return
        x = x.detach().float()
        n = self._positions(x)
        keys = self._hash_keys(x)
        k = min(self.cap, n)
        keys, idx = torch.sort(keys, stable=True)
        keys, idx = keys[:k], idx[:k]
        rows = self._gather(x, idx)
        self.count += n
        self._keep(keys, rows)

    def _keep(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        if self.rows is not None:
            keys, rows = torch.cat([self.keys, keys]), torch.cat([self.rows, rows])
        order = torch.sort(keys, stable=True).indices[:self.cap]
        self.keys, self.rows = keys[order], rows[order].contiguous()

    def merge(self, parts: list[tuple[torch.Tensor, torch.Tensor | None, int]]) -> None:
        """Replace the sample by that of the union of ``parts`` (each rank's ``(keys, rows, count)``, in rank order)."""
        self.keys, self.rows, self.count = torch.empty(0, dtype=torch.long), None, 0
        for keys, rows, count in parts:
            self.count += count
            if rows is not None:
                self._keep(keys, rows)

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """At most ``cap`` rows and keys: fixed size whatever the number of batches (checkpoints, ranks)."""
        return {"count": self.count}, ({"keys": self.keys, "rows": self.rows} if self.rows is not None else {})

    def load_state(self, values: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.count = int(values["count"])
        self.keys = tensors["keys"].clone() if "keys" in tensors else torch.empty(0, dtype=torch.long)
        self.rows = tensors["rows"].clone() if "rows" in tensors else None

    def reset(self) -> None:
        self.keys, self.rows, self.count = torch.empty(0, dtype=torch.long), None, 0

    def _geometry(self, x: torch.Tensor):
        layer = self.layer
        if isinstance(layer, nn.Conv1d):
            x = x.unsqueeze(2)
            k, s, p, d = (1, *layer.kernel_size), (1, *layer.stride), (0, *layer.padding), (1, *layer.dilation)
        else:
            k, s, p, d = layer.kernel_size, layer.stride, layer.padding, layer.dilation
        n, _, h, w = x.shape
        ho = (h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
        wo = (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
        return x, k, s, p, d, n, ho, wo

    def _positions(self, x: torch.Tensor) -> int:
        if isinstance(self.layer, nn.Linear):
            return x.numel() // x.shape[-1]
        _, _, _, _, _, n, ho, wo = self._geometry(x)
        return n * ho * wo

    def _gather(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if isinstance(self.layer, nn.Linear):
            return x.reshape(-1, 1, x.shape[-1])[idx].clone()
        x, k, s, p, d, _, ho, wo = self._geometry(x)
        xp = F.pad(x, (p[1], p[1], p[0], p[0]))
        b, rest = idx // (ho * wo), idx % (ho * wo)
        i, j = rest // wo, rest % wo
        r = (i * s[0])[:, None] + torch.arange(k[0]) * d[0]  # [R, kh]
        c = (j * s[1])[:, None] + torch.arange(k[1]) * d[1]  # [R, kw]
        patches = xp[b[:, None, None], :, r[:, :, None], c[:, None, :]]  # [R, kh, kw, C]
        return patches.permute(0, 3, 1, 2).reshape(len(idx), self.groups, -1)


# ------------------------------------------------------------------------------------------------
# the optimisation
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdaRoundRow:
    """One layer: output error (mean over the sampled rows of ``||W x - W~ x||^2``) with nearest and learned
    rounding, the fraction of weights rounded the other way than nearest, and the time it took."""

    layer: str
    bits: int
    rows: int
    mse_nearest: float
    mse_adaround: float
    flipped: float
    seconds: float
    kept_nearest: bool = False

    @property
    def gain_db(self) -> float:
        """Reconstruction error reduction in dB (positive: AdaRound better)."""
        return 10 * math.log10(max(self.mse_nearest, 1e-30) / max(self.mse_adaround, 1e-30))

    def __repr__(self) -> str:
        return (f"AdaRoundRow({self.layer!r}, {self.bits} bits, {self.rows} rows, error {self.mse_nearest:.4g} -> "
                f"{self.mse_adaround:.4g} ({self.gain_db:+.2f} dB), {100 * self.flipped:.1f}% flipped"
                + (", kept nearest" if self.kept_nearest else "") + f", {self.seconds:.2f} s)")


@dataclass(frozen=True)
class AdaRoundReport:
    """Every AdaRound layer of one conversion, in graph order."""

    rows: tuple[AdaRoundRow, ...]
    iters: int

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.rows)

    def __repr__(self) -> str:
        return f"AdaRoundReport({len(self.rows)} layers, {self.iters} iterations, {self.seconds:.1f} s)"

    def table(self) -> str:
        w = max([len(r.layer) for r in self.rows] + [5])
        lines = [f"{'layer':<{w}}  bits   rows  {'nearest':>10} {'adaround':>10}   gain  flipped"]
        for r in self.rows:
            lines.append(f"{r.layer:<{w}}  {r.bits:>4} {r.rows:>6}  {r.mse_nearest:>10.4g} {r.mse_adaround:>10.4g} "
                         f"{r.gain_db:+6.2f} {100 * r.flipped:7.1f}%" + ("  (kept nearest)" if r.kept_nearest else ""))
        return "\n".join(lines)

    def to_list(self) -> list[dict]:
        """JSON-friendly rows (stored in ``QuantizedModel.qcast_meta["adaround"]``, saved with the model)."""
        return [dict(r.__dict__) for r in self.rows]


def adaround_weight(w: torch.Tensor, x: torch.Tensor, bits: int, iters: int, seed: int = 0,
                    name: str = "") -> tuple[torch.Tensor, AdaRoundRow]:
    """Learned rounding of one layer's weight ``w`` (``[out, in_per_group, *kernel]``) on its input rows ``x``
    (``[rows, groups, in_per_group * kernel]``, see ``InputRows``).

    Returns the fake-quantized weight (``s * q``, ``q`` integers in ``[-qmax, qmax]``, the per-channel scale
    ``s = max|w| / qmax`` of round-to-nearest) and the layer's ``AdaRoundRow``.
    """
    from .observers import weight_scales

    t0 = time.perf_counter()
    qmax = qmax_of(bits)
    groups = x.shape[1]
    shape3 = (groups, w.shape[0] // groups, -1)
    w = w.detach().float()
    scale = weight_scales(w, qmax).view(-1, *([1] * (w.dim() - 1)))
    ws = w / scale
    nearest = torch.clamp(torch.round(ws), -qmax, qmax)
    # q = base + h with h in [0, 1] stays in [-qmax, qmax] without a clamp when base <= qmax - 1
    base = torch.floor(ws).clamp(-qmax, qmax - 1)
    frac = (ws - base).clamp(0.0, 1.0)
    # weights at +-max|w| are exactly on the grid: pin them, so max|W~| / qmax gives back the scale (kernels rely on it)
    pinned = ws.abs() >= qmax - 1e-4
    step = scale.expand_as(w).reshape(shape3)  # W~ - W = s * (h - frac)
    frac3 = frac.reshape(shape3)

    xt = x.float().transpose(0, 1)  # [groups, rows, in]
    gram = xt.shape[2] <= BATCH_ROWS
    if gram:  # exact loss over all rows: mean_x ||dW x||^2 = sum_g sum_o dW_go G_g dW_go^T
        G = torch.bmm(xt.double().transpose(1, 2), xt.double()).div_(xt.shape[1]).float()
    else:
        gen = torch.Generator().manual_seed(seed)
        xt = xt[:, torch.randperm(xt.shape[1], generator=gen)].contiguous()  # windows of it are random batches
    batch = min(BATCH_ROWS, xt.shape[1])

    def err(dw: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:  # dw: [groups, out/group, in]
        if rows is None and gram:
            return (torch.bmm(dw, G) * dw).sum()
        rows = xt if rows is None else rows
        return torch.bmm(rows, dw.transpose(1, 2)).pow(2).sum() / rows.shape[1]

    def full_err(q: torch.Tensor) -> float:
        dw = (q - ws).reshape(shape3) * step
        if gram:
            return float(err(dw))
        chunks = range(0, xt.shape[1], 4096)
        return float(sum(err(dw, xt[:, i:i + 4096]) * xt[:, i:i + 4096].shape[1] for i in chunks) / xt.shape[1])

    with torch.no_grad():
        e_near = full_err(nearest)
    # h(v) = frac at the start, i.e. W~ = W (clamped away from 0 and 1, where the rectified sigmoid is flat)
    f0 = frac3.clamp(1e-3, 1 - 1e-3)
    v = (-torch.log((ZETA - GAMMA) / (f0 - GAMMA) - 1)).requires_grad_(True)
    adam = _Adam(v, LR)
    norm = max(e_near, 1e-30)
    warm = int(WARMUP * iters)
    for it in range(iters):
        hv = torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
        rows = None
        if not gram:
            start = int(torch.randint(xt.shape[1] - batch + 1, (1,), generator=gen))
            rows = xt[:, start:start + batch]
        loss = err((hv - frac3) * step, rows) / norm
        if it >= warm:
            beta = BETA[1] + (BETA[0] - BETA[1]) * (1 - (it - warm) / max(iters - warm, 1))
            loss = loss + REG * (1 - (2 * hv - 1).abs().pow(beta)).mean()
        adam.step(torch.autograd.grad(loss, v)[0])
    with torch.no_grad():
        learned = torch.where(pinned, nearest, base + (v.detach() >= 0).reshape(w.shape).float())
        e_ada = full_err(learned)
        kept = not e_ada < e_near
        q = nearest if kept else learned
        row = AdaRoundRow(name, int(bits), x.shape[0], e_near, e_near if kept else e_ada,
                          float((q != nearest).float().mean()), time.perf_counter() - t0, kept)
    return (q * scale).to(w.dtype), row


class _Adam:
    """Adam (Kingma & Ba) on one tensor, in place. Written out because constructing ``torch.optim.Adam`` imports
    ``torch._dynamo`` on first use: measured 3-19 s on the 2-core CI machine, more than a small model's AdaRound."""

    def __init__(self, p: torch.Tensor, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.p, self.lr, self.betas, self.eps, self.t = p, lr, betas, eps, 0
        self.m, self.s = torch.zeros_like(p), torch.zeros_like(p)

    @torch.no_grad()
    def step(self, g: torch.Tensor) -> None:
        b1, b2 = self.betas
        self.t += 1
        self.m.mul_(b1).add_(g, alpha=1 - b1)
        self.s.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (self.s / (1 - b2 ** self.t)).sqrt_().add_(self.eps)
        self.p.addcdiv_(self.m, denom, value=-self.lr / (1 - b1 ** self.t))


# ------------------------------------------------------------------------------------------------
# pipeline hooks
# ------------------------------------------------------------------------------------------------
def layer_settings(gm, config) -> dict[str, tuple[int, str]]:
    """Module path -> (weight_bits, rounding) for every int8 conv/linear of ``gm`` (a module called at several
    sites has one weight: its first site's settings). ``rounding="auto"`` resolves to ``"adaround"`` below 8 bits
    and ``"nearest"`` at 8 bits."""
    from .convert import int8_layers

    targets = int8_layers(gm)
    out: dict[str, tuple[int, str]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in targets and node.target not in out:
            where = (node.meta.get("qcast_name", ""), node.meta.get("qcast_op", ""), node.meta.get("qcast_path", ""))
            scheme, bits, group = config.weight_scheme(*where)
            rounding = config.setting("rounding", *where)
            plain = scheme.name == "int8" or (not scheme.custom and not scheme.pow2 and not group)
            if rounding == "auto":
                rounding = "adaround" if bits < 8 and plain else "nearest"
            elif rounding == "adaround" and not plain:
                from .errors import ConfigError
                raise ConfigError(f"{where[0]}: rounding='adaround' learns the rounding on a plain per-channel grid; "
                                  f"weight={scheme.name!r}" + (f" with weight_group_size={group}" if group else "")
                                  + " is not one. Use rounding='nearest' (or 'auto') for this layer")
            out[node.target] = (bits, rounding)
    return out


def collect_inputs(observed) -> list:
    """Forward pre-hooks (removed by ``calibrate()`` when it ends) that sample the inputs of every int8 conv/linear
    with ``rounding="adaround"`` into ``observed.qcast_layer_inputs``. Nothing when no layer uses AdaRound."""
    from .convert import int8_layers

    layers = int8_layers(observed.gm)
    hooks = []
    for target, (_, rounding) in layer_settings(observed.gm, observed.qcast_config).items():
        if rounding != "adaround":
            continue
        store = observed.__dict__.setdefault("qcast_layer_inputs", {})
        rows = store.setdefault(target, InputRows(layers[target], seed=len(store)))
        hooks.append(observed.gm.get_submodule(target).register_forward_pre_hook(
            lambda _m, args, st=rows: st.update(args[0])))
    return hooks


def rounded_weights(observed) -> tuple[dict[str, torch.Tensor], AdaRoundReport | None]:
    """Module path -> AdaRound fake-quantized weight for every int8 conv/linear with ``rounding="adaround"``, and
    the report. Cached on ``observed``: recomputed only when calibration has added rows or the settings changed."""
    from .convert import int8_layers

    config = observed.qcast_config
    todo = {t: bits for t, (bits, r) in layer_settings(observed.gm, config).items() if r == "adaround"}
    if not todo:
        return {}, None
    store = observed.__dict__.get("qcast_layer_inputs", {})
    unseen = [t for t in todo if t not in store or store[t].rows is None]
    if unseen:
        raise NotCalibratedError(
            f"AdaRound (rounding='adaround', or 'auto' below 8 weight bits) needs each layer's inputs, sampled by "
            f"qcast.calibrate(); none for {unseen[:5]}. Prepare with the final weight_bits/rounding and calibrate with "
            "qcast.calibrate(observed, data) (not by calling the observed model directly), or use "
            "QuantConfig(rounding='nearest').")
    key = (config.adaround_iters, tuple((t, b, store[t].count) for t, b in todo.items()))
    cached = observed.__dict__.get("qcast_adaround")
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    layers = int8_layers(observed.gm)
    names = _display_names(observed.gm)
    bar = _progress(len(todo), getattr(observed, "qcast_progress", True))
    weights, rows = {}, []
    try:
        for i, (target, bits) in enumerate(todo.items()):
            name = names.get(target, target)
            if bar is not None:  # which layer it is on now, and what the last one cost (rounding='nearest': ~0 s)
                last = f"; {rows[-1].layer} took {rows[-1].seconds:.1f} s, {rows[-1].gain_db:+.1f} dB" if rows else ""
                bar.set_postfix_str(f"{name} ({bits}-bit, {config.adaround_iters} steps){last}")
            w, row = adaround_weight(layers[target].weight, store[target].rows, bits, config.adaround_iters, seed=i,
                                     name=name)
            weights[target] = w
            rows.append(row)
            if bar is not None:
                if len(rows) == len(todo):
                    slowest = max(rows, key=lambda r: r.seconds)
                    bar.set_postfix_str(f"{row.layer} took {row.seconds:.1f} s, {row.gain_db:+.1f} dB; slowest "
                                        f"{slowest.layer} {slowest.seconds:.1f} s")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    report = AdaRoundReport(tuple(rows), config.adaround_iters)
    observed.__dict__["qcast_adaround"] = (key, weights, report)
    return weights, report


def _display_names(gm) -> dict[str, str]:
    return {n.target: n.meta.get("qcast_name", n.target) for n in gm.graph.nodes if n.op == "call_module"}


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    # the bar stays on screen: AdaRound is the one step that takes minutes (rounding='nearest' skips it)
    return tqdm(total=total, desc="qcast adaround (rounding='nearest' skips it)", unit="layer", leave=True,
                file=sys.stderr)
