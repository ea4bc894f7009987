"""The bundled demo model for ``qcast demo`` / ``make demo``.

A small but real CNN (conv+BN+ReLU blocks, a residual add, max and average pooling, a linear head)
trained on scikit-learn's bundled 8x8 handwritten digits (1797 images, no download). Training is
deterministic and takes a few seconds on 2 CPU cores; the model reaches ~98-99% test accuracy, so a
quantized copy has a meaningful accuracy to keep.

Only torch, numpy and scikit-learn are used::

    from qcast.demo_data import load_digits_split, train_digits_cnn, accuracy
    model = train_digits_cnn(seed=0)                 # eval-mode DigitsCNN
    x_train, y_train, x_test, y_test = load_digits_split(seed=0)
    print(accuracy(model, x_test, y_test))           # ~0.98-0.99

Images are upsampled to 16x16 (bilinear) and normalised with fixed constants, so inputs have shape
``(N, 1, 16, 16)`` and dtype float32; labels are int64 (``torch.long``) in 0..9.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "IMAGE_SIZE",
    "DigitsCNN",
    "load_digits_split",
    "train_digits_cnn",
    "accuracy",
    "calibration_batches",
]

IMAGE_SIZE = 16
TEST_FRACTION = 0.2
# Mean/std of the digits pixels after scaling to [0, 1] (whole data set, 8x8); fixed so that
# normalisation does not depend on the split.
_PIXEL_MEAN = 0.3052
_PIXEL_STD = 0.3760


def load_digits_split(seed: int = 0, image_size: int = IMAGE_SIZE):
    """Return ``(x_train, y_train, x_test, y_test)`` from scikit-learn's bundled digits.

    A stratified 80/20 split chosen by ``seed``. ``x_*`` are float32 tensors of shape
    ``(N, 1, image_size, image_size)`` (bilinear upsampling from 8x8, normalised to roughly zero mean
    and unit variance); ``y_*`` are int64 tensors of class labels 0..9.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # (1797, 8, 8), values 0..1
    labels = digits.target.astype(np.int64)

    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for cls in range(10):  # stratified split, no dependency on sklearn's splitter
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * TEST_FRACTION))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train_idx = rng.permutation(np.concatenate(train_idx))
    test_idx = np.sort(np.concatenate(test_idx))

    x = torch.from_numpy(images).unsqueeze(1)
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = ((x - _PIXEL_MEAN) / _PIXEL_STD).contiguous()
    y = torch.from_numpy(labels)
    tr = torch.from_numpy(train_idx)
    te = torch.from_numpy(test_idx)
    return x[tr].clone(), y[tr].clone(), x[te].clone(), y[te].clone()


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class ResidualBlock(nn.Module):
    """conv-BN-ReLU, conv-BN, add the input, ReLU (a ResNet basic block)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + x)


class DigitsCNN(nn.Module):
    """A small CNN for 1x16x16 digits (~76k parameters).

    stem conv-BN-ReLU (16 ch... 32 ch) -> residual block -> max-pool 2 -> conv-BN-ReLU (64 ch)
    -> conv-BN-ReLU (64 ch) -> global average pool -> flatten -> dropout -> linear(64, 10).
    Works for any input size >= 2x2 (fully convolutional up to the global pool).
    """

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.stem = ConvBNReLU(1, width)
        self.block = ResidualBlock(width)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = ConvBNReLU(width, 2 * width)
        self.conv4 = ConvBNReLU(2 * width, 2 * width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.block(x)
        x = self.pool(x)
        x = self.conv3(x)
        x = self.conv4(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


@contextmanager
def _torch_state(threads: int, seed: int) -> Iterator[None]:
    """Fix thread count and RNG for a deterministic run; restore the caller's state afterwards."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    rng_state = torch.get_rng_state()
    try:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(seed)
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)
        torch.set_rng_state(rng_state)


def _shift_augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (zero-padded in normalised units)."""
    n, _, h, w = x.shape
    pad_value = -_PIXEL_MEAN / _PIXEL_STD  # a blank pixel after normalisation
    padded = F.pad(x, (max_shift,) * 4, value=pad_value)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    out = torch.empty_like(x)
    for sy in range(2 * max_shift + 1):
        for sx in range(2 * max_shift + 1):
            m = (dy == sy) & (dx == sx)
            if m.any():
                out[m] = padded[m, :, sy : sy + h, sx : sx + w]
    return out


def train_digits_cnn(
    seed: int = 0,
    epochs: int = 8,
    progress: Optional[Callable[[int, int, float], None]] = None,
    *,
    batch_size: int = 64,
    lr: float = 3e-3,
    threads: int = 2,
    data=None,
) -> DigitsCNN:
    """Train a :class:`DigitsCNN` deterministically and return it in eval mode.

    ``progress(epoch, epochs, mean_train_loss)`` is called after every epoch (epoch counts from 1).
    ``data`` may be a tuple from :func:`load_digits_split` to avoid reloading it. Uses ``threads``
    torch threads (the caller's thread count, RNG state and determinism flag are restored). With the
    defaults it takes a few seconds on 2 cores and reaches >= 97% test accuracy.
    """
    if data is None:
        data = load_digits_split(seed=seed)
    x_train, y_train = data[0], data[1]
    with _torch_state(threads, seed):
        model = DigitsCNN()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        steps_per_epoch = (len(x_train) + batch_size - 1) // batch_size
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.25
        )
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for epoch in range(1, epochs + 1):
            perm = torch.randperm(len(x_train), generator=gen)
            total, count = 0.0, 0
            for i in range(0, len(x_train), batch_size):
                idx = perm[i : i + batch_size]
                xb = _shift_augment(x_train[idx], gen)
                yb = y_train[idx]
                loss = F.cross_entropy(model(xb), yb, label_smoothing=0.05)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
                count += len(idx)
            if progress is not None:
                progress(epoch, epochs, total / count)
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy (0..1) of ``model`` on ``(x, y)``, evaluated in batches without gradients."""
    correct = 0
    for i in range(0, len(x), batch_size):
        pred = model(x[i : i + batch_size]).argmax(dim=1)
        correct += int((pred == y[i : i + batch_size]).sum())
    return correct / max(len(x), 1)


def calibration_batches(x: torch.Tensor, batch_size: int = 32, num_batches: int = 8):
    """A list of ``num_batches`` input batches taken in order from ``x`` (e.g. ``x_train``)."""
    return [x[i : i + batch_size] for i in range(0, min(len(x), batch_size * num_batches), batch_size)]


if __name__ == "__main__":  # python -m qcast.demo_data
    t0 = time.perf_counter()
    split = load_digits_split(0)
    m = train_digits_cnn(0, data=split, progress=lambda e, n, l: print(f"epoch {e}/{n} loss {l:.4f}"))
    dt = time.perf_counter() - t0
    n_params = sum(p.numel() for p in m.parameters())
    print(f"params {n_params}  train+load {dt:.1f}s  test acc {accuracy(m, split[2], split[3]):.4f}")
