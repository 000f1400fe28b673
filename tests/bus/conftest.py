"""Bus tests use the shared fixtures of tests/conftest.py (workers, recorder, client)."""

from tests.conftest import SpawnWorker

__all__ = ["SpawnWorker"]
