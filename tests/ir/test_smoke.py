from conftest import parse_model

import edgeopt
from edgeopt import ir

MODEL = """<ir_version: 9, opset_import: ["" : 17]>
g (float[1,4] x) => (float[1,4] y) { t = Identity(x)  y = Relu(t) }"""


def test_parse_verify_and_roundtrip(tmp_path):
    model = parse_model(MODEL)
    ir.verify(model)
    assert [n.op_type for n in model.graph] == ["Identity", "Relu"]
    path = tmp_path / "m.onnx"
    edgeopt.save(model, path)
    again = edgeopt.load(path)
    assert [n.op_type for n in again.graph] == ["Identity", "Relu"]
    assert again.graph.outputs[0].shape == (1, 4)
