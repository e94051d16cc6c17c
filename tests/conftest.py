"""Shared fixtures: real CIFAR-10 (the mini JPEG pack) unpacked once per session; a private registry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import dynas.spaces

_SHARED_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
_MINI_PACK = _SHARED_CIFAR / "cifar10_mini_jpegq75_pack.npz"


@pytest.fixture(scope="session")
def cifar10_mini(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``cifar-10-batches-py`` folder of the mini pack (100 train + 50 test images per class).

    Unpacked with the pack's own ``to_batches.py`` into a session temp dir, so the project reads
    the standard layout users have; the shared data itself is never copied into the project.
    """
    script = _SHARED_CIFAR / "to_batches.py"
    if not (_MINI_PACK.is_file() and script.is_file()):
        pytest.skip(f"shared CIFAR-10 mini pack not found at {_MINI_PACK} (needs ../shared/data/ beside the repo)")
    out = tmp_path_factory.mktemp("cifar10_mini")
    subprocess.run([sys.executable, str(script), str(_MINI_PACK), str(out)], check=True, capture_output=True)
    return out / "cifar-10-batches-py"


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict:
    """A private copy of the search-space registry, so a test's registrations do not leak."""
    dynas.spaces.list_spaces()  # discover first: else the discovery lands in the copy and is lost with it
    copy = dict(dynas.spaces._REGISTRY)
    monkeypatch.setattr(dynas.spaces, "_REGISTRY", copy)
    return copy
