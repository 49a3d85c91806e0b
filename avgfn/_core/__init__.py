"""The core of avgfn: types, records, tree helpers, checks and errors. It imports nothing else of avgfn."""
