"""``infer_shapes`` and ``static_shapes``: what they fill in, what they never touch, and the
exact errors of ``static_shapes``."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import parse_model, run_ort

from edgeopt import ir
from edgeopt.ir import DataType, EdgeoptError

_W = "{" + ",".join(["0.5"] * 108) + "}"

CONV = f"""<ir_version: 10, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,64] y) <float[4,3,3,3] w = {_W}> {{
    c = Conv <pads = [1,1,1,1]> (x, w)
    r = Relu(c)
    p = MaxPool <kernel_shape = [2,2], strides = [2,2]> (r)
    y = Flatten(p)
}}"""

IF_MODEL = """<ir_version: 10, opset_import: ["" : 17]>
g (bool cond, float[N,4] x) => (float[N,4] y) {
    y = If (cond) <
        then_branch = then_g () => (float[N,4] t_out) { t_out = Relu(x) },
        else_branch = else_g () => (float[N,4] e_out) { e1 = Neg(x)
                                                         e_out = Abs(e1) }>
}"""

RESHAPE = """<ir_version: 10, opset_import: ["" : 17]>
g (float[2,3,4] x) => (float[?,?] y) <int64[1] zero = {0}, int64[1] m1 = {-1}> {
    s = Shape(x)
    d0 = Gather <axis = 0> (s, zero)
    t = Concat <axis = 0> (d0, m1)
    y = Reshape(x, t)
}"""


def shapes(model: ir.Model) -> dict[str, Any]:
    """Shape of every node output, subgraphs included."""
    return {v.name: v.shape for n in model.graph.walk() for v in n.outputs}


def value(model: ir.Model, name: str) -> ir.Value:
    return next(v for n in model.graph.walk() for v in n.outputs if v.name == name)


# -- infer_shapes ----------------------------------------------------------------------------
def test_infer_fills_intermediates_and_keeps_symbols() -> None:
    model = parse_model(CONV)
    assert shapes(model) == {"c": None, "r": None, "p": None, "y": ("N", 64)}

    assert ir.infer_shapes(model) == 3

    assert shapes(model) == {"c": ("N", 4, 8, 8), "r": ("N", 4, 8, 8), "p": ("N", 4, 4, 4),
                             "y": ("N", 64)}
    assert {v.dtype for n in model.graph for v in n.outputs} == {DataType.FLOAT}
    assert model.graph.inputs[0].shape == ("N", 3, 8, 8)
    assert ir.infer_shapes(model) == 0  # nothing left to learn
    ir.verify(model)


@pytest.mark.parametrize(("preset", "expected_c"), [
    ((2, 4, 8, 8), (2, 4, 8, 8)),            # a static dim beats inference's symbol
    ((7, 4, 8, 8), (7, 4, 8, 8)),            # ... even one inference would not derive
    (("K", 4, 8, 8), ("K", 4, 8, 8)),        # a symbol is not renamed
    ((None, 4, None, 8), ("N", 4, 8, 8)),    # unknown dims are filled
])
def test_infer_never_weakens_known_dims(preset: tuple, expected_c: tuple) -> None:
    model = parse_model(CONV)
    value(model, "c").shape = preset
    ir.infer_shapes(model)
    assert value(model, "c").shape == expected_c
    assert value(model, "y").shape == ("N", 64)


def test_infer_keeps_a_known_shape_of_another_rank() -> None:
    model = parse_model(CONV)
    value(model, "c").shape = (5,)
    ir.infer_shapes(model)
    assert value(model, "c").shape == (5,)


def test_infer_fills_unknown_rank_and_dtype() -> None:
    model = parse_model(CONV)
    y = model.graph.outputs[0]
    y.shape, y.dtype = None, None
    ir.infer_shapes(model)
    assert (y.dtype, y.shape) == (DataType.FLOAT, ("N", 64))


def test_refine_symbolic_replaces_symbols_only_when_asked() -> None:
    model = parse_model(CONV.replace("N,3,8,8", "1,3,8,8"))
    value(model, "c").shape = ("K", 4, 8, 8)
    ir.infer_shapes(model)
    assert value(model, "c").shape == ("K", 4, 8, 8)
    assert value(model, "r").shape == (1, 4, 8, 8)
    assert value(model, "y").shape == ("N", 64)

    assert ir.infer_shapes(model, refine_symbolic=True) == 2
    assert value(model, "c").shape == (1, 4, 8, 8)
    assert value(model, "y").shape == (1, 64)


def test_infer_handles_subgraphs() -> None:
    model = parse_model(IF_MODEL)
    assert value(model, "e1").shape is None

    ir.infer_shapes(model)

    assert value(model, "e1").shape == ("N", 4)
    assert value(model, "e1").dtype == DataType.FLOAT
    assert shapes(model) == {"y": ("N", 4), "t_out": ("N", 4), "e1": ("N", 4),
                             "e_out": ("N", 4)}
    ir.verify(model)


def test_infer_propagates_shape_arithmetic() -> None:
    model = parse_model(RESHAPE)
    assert ir.infer_shapes(model) == 4
    assert shapes(model) == {"s": (3,), "d0": (1,), "t": (2,), "y": (2, 12)}


def test_infer_without_data_propagation_leaves_reshape_dynamic() -> None:
    model = parse_model(RESHAPE)
    ir.infer_shapes(model, data_prop=False)
    y = value(model, "y").shape
    assert len(y) == 2 and not ir.shape_is_static(y)


def test_infer_never_reads_large_weights() -> None:
    """Large weights go to ONNX inference as external-data placeholders, unread."""
    model = parse_model(CONV.replace("float[N,64] y", "float[N,?] y"))
    w = model.graph.initializers["w"]

    def unreadable() -> np.ndarray:
        raise AssertionError("infer_shapes read the weight's data")

    w.const_value = ir.LazyTensor(unreadable, DataType.FLOAT, (64, 3, 3, 3))  # 6912 bytes
    ir.infer_shapes(model)
    assert value(model, "c").shape == ("N", 64, 8, 8)
    assert value(model, "y").shape == ("N", 1024)


# -- static_shapes ---------------------------------------------------------------------------
SYMBOLIC = """<ir_version: 10, opset_import: ["" : 17]>
g (float[N,3,H,W] x, float[N,C] v) => (float[N,3,H,W] y, float[N,C] z, float[A,B] q) {
    y = Relu(x)
    z = Neg(v)
    q = Flatten(y)
}"""


def test_static_shapes_binds_symbols_everywhere() -> None:
    model = parse_model(SYMBOLIC)
    bindings = ir.static_shapes(model, {"x": (1, 3, 8, 8), "v": (1, 5)})
    assert bindings == {"N": 1, "H": 8, "W": 8, "C": 5}
    g = model.graph
    assert [v.shape for v in g.inputs] == [(1, 3, 8, 8), (1, 5)]
    assert [v.shape for v in g.outputs] == [(1, 3, 8, 8), (1, 5), (1, 192)]
    ir.verify(model)
    proto = ir.to_proto(model)
    feeds = {"x": np.ones((1, 3, 8, 8), np.float32), "v": np.ones((1, 5), np.float32)}
    assert [o.shape for o in run_ort(proto, feeds)] == [(1, 3, 8, 8), (1, 5), (1, 192)]


def test_static_shapes_binds_inside_subgraphs() -> None:
    model = parse_model(IF_MODEL)
    assert ir.static_shapes(model, {"x": (2, 4)}) == {"N": 2}
    assert set(shapes(model).values()) == {(2, 4)}


def test_static_shapes_partial_input_list() -> None:
    """Inputs not named keep their shapes, except for symbols the named ones bind."""
    model = parse_model(SYMBOLIC)
    assert ir.static_shapes(model, {"x": (2, 3, 4, 4)}) == {"N": 2, "H": 4, "W": 4}
    assert model.graph.inputs[1].shape == (2, "C")
    assert model.graph.outputs[1].shape == (2, "C")


@pytest.mark.parametrize(("feeds", "message"), [
    ({"nope": (1, 3, 8, 8)}, "no graph input named 'nope'; inputs are 'x', 'v'"),
    ({"x": (1, 3, 8)}, r"input 'x' has rank 4, got shape \[1, 3, 8\]"),
    ({"x": (1, 4, 8, 8)}, "input 'x' dim 1 is fixed at 3, got 4"),
    ({"x": (1, 3, 8, 8), "v": (2, 5)}, "symbolic dim 'N' bound to both 1 and 2"),
    ({"x": (1, 3, -1, 8)}, r"input 'x': dims must be non-negative, got \[1, 3, -1, 8\]"),
])
def test_static_shapes_errors(feeds: dict, message: str) -> None:
    model = parse_model(SYMBOLIC)
    before = shapes(model), [v.shape for v in model.graph.inputs]
    with pytest.raises(EdgeoptError, match=f"^{message}$"):
        ir.static_shapes(model, feeds)
    assert (shapes(model), [v.shape for v in model.graph.inputs]) == before  # untouched


def test_static_shapes_one_symbol_twice_in_one_input() -> None:
    model = parse_model("""<ir_version: 10, opset_import: ["" : 17]>
        g (float[S,S] x) => (float[S,S] y) { y = Relu(x) }""")
    with pytest.raises(EdgeoptError, match=r"^symbolic dim 'S' bound to both 2 and 3$"):
        ir.static_shapes(model, {"x": (2, 3)})
    assert ir.static_shapes(model, {"x": (3, 3)}) == {"S": 3}
    assert model.graph.outputs[0].shape == (3, 3)


def test_static_shapes_refuses_initializer_inputs() -> None:
    model = parse_model("""<ir_version: 10, opset_import: ["" : 17]>
        g (float[N] x, float[N] s) => (float[N] y) <float[3] s = {1.0, 2.0, 3.0}> {
            y = Mul(x, s) }""")
    with pytest.raises(EdgeoptError, match=r"^no graph input named 's'; inputs are 'x'$"):
        ir.static_shapes(model, {"s": (3,)})


def test_static_shapes_unknown_rank_input_takes_the_shape() -> None:
    model = parse_model(SYMBOLIC)
    model.graph.inputs[1].shape = None
    assert ir.static_shapes(model, {"v": (4, 6)}) == {}
    assert model.graph.inputs[1].shape == (4, 6)
    assert model.graph.outputs[1].shape == (4, 6)  # refined from inference: z = Neg(v)
