"""The engine: request bodies in, answers out (payload, cache, providers, executor, replies, client)."""
