import os
import sys

# Spawned ranks import the test modules by name: make ``tests`` importable.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
