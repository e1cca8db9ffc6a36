"""The Cortex-M toolchain for tests marked ``mcu``, or a loud skip when it is missing."""

from __future__ import annotations

import warnings

import pytest

from edgeopt.backends.c import mcu


def require_toolchain() -> mcu.Toolchain:
    """The cross toolchain and QEMU; skips (with a warning, which ``-rfEX`` still shows)."""
    found = mcu.toolchain()
    if found is None:
        reason = ("mcu: arm-none-eabi-gcc/qemu-system-arm not installed: "
                  f"{mcu.toolchain_missing_reason()}")
        warnings.warn(reason, stacklevel=2)  # the warnings summary shows it without -rs
        pytest.skip(reason)
    return found
