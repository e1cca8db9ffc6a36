"""Image calibration inputs: the ``--preprocess`` grammar and image decoding (Pillow).

Split from :mod:`edgeopt.passes.calib` (which documents the grammar); only that module
imports this one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from edgeopt.ir import DataType, Value, format_shape

from ._base import CalibrationError

__all__ = ["Preprocess", "load_image", "parse_preprocess", "unreadable"]


def unreadable(path: str, e: BaseException) -> CalibrationError:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return CalibrationError(f"{path}: cannot read calibration file ({reason})")



# -- images -----------------------------------------------------------------------------------
_LAYOUTS = ("nchw", "nhwc", "chw", "hwc", "nhw", "hw")
_INTERP = ("bilinear", "nearest", "bicubic", "lanczos")
_INTEGER_TYPES = frozenset({DataType.UINT8, DataType.INT8, DataType.UINT16, DataType.INT16,
                            DataType.INT32, DataType.INT64, DataType.UINT32, DataType.UINT64})
_PRE_KEYS = ("crop", "grayscale", "interp", "layout", "mean", "resize", "scale", "std")


@dataclass(frozen=True)
class Preprocess:
    """How images become input tensors (``--preprocess``; grammar in the module docs).

    None means "derive from the model input" (size, layout, grayscale, scale).
    """

    resize: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    layout: str | None = None
    grayscale: bool | None = None
    scale: float | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    interp: str = "bilinear"


def parse_preprocess(spec: str | None) -> Preprocess:
    """Parse a ``--preprocess`` spec such as ``resize=32x32,layout=nchw,mean=0.5,std=0.5``.

    Raises:
        CalibrationError: malformed pair, unknown or repeated key, or a bad value.
    """
    fields: dict[str, Any] = {}
    for token in filter(None, (t.strip() for t in (spec or "").split(","))):
        key, sep, val = (s.strip() for s in token.partition("="))
        if not sep or not key:
            raise CalibrationError(f"--preprocess: expected key=value, got {token!r}")
        if key not in _PRE_KEYS:
            raise CalibrationError(f"--preprocess: unknown key {key!r} (valid: "
                                   f"{', '.join(_PRE_KEYS)})")
        if key in fields:
            raise CalibrationError(f"--preprocess: {key!r} given twice")
        fields[key] = _pre_value(key, val.lower() if key in ("layout", "interp") else val)
    return Preprocess(**fields)


def _pre_value(key: str, val: str) -> Any:
    if key in ("resize", "crop"):
        m = re.fullmatch(r"(\d+)(?:[xX](\d+))?", val)
        if not m or int(m.group(1)) < 1 or int(m.group(2) or 1) < 1:
            raise CalibrationError(f"--preprocess: {key} must be HxW or S (positive integers), "
                                   f"got {val!r}")
        return (int(m.group(1)), int(m.group(2) or m.group(1)))
    if key in ("layout", "interp"):
        choices = _LAYOUTS if key == "layout" else _INTERP
        if val not in choices:
            raise CalibrationError(f"--preprocess: {key} must be one of {', '.join(choices)}; "
                                   f"got {val!r}")
        return val
    if key == "grayscale":
        if val.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise CalibrationError(f"--preprocess: grayscale must be true or false, got {val!r}")
        return val.lower() in ("true", "1", "yes")
    try:
        nums = tuple(float(x) for x in val.split("|"))
    except ValueError:
        raise CalibrationError(f"--preprocess: {key} must be a number"
                               f"{'' if key == 'scale' else ' or numbers separated by |'}, got "
                               f"{val!r}") from None
    if key == "scale" and len(nums) != 1:
        raise CalibrationError(f"--preprocess: scale takes one number, got {val!r}")
    if key in ("scale", "std") and (0.0 in nums or not all(map(math.isfinite, nums))):
        raise CalibrationError(f"--preprocess: {key} must be finite and non-zero, got {val!r}")
    return nums[0] if key == "scale" else nums


def _guess_layout(shape: tuple) -> str:
    rank = len(shape)
    if rank == 4:
        return "nhwc" if shape[1] not in (1, 3) and shape[3] in (1, 3) else "nchw"
    if rank == 3:
        return "chw" if shape[0] in (1, 3) else "hwc" if shape[2] in (1, 3) else "nhw"
    return "hw"


def _image_plan(value: Value, pre: Preprocess, path: str) -> Preprocess:
    """``pre`` with every 'derive from the model' field resolved for ``value``."""
    shape = value.shape if value.shape is not None else ("n", "c", "h", "w")
    if not 2 <= len(shape) <= 4:
        raise CalibrationError(f"{path}: input {value.name!r} has shape {format_shape(shape)}; "
                               "images need an input of rank 2 to 4")
    layout = pre.layout or _guess_layout(shape)
    if len(layout) != len(shape):
        raise CalibrationError(f"{path}: --preprocess layout={layout} has {len(layout)} axes, "
                               f"but input {value.name!r} has shape {format_shape(shape)}")
    dim = dict(zip(layout, shape, strict=True))
    size = pre.resize
    if size is None and isinstance(dim["h"], int) and isinstance(dim["w"], int):
        size = (dim["h"], dim["w"])
    gray = pre.grayscale if pre.grayscale is not None else dim.get("c", 1) == 1
    channels = 1 if gray else 3
    for key in ("mean", "std"):
        if len(getattr(pre, key)) not in (1, channels):
            raise CalibrationError(f"{path}: --preprocess {key} has {len(getattr(pre, key))} "
                                   f"values for {channels} channel(s) of input {value.name!r}")
    integer = value.dtype in _INTEGER_TYPES
    scale = pre.scale if pre.scale is not None else (1.0 if integer else 255.0)
    return replace(pre, resize=size, layout=layout, grayscale=gray, scale=scale)


def load_image(path: str, value: Value, pre: Preprocess) -> np.ndarray:
    """One image as a sample of ``value``: shape ``(1, *input shape without its batch axis)``."""
    try:
        from PIL import Image
    except ImportError:
        raise CalibrationError(f"{path}: reading images needs Pillow: pip install pillow") \
            from None
    plan = _image_plan(value, pre, path)
    try:
        with Image.open(path) as img:
            img = img.convert("L" if plan.grayscale else "RGB")
            if plan.resize and img.size != (plan.resize[1], plan.resize[0]):
                filt = getattr(Image.Resampling, plan.interp.upper())
                img = img.resize((plan.resize[1], plan.resize[0]), filt)
            if plan.crop:
                img = _center_crop(img, plan.crop, path)
            pixels = np.asarray(img)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise unreadable(path, e) from None
    pixels = pixels.reshape(*pixels.shape[:2], -1)  # H, W, C
    if (plan.scale, plan.mean, plan.std) == (1.0, (0.0,), (1.0,)):
        arr: np.ndarray = pixels  # untouched pixels keep uint8 (integer-input models)
    else:
        mean = np.asarray(plan.mean, np.float32)
        arr = (pixels.astype(np.float32) / np.float32(plan.scale) - mean) / \
            np.asarray(plan.std, np.float32)
    axes = [c for c in plan.layout if c != "n"]  # type: ignore[union-attr]
    if "c" not in axes:
        arr = arr[..., 0]
    arr = arr.transpose([("h", "w", "c").index(c) for c in axes])
    return arr[np.newaxis]


def _center_crop(img: Any, crop: tuple[int, int], path: str) -> Any:
    (h, w), (width, height) = crop, img.size
    if h > height or w > width:
        raise CalibrationError(f"{path}: --preprocess crop={h}x{w} is larger than the image "
                               f"({height}x{width} after resizing)")
    top, left = (height - h) // 2, (width - w) // 2
    return img.crop((left, top, left + w, top + h))
