"""shardify: convert parquet rows into validated WebDataset tar shards."""
