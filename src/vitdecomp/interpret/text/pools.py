"""Text pools: the shipped, versioned text sets and user-supplied text files.

A *text pool* is an ordered list of distinct short texts. TextSpan (docs/method.md §5) picks texts from a
pool, and the feature scores (docs/method.md §4) embed small feature sets. The package ships these pools
(plain UTF-8 files under ``vitdecomp/text/pool_files/``, written by :mod:`vitdecomp.interpret.text.make_pools`,
which is their source of truth):

=====================  ======================================================================
name                   contents
=====================  ======================================================================
``descriptions``       3000 short image descriptions, built compositionally from this
                       package's own vocabularies ("a close-up photo of a rusty metal gate")
``words``              1607 common concrete English nouns and adjectives, in 36 categories
``feature/colour``     docs/method.md §4 default feature sets, one pool each (``feature/texture``,
                       ``feature/animal``, ``feature/person``, ``feature/location``,
                       ``feature/pattern``, ``feature/shape``, ``feature/fabric``)
``waterbirds/...``     docs/method.md §4 Waterbirds texts: ``waterbirds/spurious``, ``waterbirds/core``
=====================  ======================================================================

Every shipped pool has a version and the sha256 of its texts (:func:`texts_sha256`) pinned in
:data:`POOLS`, so a run manifest that records ``name``, ``version`` and ``sha256`` identifies the
exact texts. A change to a pool's texts must bump its version.

A pool file holds one text per line. Blank lines and lines starting with ``#`` are skipped
(shipped files start with the header ``# vitdecomp pool NAME vVERSION: description``), and
repeated texts are dropped, keeping the first, with a logged warning.

Example::

    from vitdecomp.interpret.text.pools import feature_sets, list_pools, load_pool

    pool = load_pool("descriptions")          # TextPool(name, version, texts, description, sha256)
    mine = load_pool("my_texts.txt")          # a user file, one text per line
    sets = feature_sets()                     # {"colour": ["blue", ...], ...}
"""
from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ...errors import InputError

__all__ = [
    "FEATURE_SETS",
    "WATERBIRDS_TEXTS",
    "POOLS",
    "PoolInfo",
    "TextPool",
    "feature_sets",
    "list_pools",
    "load_pool",
    "parse_pool_text",
    "pool_header",
    "texts_sha256",
]

log = logging.getLogger(__name__)

# docs/method.md §4, "Default feature sets" [paper App. B]: the method's definition, in the order of docs/method.md.
# Keys are the pool names without the "feature/" prefix.
FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "colour": ("blue", "green", "red", "yellow", "black", "white", "color"),
    "texture": ("rough", "smooth", "furry", "sleek", "slimy", "spiky", "glossy", "texture"),
    "animal": ("camel", "elephant", "giraffe", "cat", "dog", "zebra", "cheetah"),
    "person": ("face", "head", "man", "woman", "human", "arms", "legs"),
    "location": ("sea", "beach", "forest", "desert", "city", "sky", "marsh"),
    "pattern": ("spotted", "striped", "polka dot", "plain", "checkered", "pattern"),
    "shape": ("triangular", "rectangular", "circular", "shape", "octagon"),
    "fabric": ("linen", "velvet", "cotton", "silk", "chiffon"),
}

# docs/method.md §4, "Waterbirds texts" [code].
WATERBIRDS_TEXTS: dict[str, tuple[str, ...]] = {
    "spurious": ("water", "ocean", "lake", "sky", "land", "forest", "trees", "bamboo", "leaves"),
    "core": ("bird", "finch", "hummingbird", "crow", "sparrow", "swan", "albatross", "pelican"),
}

_HEADER = re.compile(r"^#\s*vitdecomp pool (?P<name>\S+) v(?P<version>\S+?):\s*(?P<description>.*)$")


@dataclass(frozen=True)
class PoolInfo:
    """One shipped pool: its registry entry.

    Attributes:
        name: registry name (``"descriptions"``, ``"feature/colour"``).
        version: version string; bumped whenever the texts change.
        description: one line saying what the pool holds.
        file: name of the data file in ``vitdecomp/text/pool_files/`` (``"/"`` in the name becomes ``"-"``).
        size: number of texts in the pool.
        sha256: :func:`texts_sha256` of the texts, pinned for manifests.
    """

    name: str
    version: str
    description: str
    file: str
    size: int
    sha256: str


@dataclass
class TextPool:
    """An ordered list of distinct texts with its provenance.

    Attributes:
        name: registry name, or for a user file the header's name or else the file's stem.
        version: registry version; for a user file the header's version, else None.
        texts: the texts, in file order, without blanks, comments or repeats.
        description: one line saying what the pool holds.
        source: ``"vitdecomp:NAME"`` for a shipped pool, else the file path.
    """

    name: str
    version: str | None
    texts: list[str]
    description: str
    source: str = field(default="")

    @property
    def sha256(self) -> str:
        """sha256 (hex) of the texts joined by ``"\\n"`` (UTF-8): see :func:`texts_sha256`."""
        return texts_sha256(self.texts)

    def manifest(self) -> dict[str, object]:
        """What a run manifest should record to identify these texts."""
        return {
            "name": self.name,
            "version": self.version,
            "size": len(self.texts),
            "sha256": self.sha256,
            "source": self.source,
        }

    def __len__(self) -> int:
        return len(self.texts)

    def __iter__(self) -> Iterator[str]:
        return iter(self.texts)


def texts_sha256(texts: Sequence[str]) -> str:
    """sha256 (hex digest) of ``"\\n".join(texts)`` encoded as UTF-8."""
    return hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()


def pool_header(name: str, version: str, description: str) -> str:
    """The header comment line of a pool file (without the newline)."""
    return f"# vitdecomp pool {name} v{version}: {description}"


def _entry(name: str, version: str, description: str, size: int, sha256: str) -> PoolInfo:
    return PoolInfo(name=name, version=version, description=description, file=name.replace("/", "-") + ".txt", size=size, sha256=sha256)


# The registry. `size` and `sha256` are what `python -m vitdecomp.interpret.text.make_pools` writes for
# this version; tests/unit/test_text_pools.py checks the shipped files against both.
POOLS: dict[str, PoolInfo] = {
    info.name: info
    for info in (
        _entry(
            "descriptions",
            "1",
            "3000 short image descriptions composed from vitdecomp's own vocabularies of objects, "
            "attributes, scenes, lighting, photographic styles and actions",
            3000,
            "94af7f2b9bd4954192e85171afdf7b9938f5cd88ba35cf3c5debf624b949a5aa",
        ),
        _entry(
            "words",
            "1",
            "1607 common concrete English nouns and adjectives in 36 categories "
            "(animals, plants, food, objects, places, people, colours, materials, textures, ...)",
            1607,
            "5ce2832bb4ef4fcd608ee5a90f361b964d57d74b45e86fa3ccc4ac8bc4b1b143",
        ),
        _entry("feature/colour", "1", "docs/method.md §4 default feature set: colour", 7, texts_sha256(FEATURE_SETS["colour"])),
        _entry(
            "feature/texture", "1", "docs/method.md §4 default feature set: texture", 8, texts_sha256(FEATURE_SETS["texture"])
        ),
        _entry("feature/animal", "1", "docs/method.md §4 default feature set: animal", 7, texts_sha256(FEATURE_SETS["animal"])),
        _entry("feature/person", "1", "docs/method.md §4 default feature set: person", 7, texts_sha256(FEATURE_SETS["person"])),
        _entry(
            "feature/location",
            "1",
            "docs/method.md §4 default feature set: location",
            7,
            texts_sha256(FEATURE_SETS["location"]),
        ),
        _entry(
            "feature/pattern", "1", "docs/method.md §4 default feature set: pattern", 6, texts_sha256(FEATURE_SETS["pattern"])
        ),
        _entry("feature/shape", "1", "docs/method.md §4 default feature set: shape", 5, texts_sha256(FEATURE_SETS["shape"])),
        _entry("feature/fabric", "1", "docs/method.md §4 default feature set: fabric", 5, texts_sha256(FEATURE_SETS["fabric"])),
        _entry(
            "waterbirds/spurious",
            "1",
            "docs/method.md §4 Waterbirds spurious (background) texts",
            9,
            texts_sha256(WATERBIRDS_TEXTS["spurious"]),
        ),
        _entry(
            "waterbirds/core",
            "1",
            "docs/method.md §4 Waterbirds core (bird) texts",
            8,
            texts_sha256(WATERBIRDS_TEXTS["core"]),
        ),
    )
}


def list_pools() -> list[PoolInfo]:
    """The shipped pools, in registry order."""
    return list(POOLS.values())


def feature_sets() -> dict[str, list[str]]:
    """The eight docs/method.md §4 default feature sets, ``{"colour": [...], "texture": [...], ...}``.

    Keys are the ``feature/`` pool names without the prefix; values are fresh lists.
    """
    return {name: list(texts) for name, texts in FEATURE_SETS.items()}


def parse_pool_text(text: str, *, source: str = "<text>") -> tuple[list[str], dict[str, str] | None]:
    """Texts and header of a pool file's contents.

    Each line is stripped; blank lines and lines starting with ``#`` are skipped; repeated texts
    are dropped keeping the first occurrence, with one logged warning.

    Args:
        text: the file's contents.
        source: name used in the warning.

    Returns:
        ``(texts, header)`` where ``header`` holds ``name``, ``version`` and ``description`` of
        the first comment line when it is a ``# vitdecomp pool NAME vVERSION: description``
        header, else None.
    """
    texts: list[str] = []
    seen: set[str] = set()
    repeats: list[str] = []
    header: dict[str, str] | None = None
    first_comment = True
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            if first_comment:
                first_comment = False
                match = _HEADER.match(line)
                if match is not None:
                    header = {k: v.strip() for k, v in match.groupdict().items()}
            continue
        if line in seen:
            repeats.append(line)
            continue
        seen.add(line)
        texts.append(line)
    if repeats:
        shown = ", ".join(repr(t) for t in repeats[:5]) + (", ..." if len(repeats) > 5 else "")
        log.warning("%s: dropped %d repeated text(s), keeping the first occurrence: %s", source, len(repeats), shown)
    return texts, header


def _available() -> str:
    return ", ".join(POOLS)


def _read_shipped(info: PoolInfo) -> str:
    resource = resources.files(__package__).joinpath("pool_files", info.file)
    try:
        return resource.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InputError(
            f"the data file of pool {info.name!r} ({info.file}) is missing from the installed package; "
            "reinstall vitdecomp or regenerate it with `python -m vitdecomp.interpret.text.make_pools "
            "src/vitdecomp/text/pool_files`"
        ) from exc


def _load_file(path: Path) -> TextPool:
    if not path.is_file():
        raise InputError(f"text pool file {str(path)!r} does not exist; known pools: {_available()}")
    try:
        content = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"text pool file {str(path)!r} is not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise InputError(f"cannot read text pool file {str(path)!r}: {exc}") from exc
    texts, header = parse_pool_text(content, source=str(path))
    if not texts:
        raise InputError(f"text pool file {str(path)!r} holds no texts (only blank lines or # comments)")
    if header is not None:
        return TextPool(header["name"], header["version"], texts, header["description"], str(path))
    return TextPool(path.stem, None, texts, f"texts from {path}", str(path))


def load_pool(name_or_path: str | Path) -> TextPool:
    """Load a shipped pool by name, or a user text file by path.

    A string that names a pool of :data:`POOLS` loads that pool; any other string, and any
    :class:`~pathlib.Path`, is read as a file (one text per line; blank lines and ``#`` comment
    lines skipped; repeats dropped keeping the first, with a logged warning). A user file whose
    first comment is a ``# vitdecomp pool NAME vVERSION: description`` header takes its name,
    version and description from it; otherwise the name is the file's stem and the version None.

    Raises:
        InputError: an unknown name (the message lists the shipped pools), a missing or
            unreadable file, or a file without texts.
    """
    if isinstance(name_or_path, str) and name_or_path in POOLS:
        info = POOLS[name_or_path]
        texts, header = parse_pool_text(_read_shipped(info), source=f"vitdecomp pool {info.name}")
        if header is None or header["name"] != info.name or header["version"] != info.version:
            log.warning(
                "pool %r: the data file's header %r does not match registry version %s; "
                "regenerate it with `python -m vitdecomp.interpret.text.make_pools`",
                info.name,
                header,
                info.version,
            )
        return TextPool(info.name, info.version, texts, info.description, f"vitdecomp:{info.name}")
    if isinstance(name_or_path, Path):
        return _load_file(name_or_path)
    if not isinstance(name_or_path, str):
        raise InputError(f"load_pool takes a pool name or a path, got {type(name_or_path).__name__}")
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return _load_file(path)
    raise InputError(f"unknown text pool {name_or_path!r} (not a shipped pool, and no such file); known pools: {_available()}")
