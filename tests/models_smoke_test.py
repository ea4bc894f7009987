"""Smoke test for the float reference model zoo in ``tests/models``.

Plain script.  Note that ``*_test.py`` *is* one of pytest's default
``python_files`` patterns, so pytest may import this file; it therefore does
all its work under ``if __name__ == "__main__"`` and defines no ``test_*``
functions, which makes collecting it a harmless no-op.

    .venv/bin/python tests/models_smoke_test.py          # small ZOO + FULL param counts
    .venv/bin/python tests/models_smoke_test.py --fast   # skip the full-size models

Checks, for every ZOO entry: builds at small scale, eval forward on the example
input (batch 1 and 2) is finite, deterministic, < 1 s, has the declared output
kind; ``randomize_bn_stats`` makes BNs non-trivial; ``torch.fx.symbolic_trace``
succeeds and reproduces the eager output -- except for the submodules listed in
``UNTRACEABLE`` (tracing them, and the model containing them, must fail, while
tracing with them as leaf modules must succeed).  Also checks naming/structure
against the originals and parameter counts of the full-size models against
torchvision / timm / mmaction2.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback

import torch
import torch.fx
import torch.nn as nn

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from tests.models import (  # noqa: E402
    FULL,
    OUTPUT_KINDS,
    UNTRACEABLE,
    ZOO,
    flatten_output,
    randomize_bn_stats,
    seed_everything,
)

# Parameter counts of the real architectures (torchvision / timm / mmaction2 references).
EXPECTED_FULL_PARAMS = {
    "resnet18": 11_689_512,      # torchvision.models.resnet18()
    "resnet50": 25_557_032,      # torchvision.models.resnet50()
    "vgg16": 138_357_544,        # torchvision.models.vgg16()
    "vgg16_bn": 138_365_992,     # torchvision.models.vgg16_bn()
    "mobilenet_v2": 3_504_872,   # torchvision.models.mobilenet_v2()
    "deit_tiny": 5_717_416,      # timm deit_tiny_patch16_224
    "tsn_r50": 23_714_981,       # mmaction2 TSN R50 backbone (no fc) + TSNHead(2048 -> 101)
}

FORWARD_BUDGET_S = 1.0

FAILURES: list[str] = []


def check(cond: bool, msg: str) -> None:
    if not cond:
        FAILURES.append(msg)
        print(f"    FAIL: {msg}")


def output_kind(out) -> str:
    if isinstance(out, torch.Tensor):
        return "tensor"
    if isinstance(out, dict):
        return "dict"
    if dataclasses.is_dataclass(out):
        return "dataclass"
    if isinstance(out, tuple):
        return "tuple"
    return type(out).__name__


def same_outputs(a, b) -> bool:
    fa, fb = flatten_output(a), flatten_output(b)
    return len(fa) == len(fb) and all(x.shape == y.shape and torch.allclose(x, y, rtol=1e-5, atol=1e-6)
                                      for x, y in zip(fa, fb))


class LeafTracer(torch.fx.Tracer):
    def __init__(self, leaf_types):
        super().__init__()
        self.leaf_types = tuple(leaf_types)

    def is_leaf_module(self, m, qualname):
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)


def check_fx(name: str, model: nn.Module, x) -> None:
    untraceable = UNTRACEABLE.get(name, ())
    with torch.no_grad():
        ref = model(x)
    if not untraceable:
        try:
            gm = torch.fx.symbolic_trace(model)
        except Exception as e:  # noqa: BLE001
            check(False, f"{name}: symbolic_trace failed: {type(e).__name__}: {e}")
            return
        with torch.no_grad():
            check(same_outputs(ref, gm(x)), f"{name}: traced GraphModule output differs from eager")
        print(f"    fx: traced OK ({len(gm.graph.nodes)} nodes)")
        return

    # whole model must fail ...
    try:
        torch.fx.symbolic_trace(model)
        check(False, f"{name}: symbolic_trace unexpectedly succeeded on the whole model")
    except torch.fx.proxy.TraceError:
        pass
    except Exception as e:  # noqa: BLE001
        check(False, f"{name}: whole-model trace failed with unexpected {type(e).__name__}: {e}")
    # ... each listed submodule must fail ...
    leaf_types = []
    for qual in untraceable:
        sub = model.get_submodule(qual)
        leaf_types.append(type(sub))
        try:
            torch.fx.symbolic_trace(sub)
            check(False, f"{name}: symbolic_trace unexpectedly succeeded on submodule {qual!r}")
        except torch.fx.proxy.TraceError:
            pass
        except Exception as e:  # noqa: BLE001
            check(False, f"{name}.{qual}: trace failed with unexpected {type(e).__name__}: {e}")
    # ... and the rest of the model must be traceable with them as leaves.
    try:
        tracer = LeafTracer(leaf_types)
        graph = tracer.trace(model)
        gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
        with torch.no_grad():
            check(same_outputs(ref, gm(x)), f"{name}: leaf-traced GraphModule output differs from eager")
        leaf_calls = [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target in untraceable]
        check(sorted(leaf_calls) == sorted(untraceable), f"{name}: untraceable submodules not kept as leaves")
        print(f"    fx: whole model + {list(untraceable)} fail as expected; traced OK with them as leaves "
              f"({len(gm.graph.nodes)} nodes)")
    except Exception as e:  # noqa: BLE001
        check(False, f"{name}: trace with untraceable submodules as leaves failed: {type(e).__name__}: {e}")


def check_zoo_entry(name: str) -> None:
    factory, input_fn = ZOO[name]
    print(f"[{name}]")
    seed_everything(0)
    model = factory().eval()
    seed_everything(0)
    model2 = factory().eval()
    sd1, sd2 = model.state_dict(), model2.state_dict()
    check(all(torch.equal(sd1[k], sd2[k]) for k in sd1), f"{name}: construction not deterministic under seed_everything")

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    randomize_bn_stats(model, seed=0)
    if bns:
        check(all((m.running_var - 1).abs().max() > 0.05 and m.running_mean.abs().max() > 0.01
                  and (m.weight - 1).abs().max() > 0.05 and m.bias.abs().max() > 0.01 for m in bns),
              f"{name}: randomize_bn_stats left a trivial BatchNorm")
        randomize_bn_stats(model2, seed=0)
        check(all(torch.equal(a.running_var, b.running_var) for a, b in
                  zip(bns, [m for m in model2.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)])),
              f"{name}: randomize_bn_stats not deterministic")

    x1 = input_fn(batch=1, seed=0)
    x1b = input_fn(batch=1, seed=0)
    x2 = input_fn(batch=2, seed=1)
    check(torch.equal(x1, x1b), f"{name}: example_input_fn not deterministic")
    check(not torch.equal(input_fn(batch=1, seed=1), x1), f"{name}: example_input_fn ignores seed")
    with torch.no_grad():
        model(x1)  # warm-up
        dt = float("inf")
        for _ in range(3):  # min of 3: robust to a busy machine
            t0 = time.perf_counter()
            out1 = model(x1)
            dt = min(dt, time.perf_counter() - t0)
        out1b = model(x1)
        out2 = model(x2)
    kind = output_kind(out1)
    check(kind == OUTPUT_KINDS[name], f"{name}: output kind {kind} != declared {OUTPUT_KINDS[name]}")
    t1, t2 = flatten_output(out1), flatten_output(out2)
    check(all(torch.isfinite(t).all() for t in t1 + t2), f"{name}: non-finite output")
    check(all(t.abs().max() > 0 for t in t1), f"{name}: all-zero output")
    check(same_outputs(out1, out1b), f"{name}: eval forward not deterministic")
    check(all(a.shape[0] == 1 and b.shape[0] == 2 for a, b in zip(t1, t2)), f"{name}: batch dim not respected")
    check(dt < FORWARD_BUDGET_S, f"{name}: forward took {dt:.3f}s (budget {FORWARD_BUDGET_S}s)")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"    input {tuple(x1.shape)} -> {kind} {[tuple(t.shape) for t in t1]}  "
          f"fwd {dt * 1e3:.1f} ms  params {n_params:,}  BNs {len(bns)}")
    check_fx(name, model, x1)


def check_structure() -> None:
    """Names / module nesting that the originals have."""
    print("[structure]")
    names = {n: dict(ZOO[n][0]().named_modules()) for n in ZOO}

    r18 = names["resnet18"]
    for q in ["conv1", "bn1", "relu", "maxpool", "layer1.0.conv1", "layer1.0.bn1", "layer1.0.relu", "layer1.0.conv2",
              "layer1.0.bn2", "layer2.0.downsample.0", "layer2.0.downsample.1", "avgpool", "fc"]:
        check(q in r18, f"resnet18: missing {q}")
    check("layer1.0.downsample" not in r18 or r18.get("layer1.0.downsample") is None, "resnet18: layer1.0 has downsample")
    r50 = names["resnet50"]
    for q in ["layer1.0.conv3", "layer1.0.bn3", "layer1.0.downsample.0", "layer4.2.relu"]:
        check(q in r50, f"resnet50: missing {q}")
    check(r50["layer2.0.conv2"].stride == (2, 2) and r50["layer2.0.conv1"].stride == (1, 1), "resnet50: not v1.5")

    # the single shared ReLU is called twice (BasicBlock) / three times (Bottleneck)
    for zname, qual, expected in [("resnet18", "layer1.0", 2), ("resnet50", "layer1.0", 3), ("tsn_r50", None, None)]:
        if qual is None:
            continue
        m = ZOO[zname][0]().eval()
        calls = []
        m.get_submodule(qual + ".relu").register_forward_hook(lambda *a: calls.append(1))
        with torch.no_grad():
            m(ZOO[zname][1]())
        check(len(calls) == expected, f"{zname}: {qual}.relu called {len(calls)}x, expected {expected}")

    v = names["vgg16"]
    check(isinstance(v["features.28"], nn.Conv2d) and isinstance(v["features.30"], nn.MaxPool2d),
          "vgg16: features indices differ from torchvision")
    check(isinstance(v["avgpool"], nn.AdaptiveAvgPool2d) and v["avgpool"].output_size == (7, 7), "vgg16: avgpool")
    check([type(v[f"classifier.{i}"]).__name__ for i in range(7)] ==
          ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"], "vgg16: classifier layout")
    check(v["classifier.1"].inplace, "vgg16: classifier ReLU must be inplace")
    vb = names["vgg16_bn"]
    check(isinstance(vb["features.1"], nn.BatchNorm2d) and isinstance(vb["features.40"], nn.Conv2d)
          and isinstance(vb["features.43"], nn.MaxPool2d) and len(vb["features"]) == 44,
          "vgg16_bn: features indices differ from torchvision")
    cv = names["cifar_vgg_bn"]
    check(type(cv[""]).__name__ == "Cifar_VGG" and isinstance(cv["features.1"], nn.BatchNorm2d)
          and isinstance(cv["classifier.1"], nn.Linear) and len(cv["classifier"]) == 2, "cifar_vgg_bn: layout")

    t = names["tsn_r50"]
    for q in ["backbone.conv1.conv", "backbone.conv1.bn", "backbone.conv1.activate", "backbone.maxpool",
              "backbone.layer1.0.conv1.activate", "backbone.layer1.0.conv3.bn", "backbone.layer1.0.relu",
              "backbone.layer1.0.downsample.conv", "backbone.layer1.0.downsample.bn", "backbone.layer4.2.conv3.conv",
              "cls_head.loss_cls", "cls_head.consensus", "cls_head.avg_pool", "cls_head.dropout", "cls_head.fc_cls"]:
        check(q in t, f"tsn_r50: missing {q}")
    for q in ["backbone.layer1.0.conv3.activate", "backbone.layer1.0.downsample.activate"]:
        check(q not in t, f"tsn_r50: unexpected {q}")
    check(type(t["backbone.conv1"]).__name__ == "ConvModule" and t["backbone.conv1.activate"].inplace,
          "tsn_r50: ConvModule / inplace ReLU")
    check(t["cls_head.dropout"].p == 0.4, "tsn_r50: dropout p")

    b = names["blazeface_landm"]
    for q in ["conv1.0", "conv2.actvation", "conv2.conv.0.0", "conv4.shortcut.0", "conv4.shortcut.1",
              "conv7.conv.2.0", "loc.1.2", "conf.0.2", "landm.1.2"]:
        check(q in b, f"blazeface_landm: missing {q}")
    check(b["conv2.conv.0.0"].groups == 24 and b["conv2.conv.0.0"].kernel_size == (5, 5), "blazeface: dw 5x5")
    check(b["conv7.conv.2.0"].groups == 1, "blazeface: dense 5x5 in double block (as printed in seed)")
    check("conv2.shortcut" not in b and "landm" not in names["blazeface"], "blazeface: shortcut/landm layout")

    mb = names["mobilenet_v2"]
    check(type(mb["features.0"]).__name__ == "Conv2dNormActivation" and isinstance(mb["features.0"], nn.Sequential)
          and isinstance(mb["features.0.2"], nn.ReLU6), "mobilenet_v2: stem")
    check(mb["features.3"].use_res_connect and not mb["features.2"].use_res_connect, "mobilenet_v2: use_res_connect")
    check(isinstance(mb["classifier.0"], nn.Dropout) and isinstance(mb["classifier.1"], nn.Linear),
          "mobilenet_v2: classifier")
    check(len(names["mobilenet_v2"]["features"]) == 19, "mobilenet_v2: 19 feature blocks")

    vt = names["deit_tiny"]
    for q in ["patch_embed.proj", "blocks.0.norm1", "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1",
              "blocks.0.mlp.act", "blocks.1.mlp.fc2", "norm", "head"]:
        check(q in vt, f"deit_tiny: missing {q}")
    check(isinstance(vt["blocks.0.mlp.act"], nn.GELU), "deit_tiny: GELU")

    u = names["user_unet"]
    from torch.ao.quantization import DeQuantStub, QuantStub
    check(isinstance(u["quant"], QuantStub) and isinstance(u["dequant"], DeQuantStub), "user_unet: stubs")
    check(type(u["affine2"]).__name__ == "ScaleShift" and isinstance(u["affine2"].scale, nn.Parameter),
          "user_unet: ScaleShift")
    check(any(isinstance(m, nn.GroupNorm) for m in u.values()), "user_unet: GroupNorm")
    print("    ok" if not FAILURES else "    (see failures above)")


def check_full() -> None:
    print("[full-size parameter counts]")
    for name, expected in EXPECTED_FULL_PARAMS.items():
        seed_everything(0)
        m = FULL[name][0]()
        n = sum(p.numel() for p in m.parameters())
        check(n == expected, f"FULL {name}: {n:,} params, expected {expected:,}")
        print(f"    {name:14s} {n:>12,}  {'ok' if n == expected else 'MISMATCH'}")
    # full-size forward of the cheap ones (shapes only)
    for name in ["resnet18", "mobilenet_v2", "blazeface_landm", "tsn_r50", "deit_tiny"]:
        m = FULL[name][0]().eval()
        x = FULL[name][1]()
        with torch.no_grad():
            out = flatten_output(m(x))
        check(all(torch.isfinite(t).all() for t in out), f"FULL {name}: non-finite output")
        print(f"    {name:14s} full forward {tuple(x.shape)} -> {[tuple(t.shape) for t in out]}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fast", action="store_true", help="skip full-size models")
    ap.add_argument("only", nargs="*", help="restrict to these ZOO names")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.perf_counter()
    for name in args.only or list(ZOO):
        try:
            check_zoo_entry(name)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            check(False, f"{name}: crashed: {type(e).__name__}: {e}")
    if not args.only:
        check_structure()
        if not args.fast:
            check_full()
    print(f"\n{len(ZOO)} zoo entries, {time.perf_counter() - t0:.1f}s total")
    if FAILURES:
        print(f"{len(FAILURES)} FAILURE(S):")
        for f in FAILURES:
            print("  -", f)
        return 1
    print("ALL OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
