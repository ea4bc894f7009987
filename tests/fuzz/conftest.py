"""Hypothesis profiles of the fuzz tests.

* ``ci`` (default): a few dozen graphs, derandomized (the same graphs on every run, so CI is reproducible), no
  per-example deadline (quantize takes a second on a loaded machine).
* ``long``: ``HYPOTHESIS_PROFILE=long`` or ``make fuzz``'s pytest leg: 1,000 graphs, random.

``benchmarks/fuzz.py`` runs the long campaign without hypothesis (graph ``k`` is ``graphs.random_spec(k)``) and
counts outcomes instead of stopping at the first failure.
"""
import os

from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               print_blob=False)
settings.register_profile("ci", max_examples=int(os.environ.get("QCAST_FUZZ_EXAMPLES", "30")), derandomize=True,
                          **_common)
settings.register_profile("long", max_examples=1000, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
