"""The gRPC server: thin adapters over the engine (servicer, engine loop, metrics, start-up)."""
