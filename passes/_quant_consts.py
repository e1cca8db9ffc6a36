"""The small constants quantization creates: one initializer per distinct scalar.

Every quantized tensor reads a scale and a zero point. Activations share a handful of zero
points, and many share scales too (the tensors of one sharing class, the outputs of every
Relu6 quantized to ``6/255``), so :class:`Constants` keeps one initializer per distinct
one-element tensor (same type, shape and bytes) instead of one per tensor. Larger tensors
(weights, per-channel scales) are never shared: a later pass may rewrite them in place.

Zero points are named by type and value (``zp_u8_128``), which is short and says what they
hold.
"""

from __future__ import annotations

import numpy as np

from edgeopt.ir import DataType, Graph, Value

from ._util import NameGen, add_constant, as_tensor

__all__ = ["Constants"]

_TAG = {DataType.UINT8: "u8", DataType.INT8: "i8", DataType.UINT16: "u16",
        DataType.INT16: "i16", DataType.INT32: "i32"}


class Constants:
    """Initializers of one graph, with one-element ones shared by value.

    Args:
        graph: the graph the initializers go to.
        names: fresh names (shared with the caller's other new values).
    """

    def __init__(self, graph: Graph, names: NameGen) -> None:
        self.graph, self.names = graph, names
        self._shared: dict[tuple[str, tuple[int, ...], bytes], Value] = {}

    def add(self, base: str, array: np.ndarray) -> Value:
        """An initializer holding ``array``, named after ``base`` unless shared.

        A one-element ``array`` equal to one added before (and still an initializer of the
        graph: a rewrite may have dropped it since) reuses that initializer.
        """
        array = np.asarray(array)
        if array.size != 1:
            return add_constant(self.graph, self.names, base, as_tensor(array))
        key = (array.dtype.str, array.shape, array.tobytes())
        value = self._shared.get(key)
        if value is None or self.graph.initializers.get(value.name) is not value:
            value = add_constant(self.graph, self.names, base, as_tensor(array))
            self._shared[key] = value
        return value

    def zero_point(self, array: np.ndarray) -> Value:
        """A zero point; a scalar one is named ``zp_<type>_<value>`` (``zp_u8_128``)."""
        array = np.asarray(array)
        if array.size != 1:
            return self.add("zp", array)
        tag = _TAG.get(DataType.from_numpy(array.dtype), array.dtype.name)
        return self.add(f"zp_{tag}_{int(array.ravel()[0])}", array)
