"""Analyses shared by several passes, requested with ``ctx.analysis(cls, **params)``.

Each analysis is a class built as ``cls(model, ctx, **params)``; the pass manager caches it
per (class, params) until a pass modifies the model without preserving it. Parameters must be
hashable (pass tuples, not lists).
"""

from __future__ import annotations

from .activations import Activations, ValueStats
from .channel_groups import ChannelGroup, ChannelGroups, Member
from .importance import ChannelImportance, register_criterion

__all__ = ["Activations", "ChannelGroup", "ChannelGroups", "ChannelImportance", "Member",
           "ValueStats", "register_criterion"]
from . import activity, reconstruction  # noqa: F401  (register ``act`` and ``recon``)
