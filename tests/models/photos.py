"""Real photos from installed wheels (nothing is downloaded), and data sets cut from them for the real-weight tests.

* :func:`photos`: the colour and grey photos that ship inside scikit-image and scikit-learn, as HxWx3 uint8.
* :func:`page_text_lines`: crops of the text lines of ``skimage.data.page()`` (a camera photo of a book page, uneven
  lighting), upright and turned 180 degrees, labelled 0 / 1: real photographed text for PaddleOCR's text-direction
  classifier.
* :func:`rendered_text_lines`: sentences drawn with Pillow's bundled TrueType font onto crops of the photos,
  upright or turned, labelled.
* :func:`photo_patches`: random square crops of the photos, labelled with the photo they come from; the
  training crops come from the left 3/4 of each photo, the held-out crops from the right quarter (pixels the
  classifier never saw).
"""
from __future__ import annotations

import functools

import numpy as np

#: photos used as classes / backgrounds: (name, loader) from skimage.data or sklearn's sample images
PHOTO_NAMES = ("astronaut", "camera", "coffee", "chelsea", "coins", "hubble_deep_field", "immunohistochemistry",
               "rocket", "moon", "brick", "grass", "gravel", "china", "flower")

#: text bands (rows) of skimage.data.page(), read off its row profile of dark pixels
PAGE_LINES = ((10, 38), (46, 64), (64, 82), (82, 100), (99, 118), (117, 137), (168, 191))

SENTENCES = (
    "Beautiful is better than ugly.", "Explicit is better than implicit.", "Simple is better than complex.",
    "Complex is better than complicated.", "Flat is better than nested.", "Sparse is better than dense.",
    "Readability counts.", "Special cases aren't special enough to break the rules.",
    "Although practicality beats purity.", "Errors should never pass silently.", "Unless explicitly silenced.",
    "In the face of ambiguity, refuse the temptation to guess.", "Now is better than never.",
    "If the implementation is hard to explain, it's a bad idea.", "Namespaces are one honking great idea",
    "INT8 weights 4x smaller", "Calibration 2048 samples", "Room 101, 3rd floor", "Open daily 9:00-17:30",
    "Quantize per channel", "Exit", "Platform 7", "The quick brown fox jumps over the lazy dog",
    "Pack my box with five dozen liquor jugs", "Sphinx of black quartz, judge my vow", "No parking",
    "Total: 42.50 EUR", "Model zoo / ResNet-18", "Depthwise 3x3", "Keep left", "Call 555-0199",
)


@functools.lru_cache(maxsize=None)
def photos() -> dict[str, np.ndarray]:
    """``{name: HxWx3 uint8}`` for :data:`PHOTO_NAMES` (grey photos repeated to three channels)."""
    import skimage.data
    from sklearn.datasets import load_sample_image

    out = {}
    for name in PHOTO_NAMES:
        img = load_sample_image(f"{name}.jpg") if name in ("china", "flower") else getattr(skimage.data, name)()
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        out[name] = np.ascontiguousarray(img[:, :, :3].astype(np.uint8))
    return out


def page_text_lines(widths=(96, 144, 192, 288, 384), step: int = 32, jitter=(-2, 2)):
    """Crops of the text lines of ``skimage.data.page()``: ``(images, labels)``, label 1 = turned 180 degrees.

    Every band of :data:`PAGE_LINES`, every width in ``widths`` at offsets ``step`` apart, shifted vertically by
    ``jitter`` pixels, each upright and turned (flipped in both axes): 840 crops with the defaults.
    """
    import skimage.data

    page = skimage.data.page()
    images, labels = [], []
    for top, bottom in PAGE_LINES:
        for w in widths:
            for x0 in range(0, page.shape[1] - w + 1, step):
                for dy in jitter:
                    crop = page[max(0, top + dy):bottom + dy, x0:x0 + w]
                    for turned in (0, 1):
                        images.append(np.ascontiguousarray(crop[::-1, ::-1] if turned else crop))
                        labels.append(turned)
    return images, np.asarray(labels, dtype=np.int64)


def rendered_text_lines(n: int, seed: int, backgrounds=PHOTO_NAMES, sentences=SENTENCES):
    """``n`` text lines drawn on crops of real photos: ``(images, labels)``, label 1 = turned 180 degrees.

    Each line: a sentence from ``sentences``, Pillow's bundled font at 16-32 px, dark or light ink (whichever
    contrasts with the crop), on a crop of a photo from ``backgrounds`` at a random place; half of them turned.
    """
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    pics = photos()
    images, labels = [], []
    for i in range(n):
        text = sentences[rng.integers(len(sentences))]
        size = int(rng.integers(16, 33))
        pad = int(rng.integers(2, 8))
        bg = pics[backgrounds[rng.integers(len(backgrounds))]]
        while True:  # a long line on a small photo: smaller text
            font = ImageFont.load_default(size=size)
            left, top, right, bottom = font.getbbox(text)
            w, h = right - left + 2 * pad, bottom - top + 2 * pad
            if (w <= bg.shape[1] and h <= bg.shape[0]) or size <= 8:
                break
            size -= 2
        y0 = int(rng.integers(0, bg.shape[0] - h + 1))
        x0 = int(rng.integers(0, bg.shape[1] - w + 1))
        crop = Image.fromarray(bg[y0:y0 + h, x0:x0 + w])
        ink = (20, 20, 20) if np.asarray(crop).mean() > 110 else (240, 240, 240)
        ink = tuple(int(c + rng.integers(-15, 16)) for c in ink)
        ImageDraw.Draw(crop).text((pad - left, pad - top), text, font=font, fill=ink)
        img = np.asarray(crop)
        turned = int(i % 2)
        images.append(np.ascontiguousarray(img[::-1, ::-1] if turned else img))
        labels.append(turned)
    return images, np.asarray(labels, dtype=np.int64)


def photo_patches(n: int, seed: int, size: int = 32, split: str = "train", names=PHOTO_NAMES):
    """``n`` random ``size`` x ``size`` crops of the photos in ``names``: ``(uint8 N x size x size x 3, labels)``.

    The label is the photo's index in ``names``. ``split="train"`` crops from the left 3/4 of each photo,
    ``"test"`` from the right quarter, so held-out crops share no pixel with training ones. Each crop is taken
    at a random scale (a square of ``size`` to ``2 * size`` pixels, resized to ``size``) and mirrored at random.
    """
    from PIL import Image

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    rng = np.random.default_rng(seed)
    pics = photos()
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(len(names), size=n)
    for i, cls in enumerate(labels):
        img = pics[names[cls]]
        h, w = img.shape[:2]
        cut = (3 * w) // 4
        lo, hi = (0, cut) if split == "train" else (cut, w)
        side = int(rng.integers(size, min(2 * size, hi - lo, h) + 1))
        y0 = int(rng.integers(0, h - side + 1))
        x0 = int(rng.integers(lo, hi - side + 1))
        crop = img[y0:y0 + side, x0:x0 + side]
        if side != size:
            crop = np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR))
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = crop
    return out, labels.astype(np.int64)
