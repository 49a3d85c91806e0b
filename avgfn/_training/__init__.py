"""Composition of averaging with a training step: with_averaging and the inner-state policies."""
