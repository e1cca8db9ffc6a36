"""Pass infrastructure: registry, options, pipeline grammar, manager, analyses, report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import pytest
from conftest import parse_model
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeopt import ir
from edgeopt.passes import (
    Context,
    OptionError,
    PassError,
    PassManager,
    PassResult,
    Step,
    format_pipeline,
    get_pass,
    parse_pipeline,
    register_pass,
    resolve,
    unregister_pass,
)

MODEL = """<ir_version: 9, opset_import: ["" : 17]>
g (float[1,4] x) => (float[1,4] y) { t = Identity(x)  d = Relu(x)  y = Relu(t) }"""


@dataclass(frozen=True)
class DemoOptions:
    ratio: float = 0.5
    steps: int = 1
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    names: tuple[str, ...] = ()


@pytest.fixture
def temp_passes():
    """Register throwaway passes and remove them afterwards."""
    names = []

    def add(name, **kw):
        names.append(name)
        return register_pass(name, **kw)

    yield add
    for n in names:
        unregister_pass(n)


def test_duplicate_name_is_an_error(temp_passes):
    temp_passes("t.dup")(lambda m, c: PassResult(False))
    with pytest.raises(ValueError, match=r"pass 't\.dup' is already registered"):
        register_pass("t.dup")(lambda m, c: PassResult(False))


def test_bad_names_and_primary_rejected():
    with pytest.raises(ValueError, match="must be lowercase"):
        register_pass("Bad Name")
    with pytest.raises(ValueError, match="primary option 'nope' is not an option"):
        register_pass("t.x", options=DemoOptions, primary="nope")


def test_options_are_coerced_from_type_hints(temp_passes):
    temp_passes("t.opts", options=DemoOptions, primary="ratio")(lambda m, c, o: PassResult(False))
    [(_, opts)] = resolve(parse_pipeline(
        "t.opts:0.25,steps=3,flag=yes,mode=b,names=conv1|conv2"))
    assert opts == DemoOptions(0.25, 3, True, "b", ("conv1", "conv2"))


@pytest.mark.parametrize("spec, message", [
    ("t.opts,nope=1", "pass 't.opts' has no option 'nope'; valid options: ratio, steps, flag, "
                      "mode, names"),
    ("t.opts,steps=1.5", "pass 't.opts' option 'steps': '1.5' is not a int"),
    ("t.opts,flag=maybe", "option 'flag': 'maybe' is not a boolean"),
    ("t.opts,mode=c", "option 'mode': 'c' is not one of a, b"),
    ("t.opts:0.1,ratio=0.2", "option 'ratio' is given both"),
    ("t.opts,steps=1,steps=2", "option 'steps' of pass 't.opts' is given twice"),
    ("nosuchpass", "unknown pass 'nosuchpass'; available passes: .*dce"),
    ("sparsify:0.5,pattern=4:2", "pass 'sparsify': .*pattern"),
    ("quant:int4", "pass 'quant' option 'dtype': 'int4' is not one of int8, fp16"),
    ("csr:1.5", "pass 'csr': min_saving must be in \\[0, 1\\), got 1.5"),
    ("dce:1", "pass 'dce' takes no positional value"),
    ("steps=1", "option 'steps=1' comes before any pass"),
    ("dce,,dce", "empty step at position 2"),
    ("", "empty pipeline spec"),
    ("Dce!", "cannot read 'Dce!'"),
])
def test_bad_specs_name_the_problem(temp_passes, spec, message):
    temp_passes("t.opts", options=DemoOptions, primary="ratio")(lambda m, c, o: PassResult(False))
    with pytest.raises(OptionError, match=message):
        resolve(parse_pipeline(spec))


_names = st.from_regex(r"[a-z][a-z0-9_-]{0,6}(\.[a-z][a-z0-9-]{0,5})?", fullmatch=True)
_vals = st.from_regex(r"[A-Za-z0-9_.|-]{1,8}", fullmatch=True)
_keys = st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True)
_steps = st.lists(st.builds(Step, _names, st.one_of(st.none(), _vals),
                            st.dictionaries(_keys, _vals, max_size=3)), min_size=1, max_size=4)


@settings(max_examples=150, deadline=None)
@given(_steps)
def test_parse_format_roundtrip(steps):
    assert parse_pipeline(format_pipeline(steps)) == steps


def test_pipeline_file(tmp_path, temp_passes):
    temp_passes("t.opts", options=DemoOptions, primary="ratio")(lambda m, c, o: PassResult(False))
    f = tmp_path / "p.toml"
    f.write_text('[[pass]]\nname = "t.opts"\nratio = 0.75\nnames = ["a", "b"]\n'
                 '[[pass]]\nname = "dce"\n')
    [(s1, o1), (s2, o2)] = resolve(parse_pipeline(f"@{f}"))
    assert (s1.name, o1.ratio, o1.names, s2.name, o2) == ("t.opts", 0.75, ("a", "b"), "dce", None)
    f.write_text('pipeline = "dce"\n')
    assert [s.name for s, _ in resolve(parse_pipeline(f"@{f}"))] == ["dce"]
    f.write_text("[[pass]\n")
    with pytest.raises(OptionError, match="invalid TOML"):
        parse_pipeline(f"@{f}")
    with pytest.raises(OptionError, match="cannot read pipeline file"):
        parse_pipeline(f"@{tmp_path}/missing.toml")


def test_manager_runs_and_reports():
    model = parse_model(MODEL)
    report = PassManager("dce", verify="each").run(model)
    assert [n.op_type for n in model.graph] == ["Relu"]
    [step] = report.steps
    assert step.stats == {"nodes_removed": 2, "identity_removed": 1, "dropout_removed": 0,
                          "initializers_removed": 0}
    assert (step.before.nodes, step.after.nodes) == (3, 1)
    assert report.modified and report.stat("nodes_removed") == 2
    data = json.loads(report.to_json())
    assert data["steps"][0]["name"] == "dce" and data["after"]["nodes"] == 1
    table = report.table()
    assert "dce" in table and "3->1" in table and "nodes_removed=2" in table
    # idempotent: nothing left to remove
    assert not PassManager("dce").run(model).modified


def test_manager_catches_a_pass_that_lies(temp_passes):
    @temp_passes("t.liar")
    def liar(model, ctx):
        """Changes the model but says it did not."""
        model.graph.nodes[0].set_input(0, model.graph.inputs[0])
        model.graph.add_initializer("junk", ir.ArrayTensor([1.0]))
        return PassResult(modified=False)

    with pytest.raises(PassError, match=r"pass 't\.liar' reported modified=False but changed"):
        PassManager("dce,t.liar").run(parse_model(MODEL))


def test_errors_name_the_pass_and_earlier_ones(temp_passes):
    @temp_passes("t.boom")
    def boom(model, ctx):
        """Fails."""
        raise ir.EdgeoptError("node 'n1' is broken")

    with pytest.raises(PassError, match=r"pass 't.boom' failed after dce: node 'n1' is broken"):
        PassManager("dce,t.boom").run(parse_model(MODEL))

    @temp_passes("t.bug")
    def bug(model, ctx):
        """Crashes."""
        return 1 / 0

    with pytest.raises(PassError, match=r"pass 't.bug' failed \(first pass\): internal error "
                                        "ZeroDivisionError"):
        PassManager("t.bug").run(parse_model(MODEL))

    temp_passes("t.notresult")(lambda m, c: None)
    with pytest.raises(PassError, match="returned NoneType, not a PassResult"):
        PassManager("t.notresult").run(parse_model(MODEL))


def test_verify_each_catches_a_broken_model(temp_passes):
    @temp_passes("t.breaker")
    def breaker(model, ctx):
        """Makes a node read a value defined after it."""
        first, second = model.graph.nodes[:2]
        first.set_input(0, second.outputs[0])
        return PassResult(modified=True)

    with pytest.raises(PassError, match=r"pass 't\.breaker' .*left an invalid "
                                        r"model: .*used before it is defined"):
        PassManager("t.breaker", verify="each").run(parse_model(MODEL))
    with pytest.raises(PassError, match="left an invalid model"):
        PassManager("t.breaker", verify="end").run(parse_model(MODEL))
    PassManager("t.breaker", verify="none").run(parse_model(MODEL))  # the caller's choice


class CountingAnalysis:
    built = 0

    def __init__(self, model, ctx, scale=1):
        CountingAnalysis.built += 1
        self.nodes = len(model.graph) * scale


class OtherAnalysis:
    def __init__(self, model, ctx):
        self.ok = True


def test_analyses_are_cached_and_invalidated(temp_passes):
    seen = []

    @temp_passes("t.reader")
    def reader(model, ctx):
        """Reads the analysis."""
        seen.append(ctx.analysis(CountingAnalysis).nodes)
        ctx.analysis(OtherAnalysis)
        return PassResult(False)

    @temp_passes("t.keeps")
    def keeps(model, ctx):
        """Modifies, preserving OtherAnalysis only."""
        model.graph.add_initializer(f"c{len(model.graph.initializers)}", ir.ArrayTensor([1.0]))
        return PassResult(True, preserved=frozenset({OtherAnalysis}))

    CountingAnalysis.built = 0
    ctx = Context()
    PassManager("t.reader,t.reader", verify="none").run(parse_model(MODEL), ctx)
    assert CountingAnalysis.built == 1
    PassManager("t.reader,t.keeps,t.reader", verify="none").run(parse_model(MODEL), ctx)
    assert CountingAnalysis.built == 3  # a new model, then invalidated by t.keeps
    assert set(ctx.cached()) == {CountingAnalysis, OtherAnalysis}
    m = parse_model(MODEL)
    ctx.bind(m)
    assert ctx.analysis(CountingAnalysis, scale=2) is ctx.analysis(CountingAnalysis, scale=2)
    assert ctx.analysis(CountingAnalysis, scale=2) is not ctx.analysis(CountingAnalysis)


def test_instruments_see_every_pass():
    events = []

    class Recorder:
        def before_pass(self, name, model):
            events.append(("before", name))

        def after_pass(self, name, model, result):
            events.append(("after", name, result.modified))

    PassManager("dce,dce", instruments=[Recorder()]).run(parse_model(MODEL))
    assert events == [("before", "dce"), ("after", "dce", True), ("before", "dce"),
                      ("after", "dce", False)]


def test_get_pass_returns_callable_spec():
    spec = get_pass("dce")
    model = parse_model(MODEL)
    result = spec(model, Context())
    assert result.modified and spec.doc.startswith("Remove unused nodes")


def test_public_optimize_api():
    import edgeopt

    model = parse_model(MODEL)
    report = edgeopt.optimize(model, "dce", copy=True)
    assert report.model is not model and len(model.graph) == 3 and len(report.model.graph) == 1
    report = edgeopt.optimize(model, "dce", verify="each")
    assert report.model is model and len(model.graph) == 1 and report.to_dict()["modified"]


def test_progress_is_reported_per_pass():
    calls = []
    ctx = Context(progress=lambda desc, done, total: calls.append((desc, done, total)))
    PassManager("dce,dce").run(parse_model(MODEL), ctx)
    assert calls == [("pass dce", 0, 2), ("pass dce", 1, 2), ("pipeline", 2, 2)]
