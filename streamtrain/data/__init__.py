"""Data pipeline: shard lists, streaming, per-sample transforms and batch collation."""
