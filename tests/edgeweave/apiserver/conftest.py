"""Fixtures for the apiserver tests: a live server per test module (see
`edgeweave.apiserver.testing.ApiHarness`), stopped in the fixture's `finally`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from edgeweave.apiserver.testing import ApiHarness


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiHarness]:
    harness = ApiHarness(tmp_path_factory.mktemp("apiserver"))
    try:
        yield harness
    finally:
        harness.close()
