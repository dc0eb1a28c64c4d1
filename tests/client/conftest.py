"""The client tests use the server tests' real-server fixtures (a tiny repository, a real engine)."""

from tests.server.conftest import real_engine, real_url, tiny_repo  # noqa: F401
