"""Fixtures for the `ray` tier: one real local Ray cluster per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ray_cluster import LocalRay, local_ray_session


@pytest.fixture(scope="session")
def local_ray() -> Iterator[LocalRay]:
    """A Ray head on 127.0.0.1 with token auth; RAY_ADDRESS and the token are exported."""
    yield from local_ray_session()
