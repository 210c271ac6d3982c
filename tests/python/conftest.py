"""pytest configuration shared by the Python tests."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes several seconds (starts real services or waits for HK)")
    config.addinivalue_line("markers", "refenv: needs the reference cgse-core venv and a private network namespace")
    config.addinivalue_line("markers", "timeout(seconds): per-test time limit (pytest-timeout; ignored without it)")
