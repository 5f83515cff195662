"""The text side: encoders, templates, zero-shot heads and the embedding cache, on tiny random models."""
from __future__ import annotations

import json
import string
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")
pytest.importorskip("transformers")

import torch.nn.functional as F  # noqa: E402

import vitdecomp as vd  # noqa: E402
from vitdecomp.errors import InputError, UnsupportedModelError  # noqa: E402
from vitdecomp.core.tiny import build_tiny_clip  # noqa: E402
from vitdecomp.testing import tiny_hf_clip, tiny_hf_siglip, tiny_open_clip, tiny_timm_vit  # noqa: E402
from vitdecomp.interpret.text import (  # noqa: E402
    TEMPLATES,
    EmbeddingCache,
    TextEncoder,
    cache_key,
    embed_templates,
    resolve_templates,
    text_encoder,
    zero_shot_accuracy,
    zero_shot_head,
    zero_shot_logits,
)

TEXTS = ["a red object", "a triangle on water", "a large blue dotted star in the centre on sand", "", "x"]
NAMES = ["red", "blue", "striped", "circle"]
HF_CONTEXT = 16  # tiny HF text towers: max_position_embeddings


def hf_ids(texts: list[str]) -> torch.Tensor:
    """A trivial tokenizer for the tiny HF towers: bos 0, one id per character (2..99), eos/pad 1."""
    rows = []
    for text in texts:
        ids = [0] + [2 + ord(c) % 98 for c in text[: HF_CONTEXT - 2]] + [1]
        rows.append(ids + [1] * (HF_CONTEXT - len(ids)))
    return torch.tensor(rows)


def _counting(encoder: TextEncoder) -> list[int]:
    """Replace ``encoder.encode`` by a wrapper that records how many texts each call got."""
    calls: list[int] = []
    encode = encoder.encode

    def counted(texts, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(texts))
        return encode(texts, **kwargs)

    encoder.encode = counted  # type: ignore[method-assign]
    return calls


@pytest.fixture(scope="module")
def clip_model() -> vd.Model:
    return vd.wrap(build_tiny_clip(0))


@pytest.fixture(scope="module")
def clip_encoder(clip_model: vd.Model) -> TextEncoder:
    return text_encoder(clip_model)


@pytest.fixture(scope="module")
def hf_clip():
    return tiny_hf_clip(0)


@pytest.fixture(scope="module")
def hf_siglip():
    return tiny_hf_siglip(0)


# ----------------------------------------------------------------------------- import
def test_import_does_not_import_torch():
    code = "import sys, vitdecomp.interpret.text; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- encoders
def test_open_clip_encode_matches_encode_text(clip_model, clip_encoder):
    from open_clip.tokenizer import SimpleTokenizer

    clip = clip_model.module
    tokens = SimpleTokenizer(context_length=clip.context_length)(TEXTS)
    with torch.no_grad():
        raw = clip.encode_text(tokens)
    got = clip_encoder.encode(TEXTS)
    assert got.dtype == torch.float32 and got.device.type == "cpu" and not got.requires_grad
    assert got.shape == (len(TEXTS), clip_encoder.dim) == (len(TEXTS), 128)
    torch.testing.assert_close(got, F.normalize(raw, dim=-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(clip_encoder.encode(TEXTS, normalize=False), raw, atol=1e-6, rtol=1e-6)
    # the raw module gives the same encoder as the wrapped one
    torch.testing.assert_close(text_encoder(clip).encode(TEXTS), got, atol=0, rtol=0)


def test_open_clip_tokenizer_and_clip_come_from_extras():
    from open_clip.tokenizer import SimpleTokenizer

    clip = tiny_open_clip(0)  # vocabulary 1000: the stock tokenizer does not fit
    with pytest.raises(InputError, match="tokenizer"):
        text_encoder(clip)
    seen: list[list[str]] = []

    def tok(texts: list[str]) -> torch.Tensor:
        seen.append(texts)
        return SimpleTokenizer(context_length=clip.context_length)(texts) % 1000

    model = vd.Model(clip.visual, name="tiny", weights="pretrained:test", extras={"clip": clip, "tokenizer": tok})
    encoder = text_encoder(model)
    assert encoder.module is clip and encoder.key.startswith("tiny|pretrained:test|tok=")
    with torch.no_grad():
        want = F.normalize(clip.encode_text(tok(["a cat"])), dim=-1)
    torch.testing.assert_close(encoder.encode(["a cat"]), want, atol=1e-6, rtol=0)
    assert seen == [["a cat"], ["a cat"]]  # the encoder called the extras tokenizer


def _hf_reference(module, family: str, ids: torch.Tensor) -> torch.Tensor:
    """Text features computed without get_text_features (which changed return type in transformers 5)."""
    with torch.no_grad():
        pooled = module.text_model(input_ids=ids).pooler_output
        return module.text_projection(pooled) if family == "clip" else pooled


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_hf_encode_matches_text_features(family, hf_clip, hf_siglip):
    module = hf_clip if family == "clip" else hf_siglip
    encoder = text_encoder(module, tokenizer=hf_ids)
    ids = hf_ids(TEXTS)
    want = F.normalize(_hf_reference(module, family, ids), dim=-1)
    got = encoder.encode(TEXTS)
    assert got.shape == (len(TEXTS), encoder.dim) == (len(TEXTS), 32)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    with torch.no_grad():  # and the library's own get_text_features (tensor in 4.x, output object in 5.x)
        out = module.get_text_features(input_ids=ids)
    own = out if isinstance(out, torch.Tensor) else out.pooler_output
    torch.testing.assert_close(got, F.normalize(own, dim=-1), atol=1e-6, rtol=0)


def _write_clip_tokenizer(directory: Path) -> None:
    """A real CLIP BPE tokenizer over a 54-token vocabulary (letters), no merges."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: len(vocab) + i for i, c in enumerate(string.ascii_lowercase)})
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(string.ascii_lowercase)})
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer"}))


def test_hf_tokenizer_from_model_directory(tmp_path, hf_clip, hf_siglip):
    from transformers import AutoTokenizer

    hf_clip.save_pretrained(tmp_path)
    _write_clip_tokenizer(tmp_path)
    model = vd.load(f"hf:{tmp_path}")
    encoder = text_encoder(model)  # AutoTokenizer from the directory the model came from
    texts = ["a red cat", "dog", "a triangle on water"]
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    enc = tok(texts, padding=True, truncation=True, max_length=HF_CONTEXT, return_tensors="pt")
    assert int(enc["attention_mask"].sum()) < enc["attention_mask"].numel()  # padding happened
    assert enc["input_ids"].shape[1] == HF_CONTEXT and int(enc["input_ids"][2, -1]) == 1  # truncated, eos kept
    with torch.no_grad():
        pooled = model.module.text_model(**enc).pooler_output
    want = F.normalize(model.module.text_projection(pooled), dim=-1)
    torch.testing.assert_close(encoder.encode(texts), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(encoder.encode(texts, batch_size=1), want, atol=1e-6, rtol=0)
    assert encoder.key.startswith(f"hf:{tmp_path}|pretrained:hf/")

    # SigLIP with a transformers tokenizer object: padded to max length, ids only (as trained)
    siglip = text_encoder(hf_siglip, tokenizer=tok)
    ids = tok(texts, padding="max_length", truncation=True, max_length=HF_CONTEXT, return_tensors="pt")["input_ids"]
    torch.testing.assert_close(siglip.encode(texts), F.normalize(_hf_reference(hf_siglip, "siglip", ids), dim=-1),
                               atol=1e-6, rtol=0)


def test_hf_without_tokenizer_says_how_to_pass_one(hf_clip):
    with pytest.raises(InputError, match="tokenizer="):
        text_encoder(hf_clip)


@pytest.mark.parametrize("which", ["open_clip", "hf_clip", "hf_siglip"])
def test_batch_size_does_not_change_results(which, clip_encoder, hf_clip, hf_siglip):
    encoder = {
        "open_clip": clip_encoder,
        "hf_clip": text_encoder(hf_clip, tokenizer=hf_ids),
        "hf_siglip": text_encoder(hf_siglip, tokenizer=hf_ids),
    }[which]
    full = encoder.encode(TEXTS, batch_size=256, cache=None)
    for batch_size in (1, 2, 3):
        torch.testing.assert_close(encoder.encode(TEXTS, batch_size=batch_size, cache=None), full, atol=1e-6, rtol=0)


def test_encode_runs_in_eval_mode_and_restores_training_flags(hf_clip):
    encoder = text_encoder(hf_clip, tokenizer=hf_ids)
    expected = encoder.encode(TEXTS)
    seen: list[bool] = []
    hook = hf_clip.text_model.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    try:
        hf_clip.train()
        hf_clip.vision_model.eval()  # a mixed state must come back as it was
        got = encoder.encode(TEXTS, cache=None)  # (not read from the cache: the tower must run)
        assert hf_clip.training and hf_clip.text_model.training and not hf_clip.vision_model.training
    finally:
        hook.remove()
        hf_clip.eval()
    assert seen == [False]
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_empty_and_bad_texts(clip_encoder):
    assert clip_encoder.encode([]).shape == (0, clip_encoder.dim)
    with pytest.raises(InputError, match="one string"):
        clip_encoder.encode("a red object")
    with pytest.raises(InputError, match="strings"):
        clip_encoder.encode(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(InputError, match="batch_size"):
        clip_encoder.encode(["ok"], batch_size=0)


def test_models_without_a_text_tower_raise():
    timm_vit = tiny_timm_vit()
    for model in (timm_vit, vd.wrap(timm_vit)):
        with pytest.raises(UnsupportedModelError, match="CompAlign"):
            text_encoder(model)
    with pytest.raises(UnsupportedModelError, match="no text tower"):
        text_encoder(vd.testing.tiny_hf_clip_vision())


def test_key_identifies_unnamed_weights():
    def tok(texts: list[str]) -> torch.Tensor:
        return torch.arange(len(texts) * 16).reshape(-1, 16) % 1000

    a, a_again, b = (text_encoder(tiny_open_clip(s), tokenizer=tok).key for s in (0, 0, 1))
    assert a == a_again and a != b and "@params:" in a and a.endswith("|float32")
    assert text_encoder(tiny_open_clip(0), tokenizer=tok, key="mine").key == "mine|float32"


# ----------------------------------------------------------------------------- templates
def test_template_sets_are_valid():
    assert TEMPLATES["plain"] == ("{}",)
    assert len(TEMPLATES["photo"]) == 12 and len(set(TEMPLATES["photo"])) == 12
    assert "{}" in TEMPLATES["synth"]
    for templates in TEMPLATES.values():
        assert resolve_templates(templates) == templates
    assert resolve_templates("a drawing of {}") == ("a drawing of {}",)
    with pytest.raises(InputError, match="unknown template set"):
        resolve_templates("photos")
    for bad in (["no placeholder"], ["{} and {}"], ["{name}"], []):
        with pytest.raises(InputError):
            resolve_templates(bad)


def test_template_ensembling_is_normalise_average_renormalise(clip_encoder):
    templates = TEMPLATES["synth"]
    got = embed_templates(clip_encoder, NAMES, "synth")
    manual = []
    for name in NAMES:
        rows = clip_encoder.encode([t.format(name) for t in templates], normalize=False)
        manual.append(F.normalize(F.normalize(rows, dim=-1).mean(dim=0), dim=0))
    torch.testing.assert_close(got, torch.stack(manual), atol=1e-6, rtol=0)
    # one template: the normalised embedding of the filled text
    torch.testing.assert_close(embed_templates(clip_encoder, NAMES), clip_encoder.encode(NAMES), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- zero-shot
def test_zero_shot_head_rows_are_unit(clip_encoder):
    head = zero_shot_head(clip_encoder, NAMES)  # the 12 photo templates
    assert head.shape == (len(NAMES), clip_encoder.dim)
    torch.testing.assert_close(head.norm(dim=-1), torch.ones(len(NAMES)), atol=1e-6, rtol=0)
    with pytest.raises(InputError):
        zero_shot_head(clip_encoder, [])


def test_zero_shot_logits_are_cosines(clip_model, clip_encoder):
    head = zero_shot_head(clip_encoder, NAMES, templates="synth")
    features = clip_model.representation(clip_model.example_input(batch=6))
    features = features * torch.linspace(0.5, 3.0, 6)[:, None]  # norms differ per row
    logits = zero_shot_logits(features, head)
    manual = torch.stack([torch.stack([F.cosine_similarity(f, h, dim=0) for h in head]) for f in features])
    assert logits.shape == (6, len(NAMES))
    torch.testing.assert_close(logits, manual, atol=1e-6, rtol=0)
    assert torch.equal(logits.argmax(dim=-1), manual.argmax(dim=-1))
    with pytest.raises(InputError, match="wide"):
        zero_shot_logits(features[:, :10], head)


def test_zero_shot_accuracy():
    gen = torch.Generator().manual_seed(0)
    features, head = torch.randn(50, 8, generator=gen), torch.randn(5, 8, generator=gen)
    best = (F.normalize(features, dim=-1) @ F.normalize(head, dim=-1).T).argmax(dim=-1)
    assert zero_shot_accuracy(features, head, best) == 1.0
    wrong = (best + 1) % 5
    assert zero_shot_accuracy(features, head, wrong) == 0.0
    half = torch.where(torch.arange(50) % 2 == 0, best, wrong)
    assert zero_shot_accuracy(features, head, half.tolist()) == pytest.approx(0.5)
    assert zero_shot_accuracy(features, head, wrong, k=5) == 1.0
    with pytest.raises(InputError):
        zero_shot_accuracy(features, head, best[:3])
    with pytest.raises(InputError):
        zero_shot_accuracy(features, head, best + 5)


# ----------------------------------------------------------------------------- cache
def test_cache_in_memory_computes_once(clip_encoder):
    encoder = text_encoder(clip_encoder.module)
    calls = _counting(encoder)
    cache = EmbeddingCache()
    first = zero_shot_head(encoder, NAMES, "synth", cache=cache)
    assert calls == [len(NAMES) * len(TEMPLATES["synth"])]
    second = zero_shot_head(encoder, NAMES, "synth", cache=cache)
    assert calls == [len(NAMES) * len(TEMPLATES["synth"])]  # no second encoder call
    assert torch.equal(first, second) and len(cache) == 1
    second.zero_()  # a returned tensor is a copy
    assert torch.equal(embed_templates(encoder, NAMES, "synth", cache=cache), first)
    torch.testing.assert_close(first, embed_templates(encoder, NAMES, "synth"), atol=0, rtol=0)


def test_cache_on_disk_survives_a_new_cache(tmp_path, clip_encoder):
    encoder = text_encoder(clip_encoder.module)
    calls = _counting(encoder)
    first = embed_templates(encoder, NAMES, "synth", cache=EmbeddingCache(tmp_path))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(calls) == 1 and len(files) == 1 and files[0].endswith(".npz")

    again = embed_templates(encoder, NAMES, "synth", cache=EmbeddingCache(tmp_path))
    assert len(calls) == 1 and torch.equal(first, again)

    other = embed_templates(encoder, NAMES, "photo", cache=EmbeddingCache(tmp_path))
    assert len(calls) == 2 and not torch.allclose(other, first)
    assert len(list(tmp_path.glob("*.npz"))) == 2 and not list(tmp_path.glob("*.tmp"))
    key = encoder.key
    assert cache_key(key, NAMES, TEMPLATES["synth"]) != cache_key(key, NAMES, TEMPLATES["photo"])
    assert cache_key(key, NAMES, TEMPLATES["synth"]) != cache_key(key + "x", NAMES, TEMPLATES["synth"])
    assert cache_key(key, NAMES, TEMPLATES["synth"]) != cache_key(key, NAMES[::-1], TEMPLATES["synth"])
    assert files[0] == cache_key(key, NAMES, TEMPLATES["synth"]) + ".npz"


def test_damaged_cache_file_is_recomputed(tmp_path, clip_encoder):
    encoder = text_encoder(clip_encoder.module)
    want = embed_templates(encoder, NAMES, cache=EmbeddingCache(tmp_path))
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(b"not an npz")
    calls = _counting(encoder)
    got = embed_templates(encoder, NAMES, cache=EmbeddingCache(tmp_path))
    assert len(calls) == 1 and torch.equal(got, want)
    assert torch.equal(embed_templates(encoder, NAMES, cache=EmbeddingCache(tmp_path)), want) and len(calls) == 1


# ----------------------------------------------------------------------------- the default, on-disk cache
def _counting_forwards(encoder: TextEncoder) -> list[int]:
    """Count the text-tower forward passes of ``encoder`` (texts per pass)."""
    calls: list[int] = []
    features = encoder._features

    def counted(inputs):  # type: ignore[no-untyped-def]
        ids = inputs["input_ids"] if isinstance(inputs, dict) else inputs
        calls.append(int(ids.shape[0]))
        return features(inputs)

    encoder._features = counted  # type: ignore[method-assign]
    return calls


def test_default_cache_location_env_and_off(monkeypatch, tmp_path):
    from vitdecomp.interpret.text.cache import CACHE_ENV, default_cache, default_cache_dir

    assert CACHE_ENV == "VITDECOMP_CACHE"
    monkeypatch.setenv("VITDECOMP_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine" / "text"
    cache = default_cache()
    assert cache is not None and cache.directory == tmp_path / "mine" / "text" and cache.directory.is_dir()
    assert default_cache() is cache  # one per folder in a process
    for off in ("off", "OFF", "0", "false", "none", ""):
        monkeypatch.setenv("VITDECOMP_CACHE", off)
        assert default_cache_dir() is None and default_cache() is None
    monkeypatch.delenv("VITDECOMP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "vitdecomp" / "text"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if sys.platform.startswith("linux"):
        assert default_cache_dir() == tmp_path / "home" / ".cache" / "vitdecomp" / "text"


def test_second_encode_is_read_from_disk(monkeypatch, tmp_path, clip_encoder):
    from vitdecomp.interpret.text.cache import default_cache

    monkeypatch.setenv("VITDECOMP_CACHE", str(tmp_path))
    encoder = text_encoder(clip_encoder.module)
    forwards = _counting_forwards(encoder)
    first = encoder.encode(TEXTS)
    head = embed_templates(encoder, NAMES, "synth")
    assert sum(forwards) == len(TEXTS) + len(NAMES) * len(TEMPLATES["synth"])
    assert len(list((tmp_path / "text").glob("*.npz"))) == 2
    default_cache().clear()  # as a new process would start: memory empty, files kept
    forwards.clear()
    again = text_encoder(clip_encoder.module)
    forwards = _counting_forwards(again)
    assert torch.equal(again.encode(TEXTS), first) and torch.equal(embed_templates(again, NAMES, "synth"), head)
    assert forwards == []  # no forward pass: both read from disk
    # cache=None and raw features (normalize=False) always run the tower
    assert torch.equal(encoder.encode(TEXTS, cache=None), first)
    again.encode(TEXTS, normalize=False)
    assert forwards == [len(TEXTS)]
    # off: every call runs the tower
    monkeypatch.setenv("VITDECOMP_CACHE", "off")
    forwards.clear()
    again.encode(TEXTS)
    again.encode(TEXTS)
    assert forwards == [len(TEXTS), len(TEXTS)]


def test_different_weights_never_share_an_entry(monkeypatch, tmp_path):
    from vitdecomp.interpret.text.cache import cache_key

    monkeypatch.setenv("VITDECOMP_CACHE", str(tmp_path))

    def tok(texts: list[str]) -> torch.Tensor:
        return torch.arange(len(texts) * 16).reshape(-1, 16) % 1000

    seed0, seed0_again, seed1 = (text_encoder(tiny_open_clip(s), tokenizer=tok) for s in (0, 0, 1))
    assert seed0.key == seed0_again.key != seed1.key  # random weights: a digest of the parameters
    emb0, emb1 = seed0.encode(TEXTS), seed1.encode(TEXTS)
    assert not torch.allclose(emb0, emb1)
    assert len(list((tmp_path / "text").glob("*.npz"))) == 2
    # named weights (a hub tag, a checkpoint's sha256, a shipped model's digest) are part of the key
    keys = set()
    for weights in ("pretrained:open_clip/ViT-B-16/openai", "pretrained:open_clip/ViT-B-16/laion2b_s34b_b88k",
                    "checkpoint:" + "a" * 64, "checkpoint:" + "b" * 64):
        model = vd.wrap(build_tiny_clip(0))
        model.weights = weights
        key = text_encoder(model).key
        assert weights in key
        keys.add(cache_key(key, TEXTS, ()))
    assert len(keys) == 4


def test_concurrent_writers_of_one_entry_are_harmless(tmp_path):
    import threading

    n = 8
    value = torch.randn(len(TEXTS), 16, generator=torch.Generator().manual_seed(0))
    barrier = threading.Barrier(n)
    results: list[torch.Tensor] = []
    errors: list[BaseException] = []

    class Keyed:
        key = "concurrent|float32"

    def compute() -> torch.Tensor:
        barrier.wait()  # every thread misses, then all write the same entry at once
        return value.clone()

    def worker() -> None:
        try:
            results.append(EmbeddingCache(tmp_path).get_or_compute(Keyed(), TEXTS, (), compute))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == n and all(torch.equal(r, value) for r in results)
    assert [p.name for p in tmp_path.iterdir()] == [cache_key(Keyed.key, TEXTS, ()) + ".npz"]  # no temp files left
    read = EmbeddingCache(tmp_path).get_or_compute(Keyed(), TEXTS, (), lambda: pytest.fail("not read from disk"))
    assert torch.equal(read, value)


def test_corrupt_cache_file_is_ignored_and_rewritten_with_a_log_line(monkeypatch, tmp_path, clip_encoder, caplog):
    import numpy as np

    from vitdecomp.interpret.text.cache import default_cache

    monkeypatch.setenv("VITDECOMP_CACHE", str(tmp_path))
    encoder = text_encoder(clip_encoder.module)
    want = encoder.encode(TEXTS)
    (path,) = (tmp_path / "text").glob("*.npz")
    path.write_bytes(b"\x00garbage, not an npz")
    default_cache().clear()
    forwards = _counting_forwards(encoder)
    with caplog.at_level("WARNING", logger="vitdecomp.interpret.text.cache"):
        got = encoder.encode(TEXTS)
    assert torch.equal(got, want) and forwards == [len(TEXTS)]  # recomputed
    assert any(str(path) in r.getMessage() and "recomputing" in r.getMessage() for r in caplog.records)
    with np.load(path) as data:  # and rewritten: a valid entry again
        assert np.array_equal(data["embeddings"], want.numpy())
    default_cache().clear()
    assert torch.equal(encoder.encode(TEXTS), want) and forwards == [len(TEXTS)]


def test_unusable_cache_folder_warns_and_keeps_memory_only(monkeypatch, tmp_path, clip_encoder, caplog):
    from vitdecomp.interpret.text.cache import default_cache

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("VITDECOMP_CACHE", str(blocker))
    with caplog.at_level("WARNING", logger="vitdecomp.interpret.text.cache"):
        cache = default_cache()
        got = text_encoder(clip_encoder.module).encode(TEXTS)
    assert cache is not None and cache.directory is None and len(cache) == 1
    assert got.shape == (len(TEXTS), 128) and "memory only" in caplog.text


def test_progress_bar_is_delayed_and_off_when_quiet():
    import logging

    from vitdecomp.interpret.text.encoders import _progress

    with _progress(10, "x") as bar:
        assert bar.delay == 2.0 and not bar.disable
    logger = logging.getLogger("vitdecomp")
    level = logger.level
    logger.setLevel(logging.ERROR)  # what -q does
    try:
        with _progress(10, "x") as bar:
            assert bar.disable
    finally:
        logger.setLevel(level)


def test_published_template_sets_and_template_files(tmp_path):
    import open_clip.zero_shot_metadata as meta

    from vitdecomp.errors import InputError
    from vitdecomp.interpret.text.templates import resolve_templates

    eighty = resolve_templates("imagenet80")
    assert len(eighty) == 80 and len(set(eighty)) == 80
    assert [t.format("dog") for t in eighty] == [f("dog") for f in meta.OPENAI_IMAGENET_TEMPLATES]
    assert len(resolve_templates("imagenet7")) == 7
    path = tmp_path / "mine.txt"
    path.write_text("# my prompts\na photo of a {}.\n\nan image of {}\n", encoding="utf-8")
    assert resolve_templates(str(path)) == ("a photo of a {}.", "an image of {}")
    path.write_text("no placeholder here\n", encoding="utf-8")
    with pytest.raises(InputError, match="placeholder"):
        resolve_templates(str(path))
    with pytest.raises(InputError, match="imagenet80"):
        resolve_templates("no-such-set")
