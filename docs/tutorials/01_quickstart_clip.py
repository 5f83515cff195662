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
# # 1. Quickstart: the exact decomposition of a CLIP, read with text
#
# This tutorial runs offline, on a CPU, in well under a minute. It uses the tiny CLIP that ships
# with vitdecomp (`synth:clip`, trained on a synthetic world of coloured shapes whose every factor
# is known), so you can check each claim against the truth.
#
# You will:
#
# 1. load a model and render a few scenes of the synthetic world;
# 2. split the model's image representation **exactly** into the direct contributions of its
#    components (embedding, every attention head, every MLP, constant biases) and check that the
#    pieces add up;
# 3. measure each component's share of the representation;
# 4. read components with text: zero-shot logits split by component, a correlation score per
#    factor (docs/method.md §4) and TextSpan labels per head (docs/method.md §5);
# 5. draw a token heatmap: where in the image a head writes "a red object" (docs/method.md §6.4).
#
# Everything this notebook writes goes to a temporary folder, including the text-embedding cache
# (in your own work, leave `VITDECOMP_CACHE` unset and the cache in your home is reused across runs).

# %%
import os
import tempfile
from pathlib import Path

WORK = Path(tempfile.mkdtemp(prefix="vitdecomp-tutorial-"))
os.chdir(WORK)
os.environ["VITDECOMP_CACHE"] = str(WORK / "cache")  # text embeddings are cached here
os.environ["MPLCONFIGDIR"] = str(WORK / "matplotlib")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded anyway

import matplotlib.pyplot as plt
import numpy as np
import torch

import vitdecomp as vd

torch.manual_seed(0)
torch.set_num_threads(1)  # tiny models: one thread is fastest, and leaves the other cores free
print("vitdecomp", vd.__version__, "- working in", WORK)

# %% [markdown]
# ## Load a model
#
# `vd.load` takes a model spec: `timm:...`, `open_clip:...`, `hf:...` for real models, `synth:KIND`
# for the tiny models that ship with the package. The result is a `vd.Model`: the unmodified
# stock module (here an open_clip `CLIP`) plus what vitdecomp needs to know about it, and the
# library's own eval transform.

# %%
model = vd.load("synth:clip")
print(model.name, "|", model.family, "| weights:", model.weights)
print("input size:", model.preprocessing.input_size)

# %% [markdown]
# ## Scenes with known factors
#
# `sample_scene` draws a random scene (shape, colour, pattern, size, position, background);
# `render` draws it as a 64×64 image with an exact mask per object. We draw 56 scenes, 8 of each of
# the 7 colours, so we know every image's colour.

# %%
from vitdecomp.synth import COLOURS, VOCABULARY, describe, render, sample_scene

rng = np.random.default_rng(0)
scenes = [sample_scene(rng, fixed={"colour": c}) for c in COLOURS for _ in range(8)]
images = [render(s)[0] for s in scenes]
colour_of = np.array([list(COLOURS).index(s.main.colour) for s in scenes])

fig, axes = plt.subplots(1, 7, figsize=(10, 1.8))
for ax, i in zip(axes, range(0, len(scenes), 8)):
    ax.imshow(images[i])
    ax.set_title(f"{scenes[i].main.colour}\n{scenes[i].main.shape}", fontsize=8)
    ax.axis("off")
plt.show()

# %% [markdown]
# ## The decomposition, and why you can trust it
#
# For a pre-norm ViT the final representation $z$ (here the CLIP image embedding) is a sum of
# direct contributions, $z = \sum_i c_i$ (docs/method.md §2.1): the embedding, each head of each
# layer, each MLP and the constant biases. The final LayerNorm is linear once its per-image scale
# is fixed (docs/method.md §2.2), so the sum is **exact**, not an approximation.
#
# `vd.decompose` returns a `ComponentStack`: `values [components, batch, d]`, one label per row and
# the model's own output as `reference`. It checks the identity every time, and `stack.error()`
# reports the largest relative error over the batch: $\max_x \lVert\sum_i c_i(x) - z(x)\rVert / \lVert z(x)\rVert$.

# %%
pixels = torch.stack([model.transform(im) for im in images])  # [56, 3, 64, 64]
stack = vd.decompose(model, pixels)  # granularity="head" by default
print("values:", tuple(stack.values.shape), "= [components, images, d]")
print("first components:", stack.names[:6], "... last:", stack.names[-3:])
print(f"max relative error of the sum: {stack.error():.2e}")

# the same check by hand: sum the rows, compare with the model's own forward pass
with torch.no_grad():
    z = model.representation(pixels)
by_hand = ((stack.values.sum(0) - z).norm(dim=-1) / z.norm(dim=-1)).max()
print(f"by hand, against a fresh forward pass: {float(by_hand):.2e}")

# %% [markdown]
# ## Component shares
#
# Since $\lVert z\rVert^2 = \sum_i \langle c_i, z\rangle$, the number
# $\mathrm{share}_i = \langle c_i, z\rangle / \lVert z\rVert^2$ says how much of the representation each
# component accounts for; the shares sum to one (they can be negative: a component can point
# against the total). `stack.group("layer")` sums the heads of each layer into one row, which keeps
# the identity.

# %%
def shares(s: vd.ComponentStack) -> torch.Tensor:
    """Each row's share of |z|^2, averaged over the images: [components]."""
    ref = s.reference.double()
    return (torch.einsum("cbd,bd->cb", s.values.double(), ref) / ref.pow(2).sum(-1)).mean(1)


per_component = shares(stack)
print(f"shares sum to {float(per_component.sum()):.6f}")
top = per_component.argsort(descending=True)[:8]
for i in top.tolist():
    print(f"  {stack.names[i]:<10} {float(per_component[i]):+.1%}")

layers = stack.group("layer")
plt.figure(figsize=(6, 2.2))
plt.bar(layers.names, shares(layers).numpy())
plt.ylabel("share of |z|²")
plt.title("What each part of the CLIP contributes")
plt.xticks(rotation=45, ha="right")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Reading components with text
#
# A CLIP's image and text embeddings live in one space, so a component $c_i$ can be read against a
# text embedding $y$: $\langle c_i, y\rangle$ is component $i$'s part of the image–text similarity,
# and those parts add up to the model's own similarity $\langle z, y\rangle$.
#
# `text_encoder(model)` gives the model's own text tower; `encode` returns unit rows. Zero-shot
# colour classification, split by component: `stack.project(texts)` maps every row onto the text
# directions, `[components, images, 7]`.

# %%
from vitdecomp.interpret.text import text_encoder

enc = text_encoder(model)
colour_texts = [describe("colour", c) for c in COLOURS]  # "a red object", ...
colour_emb = enc.encode(colour_texts)  # [7, d], unit rows
print(colour_texts)

logit_parts = stack.project(colour_emb)  # [components, images, 7]
logits = logit_parts.values.sum(0)  # == z @ colour_emb.T, exactly
accuracy = float((logits.argmax(-1).numpy() == colour_of).mean())
print(f"zero-shot colour accuracy of the whole model: {accuracy:.2f}")

# which components carry the correct colour's logit?
correct = logit_parts.values[:, torch.arange(len(scenes)), torch.as_tensor(colour_of)]  # [components, images]
margin = correct - logit_parts.values.mean(-1)  # each component's push towards the true colour
order = margin.mean(1).argsort(descending=True)[:5]
for i in order.tolist():
    print(f"  {stack.names[i]:<10} pushes towards the true colour by {float(margin[i].mean()):+.3f}")

# %% [markdown]
# ### A score per factor (docs/method.md §4)
#
# The score table ranks every component on a feature without labels: for a feature given by a few
# texts (all colour phrases, all shape phrases, ...), `feature_basis` makes an orthonormal basis of
# their span, and the score is the correlation between a component's projection on that span and
# the model's total projection, over the images. `ScoreMoments.from_stack` collects what is needed
# in one pass (for whole datasets it streams: tutorial 3).

# %%
from vitdecomp.interpret.score import ScoreMoments, feature_basis, score_table

features = {f: feature_basis(enc.encode([describe(f, v) for v in VOCABULARY[f]]))
            for f in ("colour", "background", "shape")}
# a fresh, larger sample with every factor random, so no factor is held fixed
rng2 = np.random.default_rng(1)
more = torch.stack([model.transform(render(sample_scene(rng2))[0]) for _ in range(200)])
big = vd.decompose(model, more)
table = score_table(ScoreMoments.from_stack(big), features)
print(table.format(top=4))

# %% [markdown]
# ### TextSpan: a few texts per head (docs/method.md §5)
#
# TextSpan explains the *variance* of a head: it greedily picks, from a pool of texts, the
# directions along which the head's output varies most, each step removing the chosen direction.
# `textspan_heads` works from streamed moments (mean and covariance per component), so it scales to
# whole datasets. Our pool: every one-attribute phrase of the world.

# %%
from vitdecomp.interpret.textspan import format_table, textspan_heads
from vitdecomp.store import RunningMoments

pool = [describe(f, v) for f in ("shape", "colour", "pattern", "size", "background") for v in VOCABULARY[f]]
pool_emb = enc.encode(pool).double().numpy()
moments = RunningMoments(big.n_components, big.dim, covariance=True).update(big.values.movedim(0, 1))
last_layer = [n for n in big.names if n.startswith("L03.H")]
spans = textspan_heads(moments, big.names, pool, pool_emb, components=last_layer, m=3)
print(format_table(spans))

# %% [markdown]
# ## A token heatmap (docs/method.md §6.4)
#
# With `granularity="head_token"` every head's contribution is split further by the source token it
# reads from, $c_i = \sum_t c_{i,t}$. Projecting onto a text direction *before* the token expansion
# (`directions=`) keeps this cheap. `token_heatmap` sums the chosen heads and lays the patch tokens
# out on their grid; `contrast=` subtracts a second direction, here "a red object" minus the mean
# of all colour phrases. Summed over every token (patches and CLS), the map is exactly those heads'
# contribution to the similarity.

# %%
from vitdecomp.apps.heatmap import token_heatmap

directions = torch.cat([colour_emb, colour_emb.mean(0, keepdim=True)])  # 7 colours + their mean
red = [i for i, s in enumerate(scenes) if s.main.colour == "red"][:4]
tokens = vd.decompose(model, pixels[red], granularity="head_token", directions=directions)
heads = [n for n in tokens.names if ".H" in n]  # every head of every layer
heat = token_heatmap(tokens, list(COLOURS).index("red"), components=heads, contrast=len(COLOURS))
print("patch map:", tuple(heat.patch.shape), "grid", heat.grid, "| prefix tokens:", list(heat.prefix))

fig, axes = plt.subplots(2, len(red), figsize=(2.2 * len(red), 4.4))
maps = heat.upsample(64)
vmax = float(maps.abs().max())
for j, i in enumerate(red):
    axes[0, j].imshow(images[i])
    axes[0, j].set_title(scenes[i].main.shape, fontsize=8)
    axes[1, j].imshow(maps[j].numpy(), cmap="bwr", vmin=-vmax, vmax=vmax)
    axes[1, j].set_title(f"CLS {float(heat.prefix['cls'][j]):+.2f}", fontsize=8)
for ax in axes.flat:
    ax.axis("off")
fig.suptitle('"a red object" − mean colour, summed over every head')
plt.show()

# the map adds up: patch + CLS tokens = those heads' contribution to the contrastive logit
heads_stack = tokens.take(heads).sum_tokens()
expected = heads_stack.values.sum(0)[:, list(COLOURS).index("red")] - heads_stack.values.sum(0)[:, len(COLOURS)]
print("map total - heads' contribution:", float((heat.total() - expected).abs().max()))

# %% [markdown]
# ## Where next
#
# * Tutorial 2 reads a model that is **not** a CLIP (a supervised Swin) with text, through CompAlign.
# * Tutorial 3 decomposes a whole dataset into an on-disk store, resumably, and reads it in a stream.
# * Tutorial 4 puts the decomposition to work: retrieval by feature, segmentation, removing a
#   spurious cue.
#
# Clean up the temporary folder:

# %%
import shutil

os.chdir(tempfile.gettempdir())
shutil.rmtree(WORK, ignore_errors=True)
