"""Rendered-text inputs for the PP-OCRv4 det/rec/cls models, preprocessed as rapidocr does.

    python tools/ocr_data.py [--roles det,rec,cls] [--calib 32] [--eval 64] [--seed 0]
        [--out DIR] [--det-size 640] [--det-limit max:960] [--rec-width 320] [--models DIR]
        [--preview DIR]

Text is rendered offline with Pillow (a tools-only dependency, not one of edgeopt's): the
FreeType font of ``PIL.ImageFont.load_default(size=...)``, random words, numbers, dates and
codes, varied size, position, colours, slight rotation, light blur and noise.

- ``det``: a page (default 640 x 640) with several lines of text, some on coloured bars, a
  few rules and boxes as distractors, on a paper-like background with a gradient.
- ``rec``: one cropped text line, as the detector would hand it over.
- ``cls``: one cropped text line; every other one is rotated by 180 degrees.

Each image is then preprocessed exactly as ``rapidocr-onnxruntime`` 1.4.4 does for that model
(``ch_ppocr_det/utils.py`` ``DetPreProcess``, ``ch_ppocr_rec/text_recognize.py`` and
``ch_ppocr_cls/text_cls.py`` ``resize_norm_img``): the image in BGR order, as ``cv2.imread``
gives it; ``cv2.resize``'s default bilinear interpolation (reimplemented here in numpy: it
may differ from OpenCV's fixed-point arithmetic by one grey level); ``(pixel / 255 - 0.5) /
0.5``; CHW.

- det: rapidocr's ``get_preprocess`` + ``DetPreProcess.resize``: a ratio from ``limit_type``
  and ``limit_side_len``, then both sides rounded to multiples of 32. rapidocr's config says
  ``min:736`` (the short side is scaled to 736); ``--det-limit max:960`` (the other setting
  rapidocr supports: sides under 960 are kept) leaves a 640 x 640 page at 1 x 3 x 640 x 640.
- rec: height 48, width ``ceil(48 * w / h)``, zero-padded on the right to the batch width,
  which rapidocr makes ``max(320 / 48, widest line in the batch) * 48``. Lines are generated
  no wider than ``--rec-width / 48`` so that every sample has the shape 3 x 48 x rec-width.
- cls: 3 x 48 x 192, the same resize (squeezed to 192 when wider) and padding.

Output, for each role: ``DIR/<role>_calib.npz`` and ``DIR/<role>_eval.npz``, each holding one
float32 array of shape ``(N, 3, H, W)`` keyed by the model's input name (so either file is a
valid ``edgeopt --calib`` file), and ``DIR/<role>_eval.json`` with the ground truth of the
evaluation images (text, and for cls whether the line is rotated). The two splits are drawn
from independent streams of ``--seed``: the calibration images do not depend on ``--eval``.
``--preview DIR`` also saves the first images of each split as PNG files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

ROLES = ("det", "rec", "cls")
#: The models' input name when the model file is not at hand (all three call it ``x``).
DEFAULT_INPUT = "x"
#: rapidocr's cls_image_shape and rec_img_shape[:2].
CLS_SHAPE = (3, 48, 192)
REC_HEIGHT = 48

WORDS = [
    "the", "of", "and", "to", "in", "is", "for", "on", "with", "as", "by", "at", "from", "this",
    "that", "total", "page", "date", "invoice", "order", "number", "name", "address", "phone",
    "email", "price", "amount", "quantity", "item", "description", "customer", "account",
    "payment", "due", "balance", "tax", "subtotal", "shipping", "delivery", "report", "summary",
    "section", "chapter", "figure", "table", "notes", "reference", "contact", "office", "street",
    "avenue", "city", "state", "country", "code", "model", "serial", "version", "release",
    "update", "status", "active", "pending", "closed", "open", "approved", "received", "sent",
    "monday", "tuesday", "friday", "january", "march", "june", "october", "december", "morning",
    "evening", "station", "platform", "ticket", "gate", "seat", "class", "adult", "child",
    "return", "single", "welcome", "exit", "entrance", "parking", "floor", "room", "hotel",
    "restaurant", "menu", "coffee", "tea", "water", "bread", "cheese", "chicken", "salad", "soup",
    "dessert", "special", "discount", "offer", "sale", "new", "free", "limited", "edition",
    "warning", "caution", "danger", "notice", "please", "thank", "you", "store", "market", "bank",
    "school", "hospital", "library", "museum", "park", "garden", "center", "north", "south",
    "east", "west", "Python", "ONNX", "Runtime", "model", "quantization", "edge", "device",
    "camera", "sensor", "battery", "memory", "storage",
]


@dataclass(frozen=True)
class Sample:
    """One rendered image (RGB, uint8, H x W x 3) and its ground truth."""

    image: np.ndarray
    text: str
    rotated: bool = False


# ----------------------------------------------------------------------------- text


def _token(rng: np.random.Generator) -> str:
    """A word (in one of three cases) or a number-like token."""
    kind = rng.random()
    if kind < 0.72:
        w = str(rng.choice(WORDS))
        case = rng.random()
        return w.upper() if case < 0.15 else w.capitalize() if case < 0.45 else w
    if kind < 0.80:
        return f"{rng.integers(0, 1000)}.{rng.integers(0, 100):02d}"
    if kind < 0.86:
        return f"{rng.integers(2000, 2031)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"
    if kind < 0.92:
        letters = "".join(rng.choice(list("ABCDEFGHKLMNPRSTXYZ"), 2))
        return f"{letters}-{rng.integers(100, 100000)}"
    return str(rng.integers(0, 100000))


def random_text(rng: np.random.Generator, max_words: int) -> str:
    """One line of 1..max_words tokens, sometimes with a colon or a trailing full stop."""
    words = [_token(rng) for _ in range(int(rng.integers(1, max_words + 1)))]
    if len(words) > 1 and rng.random() < 0.2:
        words[0] += ":"
    if rng.random() < 0.15:
        words[-1] += "."
    return " ".join(words)


# ----------------------------------------------------------------------------- drawing


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def contrasting_colours(rng: np.random.Generator, light_bg: float = 0.75
                        ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A background and a text colour at least ~100 grey levels apart."""
    base = rng.integers(200, 256) if rng.random() < light_bg else rng.integers(0, 70)
    bg = tuple(int(np.clip(base + rng.integers(-25, 26), 0, 255)) for _ in range(3))
    dark = sum(bg) / 3 > 127
    ink = rng.integers(0, 90) if dark else rng.integers(180, 256)
    tint = rng.integers(-40, 41, 3) * (rng.random() < 0.3)
    fg = tuple(int(np.clip(ink + t, 0, 255)) for t in tint)
    return bg, fg


def degrade(rng: np.random.Generator, image, max_blur: float = 0.8, max_noise: float = 6.0
            ) -> np.ndarray:
    """Light Gaussian blur (half the time) and Gaussian pixel noise, as uint8 RGB."""
    from PIL import ImageFilter

    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, max_blur))))
    arr = np.asarray(image, dtype=np.float32)
    arr = arr + rng.normal(0, rng.uniform(0, max_noise), arr.shape)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def _line_image(rng: np.random.Generator, text: str, size: int):
    """``text`` on a plain background, cropped with a detector-like margin (PIL image)."""
    from PIL import Image, ImageDraw

    font = _font(size)
    x0, y0, x1, y1 = font.getbbox(text)
    mx, my = (int(rng.integers(2, max(3, size // 2))) for _ in range(2))
    bg, fg = contrasting_colours(rng)
    image = Image.new("RGB", (x1 - x0 + 2 * mx, y1 - y0 + 2 * my), bg)
    ImageDraw.Draw(image).text((mx - x0, my - y0), text, font=font, fill=fg)
    if rng.random() < 0.4:
        image = image.rotate(float(rng.uniform(-1.5, 1.5)), resample=Image.BICUBIC,
                             fillcolor=bg)
    return image


def text_line(rng: np.random.Generator, max_ratio: float, max_words: int = 7) -> Sample:
    """A cropped single text line whose width / height is at most ``max_ratio``.

    Words are dropped from the end until the line fits.
    """
    size = int(rng.integers(14, 41))
    words = random_text(rng, max_words).split(" ")
    while True:
        image = _line_image(rng, " ".join(words), size)
        if image.width / image.height <= max_ratio or len(words) == 1:
            break
        words.pop()
    if image.width / image.height > max_ratio:  # one long token: squeeze it
        image = image.resize((int(image.height * max_ratio), image.height))
    return Sample(degrade(rng, image), " ".join(words))


def _page_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Paper-like RGB background: a tinted light colour with a soft linear gradient."""
    base = rng.integers(205, 256, 3).astype(np.float32)
    gy, gx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    direction = rng.normal(size=2)
    shade = (gy * direction[0] + gx * direction[1]) * rng.uniform(0, 12)
    return np.clip(base[None, None, :] + shade[..., None], 0, 255).astype(np.uint8)


def _draw_distractors(rng: np.random.Generator, draw, h: int, w: int) -> None:
    """A few rules and empty boxes: non-text strokes a page has."""
    for _ in range(int(rng.integers(0, 4))):
        grey = tuple(int(v) for v in rng.integers(60, 180, 3))
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 20))
        if rng.random() < 0.5:
            draw.line((x0, y0, min(w - 1, x0 + int(rng.integers(40, w))), y0), fill=grey,
                      width=int(rng.integers(1, 3)))
        else:
            draw.rectangle((x0, y0, min(w - 1, x0 + int(rng.integers(20, 200))),
                            min(h - 1, y0 + int(rng.integers(15, 120)))), outline=grey)


def page(rng: np.random.Generator, h: int, w: int) -> Sample:
    """A page with several text lines laid out top to bottom, some in two columns."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(_page_background(rng, h, w))
    draw = ImageDraw.Draw(image)
    _draw_distractors(rng, draw, h, w)
    lines, y = [], int(rng.integers(4, h // 8))
    while True:
        size = int(rng.integers(12, 37))
        if y + size * 1.4 > h:
            break
        lines += _page_row(rng, draw, y, size, w)
        y += int(size * rng.uniform(1.4, 3.0))
    return Sample(degrade(rng, image, max_blur=0.7, max_noise=5.0), "\n".join(lines))


def _page_row(rng: np.random.Generator, draw, y: int, size: int, w: int) -> list[str]:
    """Draw one row (one or two text lines) at height ``y``; returns the texts drawn."""
    font, texts = _font(size), []
    columns = 2 if rng.random() < 0.3 else 1
    for c in range(columns):
        left, right = w * c // columns, w * (c + 1) // columns
        text = random_text(rng, 8 // columns)
        x = left + int(rng.integers(4, max(5, (right - left) // 4)))
        while text and font.getbbox(text)[2] > right - x - 4:
            text = text.rsplit(" ", 1)[0] if " " in text else ""
        if not text or rng.random() < 0.1:  # a blank cell now and then
            continue
        _, y0, x1, y1 = font.getbbox(text)
        if rng.random() < 0.15:  # light text on a coloured bar
            bar = tuple(int(v) for v in rng.integers(20, 140, 3))
            draw.rectangle((x - 4, y + y0 - 4, x + x1 + 4, y + y1 + 4), fill=bar)
            fill = tuple(int(v) for v in rng.integers(215, 256, 3))
        else:
            fill = tuple(int(v) for v in rng.integers(0, 90, 3))
        draw.text((x, y), text, font=font, fill=fill)
        texts.append(text)
    return texts


# ----------------------------------------------------------------------------- rapidocr


def resize_linear(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """``cv2.resize(img, (width, height))`` (INTER_LINEAR) of a uint8 H x W x C image.

    Pixel centres map as ``(dst + 0.5) * src / dst - 0.5``, clamped to the border, with no
    anti-aliasing when shrinking, as OpenCV does.
    """
    def taps(dst: int, src: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(dst) + 0.5) * (src / dst) - 0.5, 0, src - 1)
        lo = np.floor(pos).astype(np.int64)
        return lo, np.minimum(lo + 1, src - 1), (pos - lo).astype(np.float32)

    y0, y1, fy = taps(height, img.shape[0])
    x0, x1, fx = taps(width, img.shape[1])
    src = img.astype(np.float32)
    rows = src[y0] * (1 - fy)[:, None, None] + src[y1] * fy[:, None, None]
    out = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _normalize_chw(img: np.ndarray) -> np.ndarray:
    """``(pixel / 255 - 0.5) / 0.5`` in CHW order (rapidocr's mean = std = 0.5)."""
    return ((img.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def det_preprocess(bgr: np.ndarray, limit_type: str = "min", limit_side_len: int = 736
                   ) -> np.ndarray:
    """rapidocr's ``TextDetector.get_preprocess`` + ``DetPreProcess``: 1 x 3 x H x W."""
    h, w = bgr.shape[:2]
    if limit_type == "min":
        limit = limit_side_len
        ratio = limit / min(h, w) if min(h, w) < limit else 1.0
    else:  # rapidocr picks the limit from the image size when limit_type is max
        limit = 960 if max(h, w) < 960 else 1500 if max(h, w) < 1500 else 2000
        ratio = limit / max(h, w) if max(h, w) > limit else 1.0
    rh = int(round(int(h * ratio) / 32) * 32)
    rw = int(round(int(w * ratio) / 32) * 32)
    return _normalize_chw(resize_linear(bgr, rw, rh))[None]


def line_preprocess(bgr: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """rapidocr's rec/cls ``resize_norm_img``: height H, width ``ceil(H * w / h)`` capped at
    W, normalized, zero-padded on the right to C x H x W."""
    _, height, width = shape
    h, w = bgr.shape[:2]
    resized_w = min(width, math.ceil(height * w / float(h)))
    out = np.zeros(shape, dtype=np.float32)
    out[:, :, :resized_w] = _normalize_chw(resize_linear(bgr, resized_w, height))
    return out


# ----------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class Config:
    """How the images of every role are made."""

    det_size: tuple[int, int] = (640, 640)
    det_limit: tuple[str, int] = ("min", 736)
    rec_width: int = 320


def make_sample(role: str, rng: np.random.Generator, index: int, cfg: Config) -> Sample:
    """Render sample ``index`` of ``role`` (cls: odd indices are rotated by 180 degrees)."""
    if role == "det":
        return page(rng, *cfg.det_size)
    if role == "rec":
        return text_line(rng, cfg.rec_width / REC_HEIGHT)
    line = text_line(rng, max_ratio=8.0, max_words=4)
    if index % 2:
        return Sample(np.ascontiguousarray(line.image[::-1, ::-1]), line.text, True)
    return line


def preprocess(role: str, rgb: np.ndarray, cfg: Config) -> np.ndarray:
    """The model input (C x H x W, float32) rapidocr would feed for this RGB image."""
    bgr = np.ascontiguousarray(rgb[..., ::-1])  # cv2.imread's channel order
    if role == "det":
        return det_preprocess(bgr, *cfg.det_limit)[0]
    if role == "rec":
        return line_preprocess(bgr, (3, REC_HEIGHT, cfg.rec_width))
    return line_preprocess(bgr, CLS_SHAPE)


def make_split(role: str, split: str, n: int, seed: int, cfg: Config
               ) -> tuple[np.ndarray, list[Sample]]:
    """``n`` preprocessed inputs (N x C x H x W) and their rendered samples.

    Each (role, split) has its own random stream derived from ``seed``.
    """
    rng = np.random.default_rng([seed, ROLES.index(role), ("calib", "eval").index(split)])
    samples = [make_sample(role, rng, i, cfg) for i in range(n)]
    return np.stack([preprocess(role, s.image, cfg) for s in samples]), samples


def input_name(model_path: str | None) -> str:
    """The first graph input's name of ``model_path`` (``x`` without a model file)."""
    if not model_path or not os.path.isfile(model_path):
        return DEFAULT_INPUT
    import onnx

    return onnx.load(model_path, load_external_data=False).graph.input[0].name


def _save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` atomically (temporary file, then rename)."""
    fd, tmp = tempfile.mkstemp(prefix=".ocr_data.", suffix=".npz", dir=os.path.dirname(path))
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _save_preview(folder: str, name: str, samples: list[Sample], count: int = 4) -> None:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i, s in enumerate(samples[:count]):
        Image.fromarray(s.image).save(os.path.join(folder, f"{name}_{i}.png"))


def write_role(role: str, out: str, n_calib: int, n_eval: int, seed: int, cfg: Config,
               key: str, preview: str | None = None,
               log: Callable[[str], None] = lambda s: None) -> dict[str, str]:
    """Render, preprocess and save both splits of one role; returns the files written."""
    files = {}
    for split, n in (("calib", n_calib), ("eval", n_eval)):
        x, samples = make_split(role, split, n, seed, cfg)
        files[split] = os.path.join(out, f"{role}_{split}.npz")
        _save_npz(files[split], {key: x})
        log(f"{files[split]}: {key} {x.shape} {x.dtype}")
        if preview:
            _save_preview(preview, f"{role}_{split}", samples)
        if split == "eval":
            truth = [{"text": s.text, "rotated": s.rotated} for s in samples]
            files["truth"] = os.path.join(out, f"{role}_eval.json")
            with open(files["truth"] + ".tmp", "w") as f:
                json.dump(truth, f, indent=0)
            os.replace(files["truth"] + ".tmp", files["truth"])
    return files


def _model_files(models_dir: str | None) -> dict[str, str]:
    """Where the det/rec/cls models are cached (tools/fetch_models.py's file names)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from fetch_models import MODELS, default_cache_dir

    folder = models_dir or str(default_cache_dir())
    return {role: os.path.join(folder, m.filename) for role, m in MODELS.items()}


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.partition("x")
    return int(h), int(w or h)


def _limit(text: str) -> tuple[str, int]:
    kind, _, side = text.partition(":")
    if kind not in ("min", "max"):
        raise argparse.ArgumentTypeError("expected min:N or max:N")
    return kind, int(side or 736)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--roles", default=",".join(ROLES), help="comma-separated: det,rec,cls")
    ap.add_argument("--calib", type=int, default=32, help="calibration images per role")
    ap.add_argument("--eval", type=int, default=64, help="evaluation images per role")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=".", help="output folder (created)")
    ap.add_argument("--det-size", type=_size, default=(640, 640), metavar="HxW",
                    help="rendered page size (default 640x640)")
    ap.add_argument("--det-limit", type=_limit, default=("min", 736), metavar="TYPE:N",
                    help="rapidocr's det limit_type:limit_side_len (default min:736, its "
                         "config; max:960 keeps pages under 960 px at their size)")
    ap.add_argument("--rec-width", type=int, default=320, help="fixed rec input width")
    ap.add_argument("--models", default=None, help="folder of the .onnx files, for the "
                    "input names (default: tools/fetch_models.py's cache)")
    ap.add_argument("--preview", default=None, help="also save a few PNGs here")
    args = ap.parse_args(argv)
    roles = [r for r in args.roles.split(",") if r]
    if bad := [r for r in roles if r not in ROLES]:
        ap.error(f"unknown role: {', '.join(bad)}")
    os.makedirs(args.out, exist_ok=True)
    cfg = Config(args.det_size, args.det_limit, args.rec_width)
    models = _model_files(args.models)
    for role in roles:
        write_role(role, args.out, args.calib, args.eval, args.seed, cfg,
                   input_name(models[role]), args.preview, log=print)
    return 0


if __name__ == "__main__":
    sys.exit(main())
