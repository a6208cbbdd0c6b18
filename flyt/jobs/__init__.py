"""Pool work done shard by shard: scoring, resharding."""
