"""Sizes in human units: parsing ('8G', '512M', '1.5T', '4096') and printing (binary units)."""

from __future__ import annotations

import math

from nvpool.proto.errors import UsageError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
PiB = 1024 * TiB

#: the largest size nvpool accepts anywhere (offsets and lengths travel as signed 64-bit values in places)
MAX_SIZE = (1 << 63) - 1

_UNITS = {"K": KiB, "M": MiB, "G": GiB, "T": TiB, "P": PiB}


def parse_size(text: "str | int") -> int:
    """'8G', '512M', '4096', '1.5T', '8GiB' -> bytes (binary units). Refuses what is not a finite,
    non-negative whole number of bytes below 2^63, with a one-line ``UsageError``."""
    if isinstance(text, bool):
        raise UsageError(f"invalid size {text!r}")
    if isinstance(text, int):
        value_int = text
    else:
        t = str(text).strip().upper().removesuffix("IB").removesuffix("B")
        mult = 1
        if t and t[-1] in _UNITS:
            mult = _UNITS[t[-1]]
            t = t[:-1]
        try:
            value = float(t)
        except ValueError:
            raise UsageError(f"invalid size {text!r} (examples: 4096, 512M, 8G)") from None
        if not math.isfinite(value):
            raise UsageError(f"invalid size {text!r}: not a finite number")
        if value < 0:
            raise UsageError(f"invalid size {text!r}: negative")
        if value * mult > MAX_SIZE:
            raise UsageError(f"invalid size {text!r}: larger than {human(MAX_SIZE)}")
        exact = value * mult
        if exact != int(exact):
            raise UsageError(f"invalid size {text!r}: not a whole number of bytes")
        value_int = int(exact)
    if value_int < 0:
        raise UsageError(f"invalid size {text!r}: negative")
    if value_int > MAX_SIZE:
        raise UsageError(f"invalid size {text!r}: larger than {human(MAX_SIZE)}")
    return value_int


def human(n: float) -> str:
    """Bytes in binary units: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
