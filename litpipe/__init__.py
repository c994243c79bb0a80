"""litpipe: LiT (locked-image text tuning) as a two-stage pipeline over an embedding cache."""

__version__ = "0.1.0"
