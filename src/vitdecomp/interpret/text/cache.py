"""A content-addressed cache of text embeddings, in memory and optionally on disk.

An entry is keyed by ``sha256(json([FORMAT, encoder.key, templates, texts]))``: the encoder's
identity (model, weights, tokenizer, dtype; :attr:`~vitdecomp.interpret.text.encoders.TextEncoder.key`),
the template strings themselves (not their set name, so editing a set invalidates it) and
the texts in order. On disk each entry is one ``<sha256>.npz`` holding ``embeddings``
(float32 ``[n, d]``) plus the key, templates and texts it was computed from, which are checked
on read. Files are written to a temporary file in the same directory and moved into place
with ``os.replace``, so a reader never sees a partial file, and concurrent writers of the
same entry (same content) are harmless. A file that cannot be read (damaged, foreign) is
logged, recomputed and replaced; a file that cannot be written is logged and skipped.

**On by default.** :func:`default_cache` is the process-wide cache that
:meth:`~vitdecomp.interpret.text.encoders.TextEncoder.encode`,
:func:`~vitdecomp.interpret.text.templates.embed_templates` and
:func:`~vitdecomp.interpret.text.zero_shot.zero_shot_head` use unless given ``cache=None`` (or another
cache), and so every command and the demo. Its directory (:func:`default_cache_dir`) is

* ``$VITDECOMP_CACHE/text`` when the environment variable :data:`CACHE_ENV` is set;
  ``VITDECOMP_CACHE=off`` (or ``0``, ``false``, ``no``, ``none``) turns the cache off;
* else ``$XDG_CACHE_HOME/vitdecomp/text``, or the platform's user cache folder:
  ``~/.cache/vitdecomp/text`` (Linux), ``~/Library/Caches/vitdecomp/text`` (macOS),
  ``%LOCALAPPDATA%\\vitdecomp\\cache\\text`` (Windows).

Each file is a few hundred kB per thousand texts; delete the folder at any time to reclaim it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, Union

from ...errors import InputError

if TYPE_CHECKING:
    import torch

__all__ = ["CACHE_ENV", "CacheChoice", "EmbeddingCache", "cache_key", "default_cache", "default_cache_dir",
           "resolve_cache"]

log = logging.getLogger(__name__)

_FORMAT = "vitdecomp-text-embeddings/1"
#: Environment variable: the folder of vitdecomp's caches (text embeddings go in its ``text/``), or ``off``.
CACHE_ENV = "VITDECOMP_CACHE"
_OFF = frozenset({"off", "0", "false", "no", "none", "disable", "disabled"})

#: A ``cache=`` argument: an :class:`EmbeddingCache`, ``"default"`` (:func:`default_cache`) or None (no cache).
CacheChoice = Union["EmbeddingCache", Literal["default"], None]


class _Keyed(Protocol):
    @property
    def key(self) -> str: ...


def cache_key(encoder_key: str, texts: Sequence[str], templates: Sequence[str]) -> str:
    """The sha256 hex digest naming the embeddings of ``texts`` under ``templates``.

    ``templates`` ``()`` names the texts embedded as they are (:meth:`TextEncoder.encode
    <vitdecomp.interpret.text.encoders.TextEncoder.encode>`), distinct from any template set.
    """
    payload = json.dumps([_FORMAT, encoder_key, list(templates), list(texts)], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """Text embeddings kept in memory and, with a ``directory``, in ``.npz`` files there.

    Args:
        directory: where to keep the files (created if missing); None: memory only.

    Example::

        cache = EmbeddingCache("~/.cache/vitdecomp/text")
        head = zero_shot_head(encoder, classnames, cache=cache)   # computed once, then read
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory).expanduser() if directory is not None else None
        if self.directory is not None:
            if self.directory.exists() and not self.directory.is_dir():
                raise InputError(f"embedding cache directory {self.directory} is a file")
            self.directory.mkdir(parents=True, exist_ok=True)
        self._memory: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        """Entries held in memory."""
        return len(self._memory)

    def clear(self) -> None:
        """Forget the in-memory entries (files on disk are kept)."""
        self._memory.clear()

    def path(self, digest: str) -> Path | None:
        """The file of an entry (None without a directory)."""
        return self.directory / f"{digest}.npz" if self.directory is not None else None

    def get_or_compute(
        self,
        encoder: _Keyed,
        texts: Sequence[str],
        templates: Sequence[str],
        compute: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        """The cached embeddings of ``texts`` under ``templates``, computing them on a miss.

        Looks in memory, then on disk; on a miss calls ``compute()`` (which must return
        ``[len(texts), d]``), stores the float32 CPU result in memory and on disk.

        Args:
            encoder: anything with a ``key`` (a :class:`~vitdecomp.interpret.text.encoders.TextEncoder`).
            texts: the ``n`` texts (names) in order.
            templates: the template strings used (``()``: the texts as they are).
            compute: zero-argument callable producing the embeddings.

        Returns:
            float32 CPU tensor ``[n, d]``, a fresh copy (mutating it leaves the cache intact).
        """
        import torch

        texts = tuple(texts)
        templates = tuple(templates)
        enc_key = encoder.key
        digest = cache_key(enc_key, texts, templates)
        value = self._memory.get(digest)
        if value is None:
            value = self._read(digest, enc_key, texts, templates)
        if value is None:
            value = compute().detach().to("cpu", dtype=torch.float32)
            if value.dim() != 2 or value.shape[0] != len(texts):
                raise InputError(f"compute() returned shape {tuple(value.shape)}; expected [{len(texts)}, d]")
            self._write(digest, enc_key, texts, templates, value)
        self._memory[digest] = value
        return value.clone()

    # ------------------------------------------------------------------------- disk
    def _read(
        self, digest: str, enc_key: str, texts: tuple[str, ...], templates: tuple[str, ...]
    ) -> torch.Tensor | None:
        path = self.path(digest)
        if path is None or not path.is_file():
            return None
        import numpy as np
        import torch

        try:
            with np.load(path, allow_pickle=False) as data:
                same = (
                    str(data["key"]) == enc_key
                    and tuple(data["templates"].tolist()) == templates
                    and tuple(data["texts"].tolist()) == texts
                )
                embeddings = np.asarray(data["embeddings"], dtype=np.float32)
        except Exception as exc:  # noqa: BLE001  (a foreign or damaged file: recompute and replace it)
            log.warning("embedding cache: cannot read %s (%s: %s); recomputing", path, type(exc).__name__, exc)
            return None
        if not same or embeddings.ndim != 2 or embeddings.shape[0] != len(texts):
            log.warning("embedding cache: %s does not hold what its name says; recomputing", path)
            return None
        log.debug("embedding cache: read %s", path.name)
        return torch.from_numpy(embeddings.copy())

    def _write(
        self, digest: str, enc_key: str, texts: tuple[str, ...], templates: tuple[str, ...], value: torch.Tensor
    ) -> None:
        path = self.path(digest)
        if path is None:
            return
        import numpy as np

        try:
            path.parent.mkdir(parents=True, exist_ok=True)  # (it may have been deleted since)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{digest[:16]}.", suffix=".tmp")
        except OSError as exc:  # a read-only or full disk: the run goes on without the file
            log.warning("embedding cache: cannot write in %s (%s); not cached on disk", path.parent, exc)
            return
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    embeddings=value.numpy(),
                    key=np.array(enc_key),
                    templates=np.array(templates, dtype=np.str_),
                    texts=np.array(texts, dtype=np.str_),
                )
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if not isinstance(exc, OSError):
                raise
            log.warning("embedding cache: cannot write %s (%s); not cached on disk", path, exc)
            return
        log.debug("embedding cache: wrote %s", path.name)


# ----------------------------------------------------------------------------- the default cache
_defaults: dict[str, EmbeddingCache] = {}
_defaults_lock = threading.Lock()


def default_cache_dir() -> Path | None:
    """The folder of the default on-disk text-embedding cache, or None when it is turned off.

    ``$VITDECOMP_CACHE/text`` when :data:`CACHE_ENV` is set (None for ``off``, ``0``, ``false``,
    ``no``, ``none``, or an empty value); else ``$XDG_CACHE_HOME/vitdecomp/text``; else the
    platform's user cache folder: ``~/.cache/vitdecomp/text``, ``~/Library/Caches/vitdecomp/text``
    on macOS, ``%LOCALAPPDATA%/vitdecomp/cache/text`` on Windows. Read on every call, so changing
    the variable takes effect at once.
    """
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        if value.strip().lower() in _OFF or not value.strip():
            return None
        return Path(value).expanduser() / "text"
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "vitdecomp" / "text"
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "vitdecomp" / "cache" / "text"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "vitdecomp" / "text"
    return Path.home() / ".cache" / "vitdecomp" / "text"


def default_cache() -> EmbeddingCache | None:
    """The process-wide cache in :func:`default_cache_dir` (None when turned off).

    One :class:`EmbeddingCache` per folder, shared by every caller in the process (so an entry
    read once is then served from memory). A folder that cannot be created is logged once and
    the cache is kept in memory only.
    """
    directory = default_cache_dir()
    if directory is None:
        return None
    name = str(directory)
    with _defaults_lock:
        cache = _defaults.get(name)
        if cache is None:
            try:
                cache = EmbeddingCache(directory)
                log.debug("text embedding cache: %s", directory)
            except (OSError, InputError) as exc:
                log.warning("text embedding cache: cannot use %s (%s); keeping embeddings in memory only "
                            "(set %s to a writable folder, or %s=off)", directory, exc, CACHE_ENV, CACHE_ENV)
                cache = EmbeddingCache()
            _defaults[name] = cache
    return cache


def resolve_cache(cache: CacheChoice) -> EmbeddingCache | None:
    """``cache`` itself, or :func:`default_cache` for ``"default"``.

    Raises:
        InputError: a string other than ``"default"``.
    """
    if isinstance(cache, str):
        if cache != "default":
            raise InputError(f"cache must be an EmbeddingCache, 'default' or None, got {cache!r}")
        return default_cache()
    return cache
