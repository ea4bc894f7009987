"""Cross-layer equalization (``QuantConfig(equalize=True)``, ``qcast.passes.equalize``): output fidelity with and
without it, with and without bias correction, and what to do with ReLU6 (which does not commute with the scaling).

For each model: prepare + calibrate once per setting (``equalize`` off; on with relu6 pairs skipped; on with relu6
replaced by relu, AIMET's choice), convert with bias correction off and on, and report the output SQNR (dB) against
the *original* float model on held-out inputs (so a relu6 -> relu replacement pays for the function it changes).
For models with ReLU6 it also prints how often the clip fires on the calibration data (the fraction of relu6
inputs above 6, and of channels where it fires at least once) and the SQNR of the float model with relu6 -> relu
alone (the function change, before any quantization).

    python benchmarks/equalize.py                         # every model, markdown table
    python benchmarks/equalize.py --models mobilenet_v2,disparity_zoo --json out.json

Models: those of ``benchmarks/estimators.py`` (digits CNN and CREPE tiny with real weights; zoo ResNet-18,
MobileNetV2, BlazeFace-like with random weights), plus

* ``digits_mnv2``: a MobileNetV2 (ReLU6, depthwise 3x3, inverted residuals; 1-channel stride-1 stem) trained here on
  scikit-learn's digits (seed 0, ~10-30 s), the depthwise network with trained weights available without a download;
* ``disparity_zoo`` / ``disparity_digits``: the zoo MobileNetV2 / a digits MobileNetV2 trained with ReLU instead of
  ReLU6, whose depthwise outputs were given per-channel scales spread over 3 decades (BN weight and bias times
  ``c_i``), compensated in the next 1x1 conv (its input column divided by ``c_i``): the float function is unchanged,
  but the activations between the two layers now differ in range by channel, which one per-tensor activation scale
  cannot serve. CLE has to undo that. ``relu_zoo`` / ``relu_digits`` are the same two models without the disparity
  (the baseline CLE should bring the disparity models back to).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import qcast  # noqa: E402

from benchmarks.estimators import load as load_estimators_model  # noqa: E402
from benchmarks.estimators import sqnr  # noqa: E402

cle = importlib.import_module("qcast.passes.equalize")  # the module (qcast.passes.equalize is also the function)

MODELS = ("digits", "crepe", "resnet18", "mobilenet_v2", "blazeface", "digits_mnv2", "relu_zoo", "disparity_zoo",
          "relu_digits", "disparity_digits")
SETTINGS = (("off", None), ("skip", "skip"), ("relu", "relu"))  # (column, RELU6 policy; None = equalize off)


# -------------------------------------------------------------------------------------------------
# models
# -------------------------------------------------------------------------------------------------
CACHE_DIR: str | None = None  # --cache-dir: trained digits MobileNetV2 weights are kept there between runs


def digits_mobilenet_v2(act: type = nn.ReLU6, seed: int = 0, epochs: int = 10):
    """A small MobileNetV2 trained on the digits (16x16, 1 channel): (model, split)."""
    from qcast.demo_data import _shift_augment, _torch_state, load_digits_split
    from tests.models.mobilenetv2 import MobileNetV2

    split = load_digits_split(seed)
    x_train, y_train = split[0], split[1]
    model = MobileNetV2(num_classes=10, inverted_residual_setting=[[1, 16, 1, 1], [4, 24, 2, 2], [4, 32, 2, 2],
                                                                   [4, 64, 1, 1]], last_channel=128, dropout=0.1)
    model.features[0][0] = nn.Conv2d(1, 32, 3, 1, 1, bias=False)
    if act is not nn.ReLU6:
        _replace_relu6(model, act)
    cached = os.path.join(CACHE_DIR, f"digits_mnv2_{act.__name__}_{seed}_{epochs}.pt") if CACHE_DIR else None
    if cached and os.path.exists(cached):
        model.load_state_dict(torch.load(cached, weights_only=True))
        return model.eval(), split
    with _torch_state(torch.get_num_threads(), seed):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
        bs = 64
        steps = epochs * ((len(x_train) + bs - 1) // bs)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.25)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x_train), generator=gen)
            for i in range(0, len(x_train), bs):
                idx = perm[i:i + bs]
                loss = F.cross_entropy(model(_shift_augment(x_train[idx], gen)), y_train[idx], label_smoothing=0.05)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    if cached:
        os.makedirs(CACHE_DIR, exist_ok=True)
        torch.save(model.state_dict(), cached)
    return model.eval(), split


def _replace_relu6(model: nn.Module, act: type) -> None:
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(parent, name, act())


def add_disparity(model: nn.Module, seed: int = 0, decades: float = 3.0) -> int:
    """Scale each depthwise conv's output channel ``i`` (through its BN's weight and bias) by ``c_i`` in
    ``10**U(-decades/2, decades/2)`` and divide the next 1x1 conv's input column ``i`` by ``c_i``. Needs a ReLU
    (positively homogeneous) between them, so the function is unchanged. Returns how many blocks were changed."""
    from tests.models.mobilenetv2 import InvertedResidual

    g = torch.Generator().manual_seed(seed)
    n = 0
    for block in model.modules():
        if not isinstance(block, InvertedResidual):
            continue
        layers = list(block.conv)
        dw = next(m for m in layers if isinstance(m, nn.Sequential) and m[0].groups > 1)
        conv, bn, act = dw
        assert type(act) is nn.ReLU, "disparity needs a ReLU between the depthwise conv and the 1x1 conv"
        project = layers[layers.index(dw) + 1]
        c = 10 ** (torch.rand(conv.out_channels, generator=g) * decades - decades / 2)
        with torch.no_grad():
            bn.weight.mul_(c)
            bn.bias.mul_(c)
            project.weight.div_(c.reshape(1, -1, 1, 1))
        n += 1
    return n


def load(name: str):
    """(float model, calibration batches, test input, extra metric fn(qmodel) or None); None when unavailable."""
    if name in ("digits", "crepe", "resnet18", "mobilenet_v2", "blazeface"):
        return load_estimators_model(name)
    if name in ("digits_mnv2", "relu_digits", "disparity_digits"):
        from qcast.demo_data import accuracy, calibration_batches
        model, split = digits_mobilenet_v2(nn.ReLU6 if name == "digits_mnv2" else nn.ReLU)
        if name == "disparity_digits":
            add_disparity(model)
        x_test, y_test = split[2], split[3]
        return model, calibration_batches(split[0], 32, 8), x_test, lambda q: f"acc {100 * accuracy(q, x_test, y_test):.2f}%"
    if name in ("relu_zoo", "disparity_zoo"):
        model, calib, x, metric = load_estimators_model("mobilenet_v2")
        _replace_relu6(model, nn.ReLU)
        if name == "disparity_zoo":
            add_disparity(model)
        return model, calib, x, metric
    raise SystemExit(f"unknown model {name!r}; models: {MODELS}")


# -------------------------------------------------------------------------------------------------
# measurements
# -------------------------------------------------------------------------------------------------
@torch.no_grad()
def relu6_firing(model: nn.Module, calib) -> dict | None:
    """How often the relu6 clip fires on ``calib``: fraction of elements > 6 and of channels with any > 6."""
    mods = [m for m in model.modules() if isinstance(m, nn.ReLU6)]
    if not mods:
        return None
    stats = {"elements": 0, "above": 0, "channels": 0, "channels_firing": 0}
    seen: dict[int, torch.Tensor] = {}

    def hook(mod, inp):
        x = inp[0]
        stats["elements"] += x.numel()
        stats["above"] += int((x > 6).sum())
        per_ch = (x > 6).transpose(0, 1).reshape(x.shape[1], -1).any(dim=1)
        seen[id(mod)] = seen[id(mod)] | per_ch if id(mod) in seen else per_ch

    handles = [m.register_forward_pre_hook(hook) for m in mods]
    try:
        for x in calib:
            model(x)
    finally:
        for h in handles:
            h.remove()
    stats["channels"] = sum(v.numel() for v in seen.values())
    stats["channels_firing"] = sum(int(v.sum()) for v in seen.values())
    return stats


def measure(name: str) -> dict:
    loaded = load(name)
    if loaded is None:
        print(f"{name}: skipped (torchcrepe is not installed)", file=sys.stderr)
        return {}
    model, calib, x, metric = loaded
    with torch.no_grad():
        ref = model(x)
    row: dict = {}
    fire = relu6_firing(model, calib)
    if fire:
        import copy
        relu_model = copy.deepcopy(model)
        _replace_relu6(relu_model, nn.ReLU)
        with torch.no_grad():
            row["relu6_as_relu_float_sqnr"] = sqnr(ref, relu_model(x))
        row["relu6_fire_elements"] = fire["above"] / fire["elements"]
        row["relu6_fire_channels"] = fire["channels_firing"] / fire["channels"]
        print(f"{name:<16} relu6 clip fires on {100 * row['relu6_fire_elements']:.3f}% of elements, "
              f"{100 * row['relu6_fire_channels']:.1f}% of channels; float with relu6->relu: "
              f"{row['relu6_as_relu_float_sqnr']:.1f} dB", file=sys.stderr)
    default = cle.RELU6
    try:
        for col, policy in SETTINGS:
            if policy == "relu" and not fire:
                continue  # no relu6: same as "skip"
            if policy is not None:
                cle.RELU6 = policy
            t0 = time.perf_counter()
            config = qcast.QuantConfig(equalize=policy is not None, bias_correction=True)
            observed = qcast.prepare(model, calib[0], config)
            qcast.calibrate(observed, calib, progress=False)
            t_cal = time.perf_counter() - t0
            eq = observed.gm.meta.get("qcast_equalization")
            for bc in (False, True):
                observed.qcast_config = observed.qcast_config.replace(bias_correction=bc)
                qmodel = qcast.convert(observed, backend="torch")  # technique studies: one reference executor
                with torch.no_grad():
                    row[(col, bc)] = sqnr(ref, qmodel(x))
                extra = f"  {metric(qmodel)}" if metric else ""
                print(f"{name:<16} cle={col:<4} bias_correction={bc!s:<5} {row[(col, bc)]:6.2f} dB{extra}"
                      f"  ({eq!r}; prepare+calibrate {t_cal:.1f} s)", file=sys.stderr)
    finally:
        cle.RELU6 = default
    return row


def render(results: dict) -> str:
    cols = [(c, bc) for c, _ in SETTINGS for bc in (False, True)]
    label = {"off": "no CLE", "skip": "CLE (relu6 pairs skipped)", "relu": "CLE (relu6 -> relu)"}
    head = "| model | " + " | ".join(f"{label[c]}{' +bc' if bc else ''}" for c, bc in cols) + " | relu6 clip fires |"
    lines = [head, "|---|" + "---|" * (len(cols) + 1)]
    for name, row in results.items():
        if not row:
            continue
        best = max(v for k, v in row.items() if isinstance(k, tuple))
        cells = []
        for k in cols:
            v = row.get(k)
            cells.append("=" if v is None else (f"**{v:.1f}**" if v == best else f"{v:.1f}"))
        fire = (f"{100 * row['relu6_fire_elements']:.3f}% of values, {100 * row['relu6_fire_channels']:.0f}% of "
                f"channels; relu6->relu float {row['relu6_as_relu_float_sqnr']:.1f} dB"
                if "relu6_fire_elements" in row else "no relu6")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fire} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--cache-dir", help="keep the trained digits MobileNetV2 weights here between runs")
    args = ap.parse_args(argv)
    global CACHE_DIR
    CACHE_DIR = args.cache_dir
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    results = {name: measure(name) for name in args.models.split(",") if name}
    print(render(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({n: {(f"{k[0]}{'+bc' if k[1] else ''}" if isinstance(k, tuple) else k): v
                           for k, v in row.items()} for n, row in results.items()}, f, indent=2)


if __name__ == "__main__":
    main()
