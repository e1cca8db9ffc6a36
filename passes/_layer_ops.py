"""The layers recovery refits, as numpy: their geometry, their output, BN statistics.

Pure numpy (nothing here touches the IR), shared by :mod:`.recovery` (least-squares refit,
bias compensation), :mod:`.analyses.reconstruction` (greedy channel selection) and
:mod:`._sparsify_refit`: :class:`LayerSpec` describes a Gemm, MatMul or Conv consumer,
:func:`im2col` turns a Conv's input into the rows its weight multiplies, :func:`layer_output`
computes the layer, and :func:`reestimate_batchnorm` / :func:`match_batchnorm` give the
statistics of a BatchNormalization after a pruned or refit layer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = ["LayerSpec", "Layout", "im2col", "layer_output", "match_batchnorm",
           "reestimate_batchnorm"]

Layout = Literal["in_out", "out_in"]


@dataclass(frozen=True)
class LayerSpec:
    """What the consumer computes, besides its weight and bias.

    Attributes:
        kind: ``"gemm"`` (Gemm or MatMul: features on the last input axis) or ``"conv"``
            (channels on axis 1).
        layout: weight layout of a gemm, ``"in_out"`` or ``"out_in"``.
        strides, pads, dilations: Conv attributes (ONNX order; None = defaults).
            ``pads`` is ``[x1_begin, x2_begin, ..., x1_end, x2_end]``.
        auto_pad: ``NOTSET``, ``VALID``, ``SAME_UPPER`` or ``SAME_LOWER``.
        group: Conv groups; only 1 is supported. A depthwise consumer needs no recovery: its
            input channels are its output channels, so the prune pass removes them in the
            producer's channel group and nothing downstream of them survives to compensate.
    """

    kind: Literal["gemm", "conv"]
    layout: Layout = "in_out"
    strides: tuple[int, ...] | None = None
    pads: tuple[int, ...] | None = None
    dilations: tuple[int, ...] | None = None
    auto_pad: str = "NOTSET"
    group: int = 1

    @classmethod
    def from_onnx(cls, op_type: str, attrs: Mapping[str, Any]) -> LayerSpec:
        """The spec of an ONNX ``Gemm``, ``MatMul`` or ``Conv`` from its attributes.

        Args:
            op_type: the node's op type.
            attrs: attribute name -> value (raw values or objects with a ``.value``,
                such as ``node.attrs`` of the IR).

        Raises:
            ValueError: another op type, Gemm with ``transA`` or ``alpha``/``beta`` != 1
                (fold them into the weight and bias first), or Conv with ``group`` != 1.
        """
        a = {k: getattr(v, "value", v) for k, v in attrs.items()}
        if op_type == "MatMul":
            return cls("gemm")
        if op_type == "Gemm":
            if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                raise ValueError("recovery needs Gemm with transA=0 and alpha=beta=1")
            return cls("gemm", "out_in" if a.get("transB", 0) else "in_out")
        if op_type != "Conv":
            raise ValueError(f"recovery supports Gemm, MatMul and Conv consumers, not {op_type}")
        pad = a.get("auto_pad", "NOTSET")
        spec = cls("conv", strides=_tuple(a.get("strides")), pads=_tuple(a.get("pads")),
                   dilations=_tuple(a.get("dilations")), group=int(a.get("group", 1)),
                   auto_pad=pad.decode() if isinstance(pad, bytes) else str(pad))
        spec.check()
        return spec

    def check(self) -> None:
        """Raise ValueError if the spec is outside what this module supports."""
        if self.kind == "conv" and self.layout != "in_out":
            raise ValueError("a Conv weight is [out, in, *kernel]: leave layout='in_out'")
        if self.kind == "conv" and self.group != 1:
            raise ValueError(f"recovery supports Conv with group=1 only, not group={self.group} "
                             "(a depthwise consumer is pruned with its producer's group)")
        if self.auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
            raise ValueError(f"unknown auto_pad {self.auto_pad!r}")

    def conv_geometry(self, spatial: Sequence[int], kernel: Sequence[int]
                      ) -> tuple[list[int], list[int], list[int], list[int]]:
        """``(strides, dilations, pads_begin, pads_end)`` for an input of size ``spatial``."""
        d = len(kernel)
        strides = list(self.strides or [1] * d)
        dil = list(self.dilations or [1] * d)
        pads = list(self.pads or [0] * (2 * d))
        begin, end = pads[:d], pads[d:]
        if self.auto_pad.startswith("SAME"):
            for i in range(d):
                out = -(-spatial[i] // strides[i])
                total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - spatial[i])
                small, big = total // 2, total - total // 2
                begin[i], end[i] = (small, big) if self.auto_pad == "SAME_UPPER" else (big, small)
        elif self.auto_pad == "VALID":
            begin, end = [0] * d, [0] * d
        return strides, dil, begin, end


def _tuple(v: Any) -> tuple[int, ...] | None:
    return None if v is None else tuple(int(i) for i in v)


# -- im2col ------------------------------------------------------------------------------------
def _patch_view(x: np.ndarray, kernel: Sequence[int], spec: LayerSpec) -> np.ndarray:
    """A read-only strided view ``[N, C, *out, *kernel]`` of the zero-padded input."""
    d = len(kernel)
    strides, dil, begin, end = spec.conv_geometry(x.shape[2:], kernel)
    if any(begin) or any(end):
        x = np.pad(x, [(0, 0), (0, 0), *zip(begin, end, strict=True)])
    out = [(x.shape[2 + i] - (kernel[i] - 1) * dil[i] - 1) // strides[i] + 1 for i in range(d)]
    if min(out, default=1) < 1:
        raise ValueError(f"Conv input {x.shape[2:]} (padded) is smaller than the kernel")
    s = x.strides
    view_strides = (s[0], s[1], *(s[2 + i] * strides[i] for i in range(d)),
                    *(s[2 + i] * dil[i] for i in range(d)))
    return np.lib.stride_tricks.as_strided(x, (*x.shape[:2], *out, *kernel), view_strides,
                                           writeable=False)


def _gather_patches(view: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Rows ``[len(rows), C * prod(kernel)]`` of the im2col matrix (flat (n, *out) indices)."""
    d = (view.ndim - 2) // 2
    idx = np.unravel_index(rows, (view.shape[0], *view.shape[2:2 + d]))
    # Advanced indices split by a slice: numpy puts the row axis first -> [rows, C, *kernel].
    patches = view[(idx[0], slice(None), *idx[1:])]
    return patches.reshape(len(rows), view.shape[1] * math.prod(view.shape[2 + d:]))


def im2col(x: np.ndarray, kernel_shape: Sequence[int], spec: LayerSpec) -> np.ndarray:
    """The im2col matrix of a Conv input ``x`` ``[N, C, *spatial]`` (group 1).

    Returns:
        ``[N * prod(out), C * prod(kernel)]``, rows ordered ``(n, *out)``, columns
        ``(c, *kernel)``: ``im2col(x) @ W.reshape(M, -1).T`` is the Conv output, channels last.
    """
    view = _patch_view(np.asarray(x), kernel_shape, spec)
    d = len(kernel_shape)
    # Move C after the output positions; the one copy happens in reshape.
    order = (0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d))
    rows = view.shape[0] * math.prod(view.shape[2:2 + d])
    return view.transpose(order).reshape(rows, -1)


def layer_output(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, spec: LayerSpec,
                 batch: int = 8) -> Iterable[np.ndarray]:
    """The consumer's output on ``x``, ``batch`` samples at a time (float64).

    Conv outputs are ``[n, out, *out_spatial]``, gemm outputs ``[..., out]``.
    """
    spec.check()
    w = np.asarray(weight, np.float64)
    if spec.kind == "gemm":
        w2 = w if spec.layout == "in_out" else w.T
    else:
        w2 = w.reshape(w.shape[0], -1).T
    b = 0.0 if bias is None else np.asarray(bias, np.float64).ravel()
    for i in range(0, len(x), batch):
        xb = np.asarray(x[i:i + batch], np.float64)
        if spec.kind == "gemm":
            yield xb @ w2 + b
            continue
        out = _patch_view(xb, w.shape[2:], spec).shape[2:2 + w.ndim - 2]
        y = im2col(xb, w.shape[2:], spec) @ w2 + b
        yield np.moveaxis(y.reshape(len(xb), *out, -1), -1, 1)


def _float_dtype(a: Any) -> np.dtype:
    """``a``'s dtype if floating, else float64."""
    dt = np.asarray(a).dtype
    return dt if np.issubdtype(dt, np.floating) else np.dtype(np.float64)


# -- BatchNormalization ------------------------------------------------------------------------
def reestimate_batchnorm(x_samples: np.ndarray | Iterable[np.ndarray], channel_axis: int = 1
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (biased) variance of a BatchNormalization input.

    These are the ``input_mean``/``input_var`` an inference-mode ONNX BatchNormalization
    should hold to normalize the calibration data exactly (its training mode uses the same
    biased variance). Note this replaces the trained statistics by calibration ones; to
    only undo the shift pruning caused, use :func:`match_batchnorm`.

    Args:
        x_samples: the BN input ``[N, C, ...]``, or an iterable of such batches (merged
            with Chan's parallel update, so the data need not fit in memory at once).
        channel_axis: the channel axis.

    Returns:
        ``(mean, var)``, each ``[C]``, in the samples' float dtype.
    """
    batches = [x_samples] if isinstance(x_samples, np.ndarray) else x_samples
    n, mean, m2, dtype = 0, 0.0, 0.0, None
    for batch in batches:
        x = np.moveaxis(np.asarray(batch), channel_axis, 0)
        dtype = dtype or _float_dtype(x)
        x = x.reshape(x.shape[0], -1).astype(np.float64)
        k = x.shape[1]
        if not k:
            continue
        bm = x.mean(axis=1)
        bm2 = ((x - bm[:, None]) ** 2).sum(axis=1)
        delta = bm - mean
        mean = mean + delta * k / (n + k)
        m2 = m2 + bm2 + delta**2 * n * k / (n + k)
        n += k
    if not n:
        raise ValueError("reestimate_batchnorm needs at least one sample")
    return np.asarray(mean, dtype), np.asarray(m2 / n, dtype)


def match_batchnorm(mean: np.ndarray, var: np.ndarray, epsilon: float,
                    ref: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, np.ndarray]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """BN statistics under which the pruned input gives the unpruned output moments.

    With ``ref = (m_o, v_o)`` the calibration moments of the BN input in the unpruned model
    and ``new = (m_p, v_p)`` in the pruned one (both from :func:`reestimate_batchnorm`), the
    returned ``(mean', var')`` make ``(x_p - mean') / sqrt(var' + eps)`` have per channel the
    mean and variance that ``(x_o - mean) / sqrt(var + eps)`` had. Channels with ``v_o == 0``
    only get their mean shifted; ``var'`` is clipped at 0 (then the variance is not matched).

    Returns:
        ``(mean', var')`` in the dtype of ``mean``.
    """
    mu, s2 = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    (m_o, v_o), (m_p, v_p) = [(np.asarray(a, np.float64), np.asarray(b, np.float64))
                              for a, b in (ref, new)]
    ratio = np.divide(v_p, v_o, out=np.ones_like(v_p), where=v_o > 0)
    new_var = np.maximum((s2 + epsilon) * ratio - epsilon, 0.0)
    new_mean = m_p - (m_o - mu) * np.sqrt((new_var + epsilon) / (s2 + epsilon))
    dt = _float_dtype(mean)
    return new_mean.astype(dt), new_var.astype(dt)
