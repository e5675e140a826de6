"""Type checks for values that come from configs, the command line or untrusted files.

Python's bool is an int, so ``True`` passes an ``isinstance(x, int)`` test and would be taken as 1 without a word;
these tests say no to it.
"""

from __future__ import annotations

import numbers
from typing import Any


def is_integer(value: Any) -> bool:
    """An integer (Python's or NumPy's), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A JSON number: an int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
