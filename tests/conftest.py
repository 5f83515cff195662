"""Test-wide settings: offline hub, deterministic CPU threads, a text-embedding cache outside the home."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vitdecomp caches text embeddings on disk by default: never in the real home during tests.
_CACHE_ROOT = tempfile.mkdtemp(prefix="vitdecomp-test-cache-")
os.environ["VITDECOMP_CACHE"] = _CACHE_ROOT
atexit.register(shutil.rmtree, _CACHE_ROOT, True)

import torch  # noqa: E402

# Tiny models run faster on one thread, and the 2-core CI machine stays predictable.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _text_cache(tmp_path_factory, monkeypatch):
    """Each test gets an empty text-embedding cache (VITDECOMP_CACHE), also seen by subprocesses."""
    monkeypatch.setenv("VITDECOMP_CACHE", str(tmp_path_factory.mktemp("vitdecomp-cache")))
