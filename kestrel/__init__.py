"""kestrel: the PID 1 guest agent of a Volant microVM.

Kept empty on purpose: importing the package must cost nothing on the boot
path. The pure shared pieces are ``cmdline``, ``manifest`` and ``protocol``.
"""

__version__ = "0.1.0"
