"""``python -m kestrel``: the same entry point as the ``kestrel`` script."""

from kestrel.main import main

main()
