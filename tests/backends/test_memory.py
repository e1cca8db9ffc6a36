"""The static arena planner (``backends/c/memory.py``): exact small plans, the checker, random
interval sets (hypothesis), CNN-shaped schedules from the arena benchmark, determinism."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeopt.backends.c.memory import (
    STRATEGIES,
    Buffer,
    LiveBuffer,
    Peak,
    Plan,
    PlanError,
    align_up,
    greedy_by_size,
    liveness,
    peak,
    plan,
)
from edgeopt.tools.bench.bench_arena import FAMILIES, compare, table

# A -> B -> C: step 0 reads A and writes B, step 1 reads B and writes C (a graph output).
CHAIN = liveness([(["B"], ["A"]), (["C"], ["B"])], {"A": 100, "B": 200, "C": 100}, ["C"])


def _plan_of(offsets: dict[str, int], arena: int, aliases: dict[str, str] | None = None) -> Plan:
    return Plan(offsets, arena, 0, 0, 16, aliases or {})


# --- exact small cases -------------------------------------------------------------------------

def test_liveness_of_a_chain():
    a, b, c = CHAIN
    assert (a, b, c) == (Buffer("A", 100, 0, 0), Buffer("B", 200, 0, 1), Buffer("C", 100, 1, 1))


def test_liveness_inputs_outputs_views_and_unknown_names():
    steps = [(["r"], ["x", "w"]), (["v"], ["r"]), (["y", "unused"], ["v", "x"])]
    bufs = liveness(steps, {"x": 8, "r": 8, "y": 4, "unused": 2}, outputs=["y"],
                    inplace={"y": "r"}, views={"v": "r"})
    # w (a constant) and v (a view of r) get no buffer; v's use at step 2 keeps r alive.
    assert bufs == [Buffer("x", 8, 0, 2), Buffer("r", 8, 0, 2), Buffer("y", 4, 2, 2, "r"),
                    Buffer("unused", 2, 2, 2)]


def test_chain_reuses_the_first_buffer_for_the_third():
    for p in (plan(CHAIN), greedy_by_size(CHAIN)):
        assert (p.arena_size, p.lower_bound, p.naive_size) == (112 + 208, 320, 112 + 208 + 112)
        assert p.offsets["A"] == p.offsets["C"]
        p.check(CHAIN)
    assert greedy_by_size(CHAIN).offsets == {"A": 208, "B": 0, "C": 208}


def test_greedy_by_size_is_tflite_micro_first_fit():
    # Largest first: b1 at 0; b0 meets b1 at step 1 -> 48; b2 meets both -> above both at 80.
    bufs = [Buffer("b0", 32, 0, 1), Buffer("b1", 48, 1, 2), Buffer("b2", 16, 0, 2)]
    p = greedy_by_size(bufs)
    assert p.offsets == {"b0": 48, "b1": 0, "b2": 80}
    assert (p.arena_size, p.lower_bound, p.strategy) == (96, 96, "greedy/size")


def test_best_beats_greedy_by_size_where_largest_first_fragments():
    bufs = [Buffer("A", 80, 4, 5), Buffer("B", 80, 1, 3), Buffer("C", 64, 3, 5),
            Buffer("D", 96, 1, 2)]
    g, p = greedy_by_size(bufs), plan(bufs)
    assert g.offsets == {"A": 0, "B": 96, "C": 176, "D": 0}
    assert (g.arena_size, p.arena_size, p.lower_bound) == (240, 176, 176)
    p.check(bufs)


def test_inplace_alias_shares_the_offset():
    bufs = liveness([(["r"], ["x"]), (["y"], ["r"])], {"x": 100, "r": 100, "y": 100}, ["y"],
                    inplace={"r": "x"})
    p = plan(bufs)
    assert p.aliases == {"r": "x"}
    assert p.offsets["r"] == p.offsets["x"]
    assert (p.arena_size, p.lower_bound, p.naive_size) == (224, 224, 336)


def test_alias_chain_shares_one_offset():
    bufs = [Buffer("a", 64, 0, 1), Buffer("b", 64, 1, 2, "a"), Buffer("c", 48, 2, 3, "b"),
            Buffer("d", 32, 0, 3)]
    p = plan(bufs)
    assert p.aliases == {"b": "a", "c": "b"}
    assert p.offsets["a"] == p.offsets["b"] == p.offsets["c"]
    assert p.arena_size == p.lower_bound == 96


def test_in_place_reuse_is_dropped_when_it_costs_more():
    # B (small, long-lived) pinned at A's offset and F at C's fragment the arena: every
    # strategy with the aliases needs 160 bytes, TFLite Micro's plan without them 144.
    bufs = [Buffer("A", 32, 0, 1), Buffer("B", 11, 1, 3, "A"), Buffer("C", 48, 1, 2),
            Buffer("D", 30, 1, 1, "A"), Buffer("E", 96, 3, 3), Buffer("F", 25, 2, 3, "C")]
    assert greedy_by_size(bufs).aliases == {"B": "A", "F": "C"}
    assert greedy_by_size(bufs).arena_size == 176
    p = plan(bufs)
    assert (p.arena_size, p.lower_bound, p.aliases) == (144, 144, {})
    assert p.strategy == "greedy/size, no in-place"
    assert p.offsets == greedy_by_size([replace(b, inplace_of=None) for b in bufs]).offsets


@pytest.mark.parametrize("bufs", [
    # x is still read after the step that writes r
    [Buffer("x", 64, 0, 1), Buffer("r", 64, 0, 0, "x")],
    # r is larger than x
    [Buffer("x", 64, 0, 0), Buffer("r", 80, 0, 1, "x")],
])
def test_alias_refused_when_not_in_place(bufs):
    p = plan(bufs)
    assert p.aliases == {}
    assert p.offsets["x"] != p.offsets["r"]
    assert p.arena_size == sum(align_up(b.size, 16) for b in bufs)


def test_a_buffer_gives_its_storage_to_one_child():
    bufs = [Buffer("x", 64, 0, 1), Buffer("p", 64, 1, 2, "x"), Buffer("q", 64, 1, 2, "x")]
    p = plan(bufs)
    assert p.aliases == {"p": "x"}
    assert p.arena_size == 128


@pytest.mark.parametrize("order", [(0, 1, 2), (0, 2, 1)])
def test_zero_length_link_does_not_chain(order):
    # m is written and dead at step 1: chaining a <- m <- c would put a and c in the same
    # bytes at step 1, so only one link is honoured, whichever is listed first.
    bufs = [Buffer("a", 32, 0, 1), Buffer("m", 32, 1, 1, "a"), Buffer("c", 32, 1, 2, "m")]
    p = plan([bufs[i] for i in order])
    assert p.aliases == ({"m": "a"} if order == (0, 1, 2) else {"c": "m"})
    assert p.offsets["c"] != p.offsets["a"]


def test_zero_size_buffers_take_no_space():
    bufs = [Buffer("z", 0, 0, 9), Buffer("a", 16, 0, 3), Buffer("b", 16, 2, 5),
            Buffer("e", 0, 4, 4)]
    p = plan(bufs)
    assert (p.offsets["z"], p.offsets["e"], p.arena_size, p.lower_bound) == (0, 0, 32, 32)
    empty = plan([Buffer("z", 0, 0, 0)])
    assert (empty.arena_size, empty.lower_bound, empty.naive_size) == (0, 0, 0)
    assert plan([]).arena_size == 0
    assert peak([Buffer("z", 0, 0, 0)]) == Peak(None, 0)


def test_alignment_rounds_offsets_and_sizes():
    bufs = [Buffer("a", 1, 0, 1), Buffer("b", 65, 1, 2), Buffer("c", 3, 1, 1)]
    p = plan(bufs, alignment=64)
    assert (p.arena_size, p.lower_bound, p.naive_size) == (256, 256, 256)
    assert all(o % 64 == 0 for o in p.offsets.values())
    assert plan(bufs, alignment=1).arena_size == 69


def test_peak_lists_what_is_live():
    pk = peak(CHAIN)
    assert pk == Peak(0, 320, (LiveBuffer("B", 208), LiveBuffer("A", 112)))
    assert pk.describe() == "peak 320 B at step 0: B 208 B, A 112 B"
    assert pk.describe(limit=1) == "peak 320 B at step 0: B 208 B, 1 more"
    inplace = peak([Buffer("x", 100, 0, 1), Buffer("r", 100, 1, 2, "x")])
    assert inplace == Peak(0, 112, (LiveBuffer("x", 112),))
    at_boundary = peak([Buffer("x", 100, 0, 1), Buffer("r", 100, 1, 2, "x"),
                        Buffer("w", 4000, 1, 1)])
    assert at_boundary.live == (LiveBuffer("w", 4000), LiveBuffer("x", 112),
                                LiveBuffer("r", 112, "x"))
    assert at_boundary.total == 4112
    assert at_boundary.describe().endswith("r 112 B (in place of x)")


# --- the checker and input validation ----------------------------------------------------------

def test_check_rejects_overlapping_live_buffers():
    with pytest.raises(PlanError, match=r"^A \[0, 112\) steps 0\.\.0 overlaps B \[96, 304\) "
                                        r"steps 0\.\.1$"):
        _plan_of({"A": 0, "B": 96, "C": 0}, 320).check(CHAIN)
    _plan_of({"A": 0, "B": 112, "C": 0}, 320).check(CHAIN)  # C may reuse A: not live together


@pytest.mark.parametrize(("offsets", "arena", "aliases", "message"), [
    ({"A": 8, "B": 112, "C": 8}, 320, {}, "A at 8 (+112) is misaligned or outside the 320-byte"),
    ({"A": 208, "B": 0, "C": 208}, 304, {}, "A at 208 (+112) is misaligned or outside the 304"),
    ({"A": 208, "B": 0}, 320, {}, "plan and buffers name different tensors"),
    ({"A": 0, "B": 0, "C": 208}, 320, {"B": "A"}, "alias B -> A is not a legal in-place reuse"),
])
def test_check_rejects_bad_plans(offsets, arena, aliases, message):
    with pytest.raises(PlanError, match=re.escape(message)):
        _plan_of(offsets, arena, aliases).check(CHAIN)


@pytest.mark.parametrize(("bufs", "kwargs", "message"), [
    ([Buffer("a", 1, 0, 0), Buffer("a", 1, 0, 0)], {}, "duplicate buffer name 'a'"),
    ([Buffer("a", -1, 0, 0)], {}, r"a: size -1, steps 0\.\.0 are invalid"),
    ([Buffer("a", 1, 3, 2)], {}, r"a: size 1, steps 3\.\.2 are invalid"),
    ([Buffer("a", 1, 0, 0, "b")], {}, "a: in-place target 'b' is not another buffer"),
    ([Buffer("a", 1, 0, 0, "a")], {}, "a: in-place target 'a' is not another buffer"),
    ([], {"alignment": 0}, "alignment must be a positive integer, got 0"),
    ([], {"strategy": "magic"}, "unknown strategy 'magic'; expected best or one of greedy/size"),
])
def test_invalid_input(bufs, kwargs, message):
    with pytest.raises(PlanError, match=message):
        plan(bufs, **kwargs)


# --- properties on random interval sets ------------------------------------------------------

@st.composite
def interval_sets(draw):
    """Up to 24 buffers; some claim in-place reuse of an earlier one (legal or not)."""
    bufs: list[Buffer] = []
    for i in range(draw(st.integers(0, 24))):
        size = draw(st.one_of(st.just(0), st.integers(1, 3000)))
        first = draw(st.integers(0, 20))
        target = None
        if bufs and draw(st.booleans()):
            parent = bufs[draw(st.integers(0, len(bufs) - 1))]
            target = parent.name
            if draw(st.integers(0, 3)):  # mostly legal: starts where the parent dies, fits
                first, size = parent.last, min(size, parent.size)
        bufs.append(Buffer(f"t{i}", size, first, first + draw(st.integers(0, 8)), target))
    return bufs


def _brute_lower_bound(bufs: list[Buffer], aliases: dict[str, str], alignment: int) -> int:
    """Per step: aligned bytes live, a child sharing its parent's bytes counted once."""
    steps = range(min((b.first for b in bufs), default=0), max((b.last for b in bufs),
                                                                default=-1) + 1)
    return max((sum(align_up(b.size, alignment) for b in bufs if b.first <= t <= b.last
                    and not (b.name in aliases and b.first == t)) for t in steps), default=0)


@settings(max_examples=150, deadline=None)
@given(interval_sets(), st.sampled_from([1, 16]))
def test_every_plan_is_valid_and_bounded(bufs, alignment):
    best = plan(bufs, alignment)
    best.check(bufs)
    honoured = plan(bufs, alignment, "greedy/size").aliases
    assert best.aliases in (honoured, {})  # {}: TFLite Micro's plan without reuse was smaller
    by_name = {b.name: b for b in bufs}
    for child, parent in honoured.items():
        assert by_name[child].inplace_of == parent
    for child, parent in best.aliases.items():
        assert best.offsets[child] == best.offsets[parent]
    assert best.lower_bound == _brute_lower_bound(bufs, honoured, alignment)
    assert best.lower_bound == peak(bufs, alignment).total
    assert best.arena_size % alignment == 0
    assert all(o % alignment == 0 for o in best.offsets.values())
    plain = greedy_by_size([replace(b, inplace_of=None) for b in bufs], alignment)
    assert best.arena_size <= plain.arena_size
    for name in STRATEGIES:
        p = plan(bufs, alignment, name)
        p.check(bufs)
        assert best.lower_bound <= best.arena_size <= p.arena_size <= p.naive_size
        assert p.aliases == honoured  # every single strategy honours the same aliases


@settings(max_examples=100, deadline=None)
@given(interval_sets(), st.data())
def test_check_catches_a_moved_buffer(bufs, data):
    p = plan(bufs)
    clashes = [(a, b) for a in bufs for b in bufs if a.name < b.name and a.size and b.size
               and a.first <= b.last and b.first <= a.last
               and p.aliases.get(a.name) != b.name and p.aliases.get(b.name) != a.name]
    if not clashes:
        return
    a, b = data.draw(st.sampled_from(clashes))
    moved = replace(p, offsets={**p.offsets, b.name: p.offsets[a.name]},
                    arena_size=p.arena_size + align_up(b.size, 16),  # the move stays inside
                    aliases={c: q for c, q in p.aliases.items() if b.name not in (c, q)})
    with pytest.raises(PlanError, match="overlaps"):
        moved.check(bufs)


# --- CNN-shaped schedules (the arena benchmark's generators) --------------------------------

SEEDS = range(40)


@pytest.mark.parametrize("family", ["chain", "resnet", "mobilenetv2", "inception", "unet"])
def test_cnn_schedules_reach_the_lower_bound(family):
    # Measured (tools/bench/bench_arena.py --random 200): every seed of these families plans
    # exactly at the lower bound; greedy_by_size is up to 1.43x above it.
    for seed in SEEDS:
        bufs = FAMILIES[family](random.Random(seed))
        row = compare(bufs)
        assert row["best"] <= row["greedy"], (family, seed)
        assert row["best"] == row["lower"], (family, seed, row)


def test_random_dags_stay_within_ten_percent_of_the_lower_bound():
    # Measured over 200 seeds: 190 at the bound, worst 1.078; greedy_by_size worst 1.31.
    rows = [compare(FAMILIES["random-dag"](random.Random(seed))) for seed in SEEDS]
    assert all(r["best"] <= r["greedy"] for r in rows)
    assert max(r["best/lower"] for r in rows) <= 1.10
    assert sum(r["best"] == r["lower"] for r in rows) >= 0.85 * len(rows)
    assert sum(r["best"] < r["greedy"] for r in rows) >= len(rows) // 2


def test_compare_row_and_table():
    row = compare(CHAIN, "chain3")
    assert row == {"case": "chain3", "buffers": 3, "naive": 432, "tflm": 320, "greedy": 320,
                   "best": 320, "lower": 320, "best/lower": 1.0, "greedy/lower": 1.0,
                   "strategy": "greedy/size", "ms": row["ms"]}
    assert table([row]).splitlines()[2].startswith("| chain3 | 3 | 432 | 320 |")


# --- determinism -------------------------------------------------------------------------------

def test_search_is_deterministic():
    bufs = FAMILIES["random-dag"](random.Random(0))
    first = plan(bufs, evaluations=300)
    assert first == plan(bufs, evaluations=300)
    assert first.arena_size < greedy_by_size(bufs).arena_size


_SCRIPT = """
import json, random
from edgeopt.backends.c.memory import plan
from edgeopt.tools.bench.bench_arena import FAMILIES
out = {}
for family, make in FAMILIES.items():
    p = plan(make(random.Random(3)))
    out[family] = [p.offsets, p.arena_size, p.strategy]
print(json.dumps(out, sort_keys=True))
"""


def test_plans_do_not_depend_on_string_hashing():
    runs = [subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
            for seed in ("1", "2")]
    assert runs[0] == runs[1]
    assert set(json.loads(runs[0])) == set(FAMILIES)
