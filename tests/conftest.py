import os
import sys

# Spawned ranks import the test modules by name: make ``tests`` importable.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

# Property tests draw the same examples on every run (a CI run never fails on a new draw);
# HYPOTHESIS_PROFILE=explore draws fresh ones, for a search.
from hypothesis import settings  # noqa: E402

settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
