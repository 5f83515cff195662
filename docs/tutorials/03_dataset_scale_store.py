# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3. A whole dataset: the component store
#
# A decomposition is large: components × images × width (ViT-B/16 per head: 12·12 heads plus the
# rest, × 768 floats per image). For a dataset it does not fit in memory, and computing it takes
# long enough that a run will be interrupted. `vd.decompose_dataset` streams a dataset into an
# on-disk **component store** (zarr v3), one chunk per batch:
#
# * **resumable**: a chunk counts only once its completion record is written; run the same call
#   again after a crash and only the missing chunks are computed. The result is bit-for-bit the
#   store of an uninterrupted run;
# * **checked**: every batch is checked to add up to the model's output (docs/method.md §2.7) before
#   it is written, and a store made with another model, configuration or dataset is refused;
# * **streamed**: readers see one chunk at a time (`iter_batches`), and statistics (means,
#   covariances, score moments) are accumulated in mergeable form, so any analysis runs in
#   constant memory;
# * **recorded**: a manifest says what was computed, what was skipped and why; results derived from
#   a store carry a run record that pins them to their inputs.
#
# Offline on the tiny CLIP, in well under a minute.

# %%
import json
import os
import tempfile
from pathlib import Path

WORK = Path(tempfile.mkdtemp(prefix="vitdecomp-tutorial-"))
os.chdir(WORK)
os.environ["VITDECOMP_CACHE"] = str(WORK / "cache")  # text embeddings are cached here
os.environ["MPLCONFIGDIR"] = str(WORK / "matplotlib")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

import vitdecomp as vd

torch.set_num_threads(1)  # tiny models: one thread is fastest, and leaves the other cores free

# %% [markdown]
# ## A small dataset
#
# 500 scenes of the synthetic world, the class being the object's colour. We also drop in one
# broken file, as real datasets have: every reader of vitdecomp skips unreadable, truncated or tiny
# images with the same one-line reason, and the store lists them.

# %%
from vitdecomp.synth import generate_dataset

summary = generate_dataset("world", 500, seed=0, task="colour", splits=(400, 50, 50))
(WORK / "world" / "train" / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
print(summary["classes"], "-", summary["splits"]["train"]["n"], "training images (+1 broken file)")

model = vd.load("synth:clip")

# %% [markdown]
# ## Decompose, get interrupted, resume
#
# `max_chunks=3` stops after three chunks, as a killed job would (the command-line version is
# `vitdecomp decompose synth:clip world/train --out train.zarr --max-chunks 3`; Ctrl-C works too).

# %%
first = vd.decompose_dataset(model, "world/train", "train.zarr", batch_size=64, max_chunks=3, progress=False)
store = first.store
print(f"{store.n_items} items in {store.n_chunks} chunks of {store.batch_size}")
print("done:", store.done_chunks(), "| pending:", store.pending_chunks(), "| complete:", store.is_complete())

# %% [markdown]
# The finished chunks can already be read (readers trust done chunks only). Running the very same
# call again computes just the pending chunks:

# %%
second = vd.decompose_dataset(model, "world/train", "train.zarr", batch_size=64, progress=False)
print("this run computed chunks", second.chunks_done, f"({second.images} images, {second.images_per_second:.0f}/s)")
print("complete:", store.is_complete())

manifest = second.manifest
print("counts:", manifest["counts"])
print("skipped:", [(s["id"], s["reason"]) for s in manifest["skipped"]])
print(f"exactness: max relative error {manifest['error']['max']:.1e} (computed), "
      f"{manifest['error']['stored_max']:.1e} (after rounding to the stored float16)")

# %% [markdown]
# Is the resumed store really the same as one written in one go? Decompose again, uninterrupted,
# into another folder, and compare every array:

# %%
straight = vd.decompose_dataset(model, "world/train", "train-straight.zarr", batch_size=64, progress=False).store
a = store.components(slice(None))
b = straight.components(slice(None))
same = (torch.equal(a.values.nan_to_num(), b.values.nan_to_num()) and torch.equal(a.valid, b.valid)
        and torch.equal(a.reference.nan_to_num(), b.reference.nan_to_num()) and a.ids == b.ids)
print("resumed store == uninterrupted store, bit for bit:", same)

# %% [markdown]
# A store remembers how it was made (model, weights identity, granularity, modes, dtype, dataset
# fingerprint). Writing into it with anything else is refused, with the list of differences:

# %%
from vitdecomp.store.component_store import StoreMismatchError

try:
    vd.decompose_dataset(model, "world/train", "train.zarr", batch_size=64, granularity="layer", progress=False)
except StoreMismatchError as exc:
    print("refused:", "\n  ".join(str(exc).splitlines()[:4]))

# %% [markdown]
# ## Reading a store as a stream
#
# `iter_batches(n)` yields `ComponentStack`s of the valid rows, one chunk in memory, with
# `meta["rows"]` / `meta["ids"]` saying which items they are. Everything of tutorial 1 works on each.
# Statistics that are sums over images merge exactly: here the per-component means that the run
# itself accumulated (`load_moments("moments")`, float64) against a pass of our own.

# %%
from vitdecomp.store import RunningMoments

for batch in store.iter_batches(128):
    print("batch:", tuple(batch.values.shape), "rows", batch.meta["rows"][0], "...", batch.meta["rows"][-1],
          f"error {batch.error():.1e} (float16 storage)")

saved, chunks = store.load_moments("moments")
ours = RunningMoments(len(store.labels), store.comp_shape[-1])
for batch in store.iter_batches():
    ours.update(batch.values.movedim(0, 1))  # [batch, components, d]
print(f"{saved.count} images; means from the run vs. from the stored float16 rows: "
      f"max difference {np.abs(saved.mean - ours.mean).max():.1e}")

# two halves, merged, equal one pass (what several ranks or workers do)
half = store.n_chunks // 2
left = store.compute_moments(chunks=range(half), covariance=True)
right = store.compute_moments(chunks=range(half, store.n_chunks), covariance=True)
whole = store.compute_moments(covariance=True)
merged = left.merge(right)
print(f"merged halves vs one pass: means {np.abs(merged.mean - whole.mean).max():.1e}, "
      f"covariances {np.abs(merged.covariance - whole.covariance).max():.1e}")

# %% [markdown]
# ## Text at dataset scale
#
# The stored `reference` rows are the CLIP image embeddings, and the store keeps each item's class
# (`targets`), so zero-shot accuracy is one streamed pass. `generate_dataset` wrote `classes.txt`,
# line *k* naming class *k* in the world's words, and the world has its own template set (`synth`).
# The score table of tutorial 1 streams the same way (`ScoreMoments.from_store`), and so does TextSpan
# (`store.compute_moments(covariance=True)` feeds `textspan_heads`).

# %%
from vitdecomp.interpret.score import ScoreMoments, feature_basis, score_table
from vitdecomp.interpret.text import text_encoder, zero_shot_head
from vitdecomp.synth import VOCABULARY, describe

enc = text_encoder(model)
class_texts = (WORK / "world" / "classes.txt").read_text().splitlines()
head = zero_shot_head(enc, class_texts, "synth")  # [7, d]
print("zero-shot accuracy on the stored images:", store.accuracy(head))

features = {f: feature_basis(enc.encode([describe(f, v) for v in VOCABULARY[f]]))
            for f in ("colour", "size", "background")}
table = score_table(ScoreMoments.from_store(store), features)
print(table.format(top=3))

# %% [markdown]
# ## Provenance
#
# A number is only as good as the record of what produced it. `run_record` captures the store's
# identity (configuration hash, item count, labels, the sha256 of its `manifest.json`), every input
# file's sha256, the arguments and the package versions; every command writes one under `"run"` in
# its JSON. `check_inputs(record)` later says what changed since.

# %%
from vitdecomp.store.provenance import check_inputs, run_record, write_json

result = {
    "zero_shot": store.accuracy(head),
    "top_colour": table.top("colour", 3),
    "run": run_record("tutorial-3", {"templates": "synth"}, store=store,
                      files={"classes": WORK / "world" / "classes.txt"}),
}
write_json("results.json", result)
record = json.loads(Path("results.json").read_text())["run"]
print(json.dumps({k: record[k] for k in ("command", "arguments", "versions")}, indent=1))
print("store config hash:", record["store"]["config_hash"][:16], "| manifest sha256:",
      record["store"]["manifest_sha256"][:16])
print("changed since:", check_inputs(record))

# someone edits the class names: the record notices
(WORK / "world" / "classes.txt").write_text("\n".join(reversed(class_texts)) + "\n")
changed = check_inputs(record)
print("changed since:", changed)

# %% [markdown]
# At scale the same calls run under `torchrun` (each rank writes its own chunks of one store; see the
# README, "Whole datasets"), and every command of the README's "Reading a store" section reads a
# store in this streamed way.

# %%
import shutil

os.chdir(tempfile.gettempdir())
shutil.rmtree(WORK, ignore_errors=True)
