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
# # 2. Reading a model that is not a CLIP: CompAlign
#
# Tutorial 1 read a CLIP's components with text, because a CLIP's images and texts share one space.
# A supervised classifier, a DINO or a Swin has no text tower: its components live in a space no text
# encoder speaks. **CompAlign** (docs/method.md §3) bridges the gap: it fits one linear map
# $F_i$ per component from the model's space into a CLIP's space, such that the mapped sum matches the
# CLIP's image embedding of the same image,
#
# $$\sum_i F_i\, c_i(x) \;\approx\; y_{\text{CLIP}}(x) \qquad\text{(in direction: the loss is a cosine)},$$
#
# while keeping every $F_i$ a scaled isometry ($F_i^\top F_i = s_i^2 I$), so inner products, and therefore
# text readings, are those of the model's own space up to a scale. The fit needs no labels: only the
# two models' decompositions of the same images.
#
# Here the model to read is the tiny **Swin** that ships with vitdecomp (`synth:swin`, a timm
# `SwinTransformer` trained to classify the colour of the object), and the CLIP is the tiny
# `synth:clip` of tutorial 1. Runs offline in well under a minute.

# %%
import os
import tempfile
from pathlib import Path

WORK = Path(tempfile.mkdtemp(prefix="vitdecomp-tutorial-"))
os.chdir(WORK)
os.environ["VITDECOMP_CACHE"] = str(WORK / "cache")  # text embeddings are cached here
os.environ["MPLCONFIGDIR"] = str(WORK / "matplotlib")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import matplotlib.pyplot as plt
import numpy as np
import torch

import vitdecomp as vd

torch.manual_seed(0)
torch.set_num_threads(1)  # tiny models: one thread is fastest, and leaves the other cores free

# %% [markdown]
# ## The same images through both models
#
# `generate_dataset` writes a labelled dataset of the synthetic world: ImageFolder splits
# (`train/`, `val/`, `test/`, one folder per class), exact masks, `factors.csv` and `classes.txt`
# (line *k* names class *k* in the world's words). With `task="colour"` the class is the object's colour.
#
# `vd.decompose_dataset` streams a dataset through `vd.decompose` into an on-disk component store
# (tutorial 3 looks at stores closely). CompAlign pairs row *i* of one store with row *i* of the other,
# so both models decompose the same folders.

# %%
from vitdecomp.synth import VOCABULARY, describe, generate_dataset

summary = generate_dataset("world", 600, seed=0, task="colour")
print({split: info["n"] for split, info in summary["splits"].items()}, "images; classes:", summary["classes"])

swin = vd.load("synth:swin")
clip = vd.load("synth:clip")
print(swin.name, "|", swin.family, "| classifier:", tuple(swin.classifier()[0].shape))

stores = {}
for split in ("train", "test"):
    for name, model in (("swin", swin), ("clip", clip)):
        run = vd.decompose_dataset(model, f"world/{split}", f"{name}-{split}.zarr", batch_size=64, progress=False)
        stores[name, split] = run.store
swin_train = stores["swin", "train"]
print("Swin components:", len(swin_train.labels), "of width", swin_train.comp_shape[-1])
print(swin_train.labels[:9], "...")

# %% [markdown]
# The Swin's components are named by stage, block and head (`S1.B01.H02`: stage 1, block 1, head 2);
# patch merging between stages is a frozen linear map, so the decomposition stays exact
# (docs/method.md §2.5). Its representation is 64-wide, the CLIP's 128-wide: an isometry from 64 to 128
# dimensions exists, so the constraint can hold exactly.
#
# ## Fitting CompAlign
#
# `store_batches(store, clip_store)` streams `(components, CLIP embedding, row)` mini-batches from the
# two stores (the CLIP store's `reference` rows are the CLIP image embeddings; the ids are checked to
# be the same images). `fit_compalign` holds out 10 % of the rows (by a seeded hash of the row
# index) and keeps the epoch with the best held-out cosine. `parametrisation="orthogonal"` makes each
# map exactly $s_i Q_i$ with orthonormal $Q_i$.

# %%
from vitdecomp.interpret.align import AlignConfig, fit_compalign, store_batches

train_batches = store_batches(swin_train, stores["clip", "train"])
test_batches = store_batches(stores["swin", "test"], stores["clip", "test"])
n_comp, d_model, d_clip = len(swin_train.labels), swin_train.comp_shape[-1], stores["clip", "train"].ref_dim

config = AlignConfig(parametrisation="orthogonal", lr=1e-2, epochs=30, patience=None, seed=0)
align = fit_compalign(train_batches, n_comp, d_model, d_clip, config, labels=swin_train.labels)

# the baseline with one map for every component (Text-to-Concept)
shared = fit_compalign(train_batches, n_comp, d_model, d_clip,
                       AlignConfig(mode="shared", parametrisation="orthogonal", lr=1e-2, epochs=30, patience=None))

held_out = align.metrics(test_batches)  # the test split: images the fit never saw
held_out_shared = shared.metrics(test_batches)
print(f"CompAlign:      validation cosine {align.meta['val_cosine']:.3f}, test cosine {held_out['cosine']:.3f}, "
      f"max isometry defect {held_out['defect_max']:.1e}")
print(f"one shared map: validation cosine {shared.meta['val_cosine']:.3f}, test cosine {held_out_shared['cosine']:.3f}")

history = [h["val_cosine"] for h in align.meta["history"]]
plt.figure(figsize=(5, 2.2))
plt.plot(history, label="per component")
plt.plot([h["val_cosine"] for h in shared.meta["history"]], label="one shared map")
plt.xlabel("epochs")
plt.ylabel("held-out cosine")
plt.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# One map per component fits much better than one shared map: different components of the Swin
# need different rotations into the CLIP's space. Since each map is an isometry, the mapped
# components keep their lengths and angles (up to the scale $s_i$): the mapping reads the Swin, it does
# not re-learn it.
#
# `align.apply(stack)` maps a whole `ComponentStack` (`[components, images, 64]` →
# `[components, images, 128]`, `space="clip"`), after which everything of tutorial 1 works: here the
# zero-shot colour accuracy of the mapped sum on the test split, next to the Swin's own classifier
# and the CLIP's own zero-shot accuracy.

# %%
from vitdecomp.interpret.text import text_encoder, zero_shot_head

enc = text_encoder(clip)  # the CLIP's text tower speaks for the Swin now
class_texts = (WORK / "world" / "classes.txt").read_text().splitlines()
head = zero_shot_head(enc, class_texts, "synth")  # [7, 128], the world's templates
W, b = (t.detach() for t in swin.classifier())  # the classifier's own parameters: [7, 64], [7]

correct = {"Swin's own classifier": 0, "Swin through CompAlign, zero-shot": 0}
n = 0
swin_test = stores["swin", "test"]
for stack in swin_test.iter_batches():  # ComponentStacks of valid rows, one chunk in memory
    target = swin_test.targets(np.asarray(stack.meta["rows"]))
    correct["Swin's own classifier"] += int(((stack.reference @ W.T + b).argmax(-1).numpy() == target).sum())
    mapped = align.apply(stack)
    zero_shot = (mapped.values.sum(0) @ head.T).argmax(-1).numpy()  # the mapped sum against the class texts
    correct["Swin through CompAlign, zero-shot"] += int((zero_shot == target).sum())
    n += len(target)
for what, c in correct.items():
    print(f"{what:<36} {c / n:.3f}")
print(f"{'CLIP zero-shot':<36} {stores['clip', 'test'].accuracy(head)['accuracy']:.3f}")

# %% [markdown]
# ## Labelling the Swin's heads with text
#
# TextSpan (docs/method.md §5) needs each head's mean and covariance *in the CLIP space*. One streaming
# pass maps every batch with `align.apply` and accumulates `RunningMoments` of the heads only.
# (The loop below is `vitdecomp.interpret.textspan.aligned_moments(store, align, heads)`, written out;
# `label_store(store, pool, align=align)` runs it and TextSpan in one call, as `vitdecomp label --align` does.)

# %%
from vitdecomp.interpret.textspan import format_table, textspan_heads
from vitdecomp.store import RunningMoments

labels = list(swin_train.labels)
heads = [i for i, name in enumerate(labels) if ".H" in name]
moments = RunningMoments(len(heads), d_clip, covariance=True)
index = torch.as_tensor(heads)
for stack in swin_train.iter_batches():
    mapped = align.apply(stack)  # [components, batch, 128]
    moments.update(mapped.values.index_select(0, index).movedim(0, 1))  # [batch, heads, 128]

pool = [describe(f, v) for f in ("shape", "colour", "pattern", "size", "background") for v in VOCABULARY[f]]
spans = textspan_heads(moments, [labels[i] for i in heads], pool, enc.encode(pool).double().numpy(), m=3)
print(format_table(spans))

# %% [markdown]
# A pattern shows: the heads of the first stage (`S0.*`) are read mostly as *backgrounds*, those of the
# last block (`S1.B01.*`) as *colours*, the factor the Swin was trained to classify.
#
# ## Checking the labels against the model itself
#
# The text reading goes through the CLIP; is it right about the Swin? The Swin's own classifier
# gives an answer that needs no text at all: each component's direct contribution to the logit of
# the true class, $\langle W_{y}, c_i\rangle$, computed in the Swin's own space (`stack.project(W)`). The
# components that carry the colour *according to CLIP text* should be those the classifier leans on.

# %%
from vitdecomp.interpret.score import ScoreMoments, feature_basis, score_table

features = {f: feature_basis(enc.encode([describe(f, v) for v in VOCABULARY[f]])) for f in ("colour", "background")}
score_moments = None
margin = torch.zeros(n_comp, dtype=torch.float64)
count = 0
for stack in swin_train.iter_batches():
    mapped = align.apply(stack)
    score_moments = ScoreMoments.from_stack(mapped) if score_moments is None else score_moments.add_stack(mapped)
    target = torch.as_tensor(swin_train.targets(np.asarray(stack.meta["rows"])))
    logits = stack.project(W).values.double()  # [components, batch, 7]: each component's part of each logit
    true = logits[:, torch.arange(len(target)), target]
    margin += (true - logits.mean(-1)).sum(1)  # push towards the true class, in the Swin's own space
    count += len(target)
margin /= count
table = score_table(score_moments, features)
print(table.format(top=4))

colour_score = table["colour"]
plt.figure(figsize=(4, 3))
plt.scatter(colour_score, margin.numpy())
for i in np.argsort(-colour_score)[:3]:
    plt.annotate(labels[i], (colour_score[i], float(margin[i])), fontsize=8)
plt.xlabel("colour score through CompAlign (CLIP text)")
plt.ylabel("push to the true logit (Swin's own)")
plt.tight_layout()
plt.show()
by_text = set(np.argsort(-colour_score)[:5].tolist())
by_classifier = set(np.argsort(-margin.numpy())[:5].tolist())
print("top 5 by colour score (CLIP text):   ", sorted(labels[i] for i in by_text))
print("top 5 by push to the true logit (Swin):", sorted(labels[i] for i in by_classifier))
print(f"overlap: {len(by_text & by_classifier)} of 5")

# %% [markdown]
# The two rankings agree at the top: the text read through CompAlign finds the components the
# classifier actually uses (the last block's heads and MLP), without ever looking at the classifier.
# Lower down both scores are small and their order is noise.
#
# On real models the same steps are `vitdecomp align swin.zarr --clip-store clip.zarr --out DIR` and
# `vitdecomp label swin.zarr --align DIR` (README, "Reading a store with text"), in Python
# `vitdecomp.interpret.align.fit_alignment` and `vitdecomp.interpret.textspan.label_store`; `align.save(path)` /
# `CompAlign.load(path)` keep the maps.

# %%
import shutil

os.chdir(tempfile.gettempdir())
shutil.rmtree(WORK, ignore_errors=True)
