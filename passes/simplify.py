"""``simplify``: the canonical clean-up, a fixpoint of constant, BN and affine folding and DCE."""

from __future__ import annotations

from dataclasses import dataclass

from edgeopt.ir import Model

from . import cse as _cse
from . import dce as _dce
from . import fold_affine as _fold_affine
from . import fold_bn as _fold_bn
from . import fold_constants as _fold_constants
from ._base import Context, PassResult
from ._manager import PassManager
from ._registry import register_pass

__all__ = ["SimplifyOptions", "simplify"]


@dataclass(frozen=True)
class SimplifyOptions:
    """Options of ``simplify`` (passed on to the passes it runs).

    Attributes:
        max_bytes: ``fold-constants`` cap on materialized evaluation results.
        max_lazy_bytes: ``fold-constants`` cap on lazy results (``ConstantOfShape``).
        forward: ``fold-bn`` and ``fold-affine`` may fold into the Convs that read a
            BatchNormalization or a Mul/Add chain.
        decompose: ``fold-bn`` turns the BatchNormalizations it cannot fold into Mul + Add.
        affine: run ``fold-affine`` (per-channel Mul/Add/Sub/Div folded into Conv, Gemm and
            MatMul weights, chains merged).
        cse: run ``cse`` (byte-identical constants and duplicate nodes merged).
        max_iterations: bound on the rounds of the fixpoint.
    """

    max_bytes: int = _fold_constants.FoldConstantsOptions.max_bytes
    max_lazy_bytes: int = _fold_constants.FoldConstantsOptions.max_lazy_bytes
    forward: bool = True
    decompose: bool = True
    affine: bool = True
    cse: bool = True
    max_iterations: int = 10

    def validate(self) -> None:
        """Raise ValueError for negative caps or fewer than one iteration."""
        _fold_constants.FoldConstantsOptions(self.max_bytes, self.max_lazy_bytes).validate()
        if self.max_iterations < 1:
            raise ValueError("max_iterations must be >= 1")


#: Counters that describe what is left rather than what was done: ``simplify`` reports the
#: value of the last inner run (summing them over rounds would count the same node again).
_REMAINING = frozenset({"too_large", "eval_failed", "bn_kept"})


@register_pass("simplify", options=SimplifyOptions)
def simplify(model: Model, ctx: Context, opts: SimplifyOptions) -> PassResult:
    """Run fold-constants, fold-bn, fold-affine, cse and dce until none changes the model.

    A nested :class:`PassManager` with ``until_fixed=True`` runs the four passes in rounds
    and stops after a round that changed nothing (or after ``max_iterations`` rounds). Inside
    the fixpoint, ``fold-bn`` only folds; BatchNormalizations that are still left are then
    decomposed into Mul + Add (option ``decompose``) by one last ``fold-bn, fold-affine,
    dce``. Decomposing only at the end matters: a BatchNormalization that becomes foldable in
    a later round (say once ``dce`` has bypassed an Identity between it and its Conv) is
    folded, not decomposed. The last ``fold-affine`` then merges the Mul + Add of a split
    BatchNormalization with the Mul/Add chain around it (or folds it after all), so a
    BatchNormalization followed by a Caffe-style scale costs two nodes, not four.
    ``fold-affine`` is left out with ``affine=false``, ``cse`` with ``cse=false``.

    Stats: the inner passes' counters summed over all rounds, except the ones that describe
    what is left (``too_large``, ``eval_failed``, ``bn_kept``), which come from the last run;
    plus ``rounds``, the number of fixpoint rounds. The inner managers do not verify (the
    outer one does, after this pass) but check that every inner pass reports ``modified``
    truthfully.

    Requires: a topologically sorted graph. Preserves: nothing when it modifies; outputs equal
    up to the float rounding of ``fold-bn`` and ``fold-affine``.
    """
    fold = _fold_constants.FoldConstantsOptions(opts.max_bytes, opts.max_lazy_bytes)
    affine = [(_fold_affine.fold_affine, _fold_affine.FoldAffineOptions(forward=opts.forward))
              ] if opts.affine else []
    cse = [(_cse.cse, _cse.CseOptions(opts.max_bytes))] if opts.cse else []
    steps = [(_fold_constants.fold_constants, fold),
             (_fold_bn.fold_bn, _fold_bn.FoldBnOptions(opts.forward, False)),
             *affine, *cse, (_dce.dce, None)]
    fixpoint = PassManager(steps, verify="none", until_fixed=True,
                           max_iterations=opts.max_iterations)
    reports = [fixpoint.run(model, ctx)]
    rounds = len(reports[0].steps) // len(steps)
    if opts.decompose:
        final = PassManager([(_fold_bn.fold_bn, _fold_bn.FoldBnOptions(opts.forward, True)),
                             *affine, *cse, (_dce.dce, None)], verify="none")
        reports.append(final.run(model, ctx))
    stats: dict[str, int | float] = {"rounds": rounds}
    for step in (s for r in reports for s in r.steps):
        for key, value in step.stats.items():
            stats[key] = value if key in _REMAINING else stats.get(key, 0) + value
    return PassResult(modified=any(r.modified for r in reports), stats=stats)
