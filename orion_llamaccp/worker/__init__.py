"""The worker: one profile served on the bus."""

from orion_llamaccp.worker.service import Worker, serve

__all__ = ["Worker", "serve"]
