"""Versioned, validated contracts between userpipe's stages (store layout, shard sample, run config)."""
