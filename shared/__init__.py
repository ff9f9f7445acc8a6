"""Contracts both sides speak: PROXY codec, TLS facts, event schema, control protocol."""
