"""The round engine: the only code that packs, reduces and unpacks buffers. It imports only the core."""
