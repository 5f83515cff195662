"""The shipped text pools and user pool files (vitdecomp.interpret.text.pools, vitdecomp.interpret.text.make_pools)."""
from __future__ import annotations

import hashlib
import logging
from importlib import resources
from pathlib import Path

import pytest

from vitdecomp.errors import InputError
from vitdecomp.interpret.text import make_pools
from vitdecomp.interpret.text.pools import POOLS, TextPool, feature_sets, list_pools, load_pool, texts_sha256

SHIPPED = Path(str(resources.files("vitdecomp.interpret.text"))) / "pool_files"

# documented size ranges (pools.py docstring / the task): name -> (min, max)
SIZES = {
    "descriptions": (3000, 3000),
    "words": (1500, 3000),
    "feature/colour": (7, 7),
    "feature/texture": (8, 8),
    "feature/animal": (7, 7),
    "feature/person": (7, 7),
    "feature/location": (7, 7),
    "feature/pattern": (6, 6),
    "feature/shape": (5, 5),
    "feature/fabric": (5, 5),
    "waterbirds/spurious": (9, 9),
    "waterbirds/core": (8, 8),
}

# docs/method.md §4 "Default feature sets" and "Waterbirds texts", written out again here on purpose
METHOD_FEATURES = {
    "colour": {"blue", "green", "red", "yellow", "black", "white", "color"},
    "texture": {"rough", "smooth", "furry", "sleek", "slimy", "spiky", "glossy", "texture"},
    "animal": {"camel", "elephant", "giraffe", "cat", "dog", "zebra", "cheetah"},
    "person": {"face", "head", "man", "woman", "human", "arms", "legs"},
    "location": {"sea", "beach", "forest", "desert", "city", "sky", "marsh"},
    "pattern": {"spotted", "striped", "polka dot", "plain", "checkered", "pattern"},
    "shape": {"triangular", "rectangular", "circular", "shape", "octagon"},
    "fabric": {"linen", "velvet", "cotton", "silk", "chiffon"},
}
METHOD_WATERBIRDS = {
    "spurious": {"water", "ocean", "lake", "sky", "land", "forest", "trees", "bamboo", "leaves"},
    "core": {"bird", "finch", "hummingbird", "crow", "sparrow", "swan", "albatross", "pelican"},
}


def test_registry_lists_every_pool() -> None:
    assert set(POOLS) == set(SIZES)
    assert [p.name for p in list_pools()] == list(POOLS)
    for info in list_pools():
        assert info.description and info.version


@pytest.mark.parametrize("name", list(SIZES))
def test_every_pool_loads_clean(name: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="vitdecomp.interpret.text.pools"):
        pool = load_pool(name)
    assert not caplog.records, "a shipped pool must load without warnings"
    info = POOLS[name]
    assert isinstance(pool, TextPool)
    assert (pool.name, pool.version, pool.description) == (name, info.version, info.description)
    lo, hi = SIZES[name]
    assert lo <= len(pool) <= hi
    assert len(pool) == info.size
    assert pool.sha256 == info.sha256 == texts_sha256(pool.texts)
    assert len(set(pool.texts)) == len(pool.texts)
    assert all(t and t == t.strip() and not t.startswith("#") for t in pool.texts)
    assert pool.manifest()["sha256"] == info.sha256


def test_shipped_files_format() -> None:
    assert not (SHIPPED / "__init__.py").exists()
    for info in list_pools():
        raw = (SHIPPED / info.file).read_bytes()
        text = raw.decode("utf-8")
        lines = text.split("\n")
        assert lines[0] == f"# vitdecomp pool {info.name} v{info.version}: {info.description}"
        assert text.endswith("\n") and "\r" not in text
        assert all(line.strip() for line in lines[:-1]), f"{info.file}: blank line"


def test_generator_reproduces_shipped_files(tmp_path: Path) -> None:
    summary = make_pools.write_pools(tmp_path)
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert generated == sorted(p.name for p in SHIPPED.glob("*.txt"))
    assert generated == sorted(info.file for info in list_pools())
    for name in generated:
        assert (tmp_path / name).read_bytes() == (SHIPPED / name).read_bytes(), f"{name} differs from the generator"
    for info in list_pools():
        assert summary[info.file] == (info.size, info.sha256)


def test_generator_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert make_pools.main([str(tmp_path / "out")]) == 0
    assert "descriptions.txt" in capsys.readouterr().out
    assert (tmp_path / "out" / "words.txt").read_bytes() == (SHIPPED / "words.txt").read_bytes()
    assert make_pools.main([]) == 2


def test_descriptions_look_like_descriptions() -> None:
    texts = load_pool("descriptions").texts
    assert all(t[0].islower() and t.startswith(("a ", "an ")) for t in texts)
    assert not any("  " in t or " ," in t or t.endswith((",", " ")) for t in texts)
    assert not any(" a a" in t or " a e" in t or " a o" in t or " an b" in t for t in texts)
    # varied: many distinct heads and templates
    assert len({" ".join(t.split()[:3]) for t in texts}) > 500


def test_sha256_stable_and_sensitive() -> None:
    texts = ["a red apple", "a blue car"]
    assert texts_sha256(texts) == texts_sha256(list(texts))
    assert texts_sha256(texts) == hashlib.sha256(b"a red apple\na blue car").hexdigest()
    assert texts_sha256(texts) == "b8774abdecc41bcc9b33d8d884a623ecf63a48ef654b7c7a9085df74a32565b3"
    assert texts_sha256(["a red apple", "a blue cat"]) != texts_sha256(texts)
    assert texts_sha256(texts[::-1]) != texts_sha256(texts)
    pool = load_pool("feature/shape")
    before = pool.sha256
    pool.texts[0] = pool.texts[0] + "s"
    assert pool.sha256 != before
    assert load_pool("feature/shape").sha256 == before


def test_user_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "mine.txt"
    path.write_text("# my texts\n\na dog\n  a cat  \n# a comment\na dog\n\na bird\na cat\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="vitdecomp.interpret.text.pools"):
        pool = load_pool(path)
    assert pool.texts == ["a dog", "a cat", "a bird"]
    assert pool.name == "mine" and pool.version is None and pool.source == str(path)
    assert any("repeated" in r.getMessage() for r in caplog.records)
    assert load_pool(str(path)).texts == pool.texts  # a path given as a string
    assert pool.sha256 == texts_sha256(["a dog", "a cat", "a bird"])


def test_user_file_with_header(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("# vitdecomp pool extra v3: some texts\nfoo\nbar\n", encoding="utf-8")
    pool = load_pool(path)
    assert (pool.name, pool.version, pool.description, pool.texts) == ("extra", "3", "some texts", ["foo", "bar"])


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="descriptions"):
        load_pool("no-such-pool")
    with pytest.raises(InputError, match="feature/colour"):
        load_pool("feature/color")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(InputError):
        load_pool(empty)
    with pytest.raises(InputError):
        load_pool(tmp_path / "missing.txt")


def test_feature_sets_match_method() -> None:
    sets = feature_sets()
    assert list(sets) == list(METHOD_FEATURES)
    for name, members in METHOD_FEATURES.items():
        assert set(sets[name]) == members
        assert load_pool(f"feature/{name}").texts == sets[name]
    sets["colour"].append("mauve")  # fresh lists: the registry is untouched
    assert "mauve" not in feature_sets()["colour"]
    for name, members in METHOD_WATERBIRDS.items():
        assert set(load_pool(f"waterbirds/{name}").texts) == members
