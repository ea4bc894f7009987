"""Zoo of FLOAT reference models shaped like real user reports.

Pure ``torch.nn`` code (no torchvision / timm, no qcast).  Used by the
test-suite to check that quantization works on realistic model structures.

Public API
----------
``ZOO``            ``{name: (factory, example_input_fn)}`` -- small, fast
                   configurations (each forward < ~0.1 s on 2 CPU cores).
                   ``factory(**overrides)`` builds the model (float, train mode
                   as constructed by nn.Module -- call ``.eval()`` yourself);
                   ``example_input_fn(batch=1, seed=0)`` returns a tensor
                   (every model in the zoo takes a single tensor).
``FULL``           same layout, real-size architectures (defaults of the
                   factories, real input resolutions).  Slow-ish; for
                   structure / parameter-count checks, not for quantization loops.
``UNTRACEABLE``    ``{zoo_name: (qualified submodule name, ...)}``: submodules whose
                   forward cannot be ``torch.fx.symbolic_trace``-d (data-dependent
                   control flow).  Tracing the whole model fails; tracing with
                   those submodules' classes as leaf modules succeeds.
``OUTPUT_KINDS``   ``{zoo_name: "tensor" | "tuple" | "dict" | "dataclass"}``.
``randomize_bn_stats(model, seed=0)``  realistic random BN running stats/affine.
``seed_everything(seed)``              seeds python, numpy (if present), torch.
``flatten_output(out)``                tensor/tuple/list/dict/dataclass -> list of tensors.
"""
from __future__ import annotations

import dataclasses
import functools
import random
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn

from . import blazeface, custom, mobilenetv2, resnet, tsn, vgg, vit
from .blazeface import blazeface as _blazeface
from .custom import detector_dataclass, multitask_dict, user_unet
from .mobilenetv2 import mobilenet_v2
from .resnet import resnet18, resnet50
from .tsn import tsn_r50
from .vgg import cifar_vgg, vgg16
from .vit import deit_tiny

__all__ = [
    "ZOO",
    "FULL",
    "UNTRACEABLE",
    "OUTPUT_KINDS",
    "randomize_bn_stats",
    "seed_everything",
    "flatten_output",
    "image_input",
    # factories
    "resnet18",
    "resnet50",
    "vgg16",
    "cifar_vgg",
    "tsn_r50",
    "mobilenet_v2",
    "deit_tiny",
    "user_unet",
    "multitask_dict",
    "detector_dataclass",
    # modules
    "blazeface",
    "custom",
    "mobilenetv2",
    "resnet",
    "tsn",
    "vgg",
    "vit",
]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def seed_everything(seed: int = 0) -> None:
    """Seed python ``random``, numpy (if installed) and torch (CPU + CUDA)."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass
    torch.manual_seed(seed)


def randomize_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm (1d/2d/3d) realistic, non-trivial statistics.

    Freshly constructed BNs have running_mean=0, running_var=1, weight=1,
    bias=0, i.e. they are the identity in eval mode and BN folding is a no-op
    -- which would hide folding bugs.  This draws, per channel and
    deterministically from ``seed`` (in ``named_modules`` order):

    * ``weight``        ~ U(0.5, 1.5)
    * ``bias``          ~ N(0, 0.2)
    * ``running_mean``  ~ N(0, 0.2)
    * ``running_var``   ~ U(0.5, 2.0)

    Ranges are kept moderate so activations stay O(1) through 50+ layers
    (outputs remain finite and well-scaled).  Works in place; returns ``model``.
    """
    g = torch.Generator().manual_seed(seed)
    for _, m in model.named_modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        c = m.num_features
        with torch.no_grad():
            w = torch.empty(c).uniform_(0.5, 1.5, generator=g)
            b = torch.randn(c, generator=g) * 0.2
            # (torch >= 2.13 BN also has a keyword-only ``bias=False`` option: weight set, bias None)
            if m.weight is not None:
                m.weight.copy_(w)
            if m.bias is not None:
                m.bias.copy_(b)
            if m.track_running_stats and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.empty(c).uniform_(0.5, 2.0, generator=g))
    return model


def flatten_output(out) -> List[torch.Tensor]:
    """Flatten a model output (tensor / tuple / list / dict / dataclass) into a
    list of tensors in a deterministic order (dict: insertion order;
    dataclass: field order)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten_output(v)]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [t for f in dataclasses.fields(out) for t in flatten_output(getattr(out, f.name))]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten_output(v)]
    raise TypeError(f"unsupported output type {type(out)!r}")


def image_input(c: int, h: int, w: int, batch_mult: int = 1) -> Callable[..., torch.Tensor]:
    """Return ``fn(batch=1, seed=0) -> randn(batch * batch_mult, c, h, w)``
    (standard-normal, i.e. like a mean/std-normalised image)."""

    def fn(batch: int = 1, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch * batch_mult, c, h, w, generator=g)

    fn.shape = (batch_mult, c, h, w)  # per-batch-element shape, informative only
    return fn


P = functools.partial

# --------------------------------------------------------------------------------------
# registries
# --------------------------------------------------------------------------------------
#: small, fast configurations used by the test-suite
ZOO: Dict[str, Tuple[Callable[..., nn.Module], Callable[..., torch.Tensor]]] = {
    # torchvision ResNets (BasicBlock / Bottleneck, shared self.relu)
    "resnet18": (P(resnet18, width=32, num_classes=100), image_input(3, 64, 64)),
    "resnet50": (P(resnet50, width=16, num_classes=100), image_input(3, 64, 64)),
    # seed 001: torchvision vgg16 (+ the _bn variant)
    "vgg16": (P(vgg16, width_div=16), image_input(3, 224, 224)),
    "vgg16_bn": (P(vgg16, width_div=16, batch_norm=True), image_input(3, 224, 224)),
    # seed 003: user's Cifar VGG with BN ("cifar_rvgg11_bn" cfg RA)
    "cifar_vgg_bn": (P(cifar_vgg, cfg="RA", width_div=8, num_classes=10), image_input(3, 32, 32)),
    # seed 000: mmaction2 TSN, ResNet-50 of ConvModules, 3 segments -> input (N*3, 3, H, W)
    "tsn_r50": (P(tsn_r50, base_channels=16, num_segs=3, num_classes=101), image_input(3, 64, 64, batch_mult=3)),
    # seed 004: BlazeFace (returns (boxes, scores)); _landm = seed model verbatim (3 outputs)
    "blazeface": (P(_blazeface, with_landmarks=False), image_input(3, 128, 128)),
    "blazeface_landm": (P(_blazeface, with_landmarks=True), image_input(3, 128, 128)),
    # torchvision MobileNetV2
    "mobilenet_v2": (P(mobilenet_v2, width_mult=0.5, last_channel=320, num_classes=100), image_input(3, 96, 96)),
    # seed 002-like DeiT-tiny (timm Attention with q*scale, q@k^T, softmax, attn@v)
    "deit_tiny": (P(deit_tiny, depth=2, embed_dim=96, heads=3, img_size=64, patch_size=16, num_classes=100),
                  image_input(3, 64, 64)),
    # user-written models
    "user_unet": (P(user_unet, width=16, num_classes=4), image_input(3, 64, 64)),
    "user_unet_nogate": (P(user_unet, width=16, num_classes=4, with_gate=False), image_input(3, 64, 64)),
    "multitask_dict": (P(multitask_dict), image_input(3, 32, 32)),
    "detector_dataclass": (P(detector_dataclass), image_input(3, 32, 32)),
}

#: real-size architectures (factory defaults, native resolution)
FULL: Dict[str, Tuple[Callable[..., nn.Module], Callable[..., torch.Tensor]]] = {
    "resnet18": (resnet18, image_input(3, 224, 224)),
    "resnet50": (resnet50, image_input(3, 224, 224)),
    "vgg16": (vgg16, image_input(3, 224, 224)),
    "vgg16_bn": (P(vgg16, batch_norm=True), image_input(3, 224, 224)),
    "cifar_vgg_bn": (cifar_vgg, image_input(3, 32, 32)),
    "tsn_r50": (tsn_r50, image_input(3, 224, 224, batch_mult=3)),
    "blazeface": (_blazeface, image_input(3, 128, 128)),
    "blazeface_landm": (P(_blazeface, with_landmarks=True), image_input(3, 128, 128)),
    "mobilenet_v2": (mobilenet_v2, image_input(3, 224, 224)),
    "deit_tiny": (deit_tiny, image_input(3, 224, 224)),
    "user_unet": (user_unet, image_input(3, 128, 128)),
    "user_unet_nogate": (P(user_unet, with_gate=False), image_input(3, 128, 128)),
    "multitask_dict": (multitask_dict, image_input(3, 32, 32)),
    "detector_dataclass": (detector_dataclass, image_input(3, 32, 32)),
}

#: submodules whose forward is not symbolically traceable (data-dependent control flow)
UNTRACEABLE: Dict[str, Tuple[str, ...]] = {
    "user_unet": ("gate",),
}

OUTPUT_KINDS: Dict[str, str] = {name: "tensor" for name in ZOO}
OUTPUT_KINDS.update({
    "blazeface": "tuple",
    "blazeface_landm": "tuple",
    "multitask_dict": "dict",
    "detector_dataclass": "dataclass",
})
