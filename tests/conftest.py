"""Shared fixtures: where the real data lies, and small helpers for the tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGE_NAS_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data beside the repository (CI lays it there); tests that need it skip without it."""
    folder = SHARED / "data"
    if not folder.is_dir():
        pytest.skip(f"real data folder {folder} is absent; set EDGE_NAS_SHARED to the folder holding data/")
    return folder


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own score cache and cloud state folder, never the user's."""
    monkeypatch.setenv("EDGE_NAS_CACHE", str(tmp_path / "scores.sqlite"))
    monkeypatch.setenv("EDGE_NAS_CLOUD_STATE", str(tmp_path / "cloud-state"))
