"""Shared pytest configuration: hypothesis profiles.

"fast" (the default, used by CI) keeps every property to a few hundred
examples; "long" (HYPOTHESIS_PROFILE=long, used by `make fuzz`) runs at least
100000 examples per property. Fixtures live in the test files that need them.
"""

import os

from hypothesis import HealthCheck, settings

from tests.vsockguard import install

install()  # no AF_VSOCK on this machine, from any test

settings.register_profile("fast", max_examples=200, deadline=None)
settings.register_profile(
    "long",
    max_examples=100_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))
