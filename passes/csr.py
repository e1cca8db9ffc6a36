"""``csr``: pack sparse layer weights as compressed sparse rows where that saves bytes.

For every Conv, Gemm and 2-D MatMul weight (float, or the integer weight behind a
DequantizeLinear after ``quant``), the pass compares the dense bytes with the bytes of its CSR
packing (values in the weight's dtype + column indices of the smallest unsigned width that
fits + row pointers; :mod:`edgeopt.ir.sparse`) and replaces the weight's tensor with a
:class:`~edgeopt.ir.CSRTensor` when the packing is smaller by at least ``min_saving`` of the
dense bytes. Values do not change: every pass still reads the dense array, backends read the
packing (the ONNX writer's ``sparse_initializers`` option, the C backend's sparse kernels).

Where CSR pays: each kept float32 entry costs 4 bytes of value + 1-4 of index, so a float32
weight needs more than ~20-40% zeros; an int8 weight (1 byte + index) needs more than ~50%.
Run it last: a pass that rewrites a weight replaces the tensor and so drops the packing.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

from edgeopt.ir import Model
from edgeopt.ir.sparse import CSRTensor, csr_nbytes

from ._base import Context, PassResult
from ._registry import register_pass
from ._weights import LayerWeight, layer_weights

__all__ = ["CsrOptions", "csr"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CsrOptions:
    """Options of ``csr``.

    Attributes:
        min_saving: pack a weight only when CSR saves at least this fraction of its dense
            bytes (``csr:0.25``: a quarter). Sparse kernels do more work per stored entry
            than dense ones, so a marginal saving is not worth a slower layer.
        exclude: ``|``-separated fnmatch patterns of node or weight names left dense.
    """

    min_saving: float = 0.1
    exclude: tuple[str, ...] = ()

    def validate(self) -> None:
        """Raise ValueError for out-of-range values."""
        if not 0.0 <= self.min_saving < 1.0:
            raise ValueError(f"min_saving must be in [0, 1), got {self.min_saving}")


def _by_weight(model: Model, opts: CsrOptions) -> dict[int, list[LayerWeight]]:
    """Layer weights grouped by the value holding them (a weight may feed several layers)."""
    groups: dict[int, list[LayerWeight]] = defaultdict(list)
    for lw in layer_weights(model):
        groups[id(lw.value)].append(lw)
    return {k: v for k, v in groups.items() if not any(lw.matches(opts.exclude) for lw in v)}


@register_pass("csr", options=CsrOptions, primary="min_saving", preserves="all")
def csr(model: Model, ctx: Context, opts: CsrOptions) -> PassResult:
    """Pack sparse Conv/Gemm/MatMul weights as CSR where it saves bytes (see the module).

    Stats: ``weights`` (layer weights considered), ``packed`` (CSR after the pass),
    ``dense_bytes`` (their dense size), ``bytes_before`` / ``bytes_after`` (stored bytes of
    the considered weights). The values never change, so every analysis stays valid.
    """
    opts.validate()
    stats = {"weights": 0, "packed": 0, "dense_bytes": 0, "bytes_before": 0, "bytes_after": 0}
    modified = False
    for users in _by_weight(model, opts).values():
        lw = users[0]
        value, tensor = lw.value, lw.value.const_value
        assert tensor is not None
        stored = tensor.stored_nbytes if isinstance(tensor, CSRTensor) else tensor.nbytes
        stats["weights"] += 1
        stats["dense_bytes"] += tensor.nbytes
        stats["bytes_before"] += stored
        if len({u.layout for u in users}) > 1:
            log.info("csr: %s feeds layers that read it in different layouts; left as is",
                     value.name)
            stats["bytes_after"] += stored
            stats["packed"] += isinstance(tensor, CSRTensor)
            continue
        if isinstance(tensor, CSRTensor) and tensor.layout == lw.layout:
            packed = tensor
        else:
            dense = tensor.numpy()
            size = csr_nbytes(dense, lw.layout, tensor.dtype)
            worth = size < tensor.nbytes and size <= (1.0 - opts.min_saving) * tensor.nbytes
            packed = CSRTensor.pack(tensor, lw.layout) if worth else None
            if packed is not None:
                value.const_value = packed
                modified = True
            log.info("csr: %s %s: dense %d bytes, CSR %d bytes%s", lw.node.name or
                     lw.node.op_type, value.name, tensor.nbytes, size,
                     " -> packed" if packed is not None else "")
        stats["packed"] += packed is not None
        stats["bytes_after"] += packed.stored_nbytes if packed is not None else stored
    return PassResult(modified=modified, stats=stats)
