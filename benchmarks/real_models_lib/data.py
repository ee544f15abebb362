"""Deterministic inputs: photo crops from scikit-learn's and scikit-image's sample
photos, rendered text.

Photo crops: square boxes of seven photos at several scales and positions, some
mirrored, drawn from fixed seeds: scikit-learn's china.jpg and flower.jpg and
scikit-image's astronaut, cat (chelsea), coffee, motorcycle and rocket (the two
scikit-learn photos alone until session 11: 19 distinct float32 top-1 classes over
96 crops, now 27-33). The evaluation and calibration sets come from different
seeds; calibration boxes are drawn excluding the evaluation ones. Each box is
resized to the model's resolution (bicubic) and normalised as the model was
trained: EfficientNet-lite, a TensorFlow edge model, with the inception-style
``(x - 127) / 128`` of 8-bit pixels (``EDGE_MEAN`` / ``EDGE_STD``), NCHW float32.
Until session 11 the crops were normalised with the ImageNet mean and standard
deviation instead: 2.6x the amplitude the network was trained on (its stem's
batch variance 6.7x its BatchNorm's running variance, 1.3x with the right
normalisation), so every EfficientNet figure before then was measured off the
network's input distribution.

Text: fixed strings rendered in black on white with Pillow's default font
(FreeType, scalable) as recognizer lines (height 48, the recognizer's input
height) and as detector pages.
"""

from __future__ import annotations

import math

import numpy as np

# EfficientNet-lite's input normalisation, of pixels in [0, 1] (TensorFlow's
# edge models: mean 127, standard deviation 128 of 8-bit values).
EDGE_MEAN = np.full(3, 127.0 / 255.0, np.float32)
EDGE_STD = np.full(3, 128.0 / 255.0, np.float32)

# Crop side as a fraction of the image's short side.
CROP_SCALES = (1.0, 0.85, 0.7, 0.55, 0.45, 0.35, 0.28)
EVAL_SEED, CALIB_SEED = 20240, 77


# scikit-image's bundled colour photos of things ImageNet has classes for.
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "rocket.jpg")


def sample_images() -> list:
    """scikit-learn's bundled china.jpg and flower.jpg, then SKIMAGE_PHOTOS, as
    PIL RGB images, in that order."""
    import importlib.resources

    from PIL import Image
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    order = sorted(range(len(data.filenames)), key=lambda i: data.filenames[i])
    images = [Image.fromarray(data.images[i]).convert("RGB") for i in order]
    bundled = importlib.resources.files("skimage") / "data"
    for name in SKIMAGE_PHOTOS:
        with (bundled / name).open("rb") as f:
            images.append(Image.open(f).convert("RGB"))   # read before the file closes
    return images


def crop_boxes(count: int, seed: int, sizes: list[tuple[int, int]],
               exclude=frozenset()) -> list[tuple]:
    """``count`` distinct boxes (image index, x0, y0, side, mirrored), alternating
    images, none of them in ``exclude``."""
    rng = np.random.default_rng(seed)
    boxes, seen = [], set(exclude)
    while len(boxes) < count:
        image = len(boxes) % len(sizes)
        width, height = sizes[image]
        side = int(round(CROP_SCALES[rng.integers(len(CROP_SCALES))] * min(width, height)))
        x0 = int(rng.integers(0, width - side + 1))
        y0 = int(rng.integers(0, height - side + 1))
        box = (image, x0, y0, side, bool(rng.integers(2)))
        if box not in seen:
            seen.add(box)
            boxes.append(box)
    return boxes


def photo_crops(resolution: int, n_eval: int, n_calib: int):
    """(eval batch, calibration batch), each (N, 3, resolution, resolution) float32."""
    from PIL import Image

    images = sample_images()
    sizes = [im.size for im in images]
    eval_boxes = crop_boxes(n_eval, EVAL_SEED, sizes)
    calib_boxes = crop_boxes(n_calib, CALIB_SEED, sizes, exclude=frozenset(eval_boxes))

    def render(boxes):
        out = np.empty((len(boxes), 3, resolution, resolution), np.float32)
        for k, (image, x0, y0, side, mirrored) in enumerate(boxes):
            crop = images[image].resize((resolution, resolution), Image.BICUBIC,
                                        box=(x0, y0, x0 + side, y0 + side))
            if mirrored:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            x = np.asarray(crop, np.float32) / 255.0
            out[k] = ((x - EDGE_MEAN) / EDGE_STD).transpose(2, 0, 1)
        return out

    return render(eval_boxes), render(calib_boxes)


# ----------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------

TEXT_LINES = [
    "Invoice 2024-0315",
    "Total due: $1,284.50",
    "The quick brown fox jumps",
    "over the lazy dog.",
    "Order #A7731 shipped",
    "Call +1 (415) 555-0199",
    "Room 204, Building C",
    "Expires 09/27",
    "Weight: 12.5 kg",
    "Meeting at 10:30 AM",
    "Batch size 128, lr 3e-4",
    "JPEG coded checkpoints",
    "Sample text for OCR",
    "Paris, France 75008",
    "Temperature 21.7 C",
    "Version 3.14.159",
    "Hello World",
    "Station 42 Platform 9",
    "Please keep this receipt",
    "Serial: XK-5521-QZ",
    "Monday, 3 March",
    "Chapter 7: Results",
    "Price per unit 0.99",
    "Thank you for visiting",
]


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def text_line_image(text: str, size: int = 32, pad: int = 10) -> np.ndarray:
    """``text`` in black on white, height 48 after the recognizer's resize, HxWx3 uint8."""
    from PIL import Image, ImageDraw

    font = _font(size)
    left, top, right, bottom = font.getbbox(text)
    width, height = right - left + 2 * pad, bottom - top + 2 * pad
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).text((pad - left, pad - top), text, fill="black", font=font)
    return np.asarray(image)


def rec_batch(texts: list[str], height: int = 48) -> np.ndarray:
    """Rendered lines as the recognizer's input: resized to ``height`` keeping the aspect
    ratio, scaled to [-1, 1], zero-padded on the right to the widest line (N, 3, 48, W)."""
    from PIL import Image

    images = [text_line_image(t) for t in texts]
    widths = [int(math.ceil(height * im.shape[1] / im.shape[0])) for im in images]
    width = max(max(widths), 320)
    batch = np.zeros((len(images), 3, height, width), np.float32)
    for k, (im, w) in enumerate(zip(images, widths)):
        resized = np.asarray(Image.fromarray(im).resize((w, height), Image.BILINEAR), np.float32)
        batch[k, :, :, :w] = (resized[:, :, ::-1].transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return batch


def calibration_lines() -> list[str]:
    """Text lines for calibration statistics, none of them an evaluation line: each
    evaluation line's words in reverse order."""
    return [" ".join(reversed(t.split())) + " ." for t in TEXT_LINES]


def det_pages(count: int, shape: tuple[int, int] = (512, 640), seed: int = 5) -> np.ndarray:
    """``count`` pages of text lines at several sizes and tints, as the detector's input
    (N, 3, H, W) scaled to [-1, 1] (H and W multiples of 32); calibration pages use
    another ``seed``."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    pages = np.empty((count, 3, *shape), np.float32)
    for p in range(count):
        page = Image.new("RGB", (shape[1], shape[0]), tuple(int(v) for v in rng.integers(225, 256, 3)))
        draw = ImageDraw.Draw(page)
        y = 16
        while True:
            size = int(rng.integers(16, 44))
            font = _font(size)
            text = TEXT_LINES[int(rng.integers(len(TEXT_LINES)))]
            left, top, right, bottom = font.getbbox(text)
            if y + bottom - top + 8 > shape[0]:
                break
            x = int(rng.integers(8, max(9, shape[1] - (right - left) - 8)))
            ink = tuple(int(v) for v in rng.integers(0, 80, 3))
            draw.text((x - left, y - top), text, fill=ink, font=font)
            y += bottom - top + int(rng.integers(10, 40))
        x = np.asarray(page, np.float32)[:, :, ::-1] / 255.0
        pages[p] = ((x - 0.5) / 0.5).transpose(2, 0, 1)
    return pages
