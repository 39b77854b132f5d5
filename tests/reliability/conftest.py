"""Shared fixtures of the reliability tests (each module marks itself `reliability`)."""

from __future__ import annotations

import pytest

from tests.reliability.certs import PKI, make_pki


def pytest_configure(config):
    config.addinivalue_line("markers", "reliability: fault, bad-input, overload and security tests")


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))
