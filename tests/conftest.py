"""Shared fixtures. The S3 server lives in tests/s3server.py so scripts and benchmarks can reuse it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.s3server import S3Server, start_s3_server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real SeaweedFS S3 server on 127.0.0.1 (free ports, credentials required), killed at the end."""
    server = start_s3_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, uniquely named, empty bucket on `s3_server`."""
    return s3_server.make_bucket()
