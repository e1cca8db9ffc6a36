"""Error types shared by every layer of edgeopt.

All errors a user can cause (a bad file, a bad pipeline spec, a model that does not verify)
derive from :class:`EdgeoptError`, so the command line can print them as one line and exit
non-zero without a traceback. Anything else escaping edgeopt is a bug in edgeopt.
"""

from __future__ import annotations

__all__ = ["EdgeoptError", "ModelLoadError", "VerificationError"]


class EdgeoptError(Exception):
    """Base class of every error edgeopt raises on purpose.

    The message is a single line that names the file, node or value at fault.
    """


class ModelLoadError(EdgeoptError):
    """A model file could not be read safely (corrupt, truncated, hostile or missing)."""


class VerificationError(EdgeoptError):
    """The IR violates one of its invariants; the message names the node and value."""
