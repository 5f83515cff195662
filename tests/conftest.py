"""Test-wide settings: offline hub, deterministic CPU threads."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Tiny models run faster on one thread, and the 2-core CI machine stays predictable.
torch.set_num_threads(1)
