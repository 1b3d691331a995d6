"""Code corpus pipeline, token shards, FIM and the packing loader."""
