"""The averaging algorithms, one per module. They import the core and the round engine."""
