"""``datetime`` inside kestrel's frozen bundle: the C implementation only.

The standard module defines every class in Python, then replaces them all with
``_datetime``'s (always there in Debian's python3.11) and deletes the helpers:
compiling and running that Python costs import time on the guest's vCPU and
leaves ~150 KB on PID 1's heap for nothing. The names are the same ones.
"""

import sys  # noqa: F401  (the standard module leaves it among its names)
from _datetime import (  # type: ignore[import-not-found,no-redef]
    MAXYEAR,
    MINYEAR,
    UTC,
    __doc__,  # noqa: F401
    date,
    datetime,
    datetime_CAPI,  # noqa: F401
    time,
    timedelta,
    timezone,
    tzinfo,
)

__kestrel_stub__ = True
__all__ = ("MAXYEAR", "MINYEAR", "UTC", "date", "datetime", "time", "timedelta", "timezone",
           "tzinfo")
