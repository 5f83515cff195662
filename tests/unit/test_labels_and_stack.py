"""ComponentLabel and ComponentStack on hand-made tensors (no models)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vitdecomp import ComponentLabel, ComponentStack, DecompositionError, InputError, parse_label
from vitdecomp.core.stack import TokenInfo


def _labels(n_layers: int, n_heads: int) -> tuple[ComponentLabel, ...]:
    labs = [ComponentLabel("embed")]
    for layer in range(n_layers):
        labs += [ComponentLabel("head", layer, head=h) for h in range(n_heads)]
        labs += [ComponentLabel("bias", layer), ComponentLabel("mlp", layer)]
    return tuple(labs + [ComponentLabel("const")])


def _stack(n_layers=3, n_heads=2, batch=4, d=5, tokens=0, seed=0) -> ComponentStack:
    gen = torch.Generator().manual_seed(seed)
    labels = _labels(n_layers, n_heads)
    shape = (len(labels), batch) + ((tokens,) if tokens else ()) + (d,)
    values = torch.randn(shape, generator=gen, dtype=torch.float64)
    ref = values.sum(0).sum(1) if tokens else values.sum(0)
    info = TokenInfo(types=("cls",) + ("patch",) * (tokens - 1), grid=(1, tokens - 1)) if tokens else None
    return ComponentStack(values, labels, ref, tokens=info, meta={"n_layers": n_layers, "rtol": 1e-10})


@pytest.mark.parametrize(
    "text",
    ["embed", "rest", "bias", "other", "L07", "L07.attn", "L07.H03", "L07.bias", "L07.mlp", "L11.N0123",
     "L02.mlp_bias", "L07.H03.t012", "S3.B17.H05", "S0.B01.mlp", "S2.B00.t004", "embed.t000"],
)
def test_label_round_trip(text: str) -> None:
    assert str(parse_label(text)) == text


def test_label_rejects_garbage_and_incomplete() -> None:
    with pytest.raises(ValueError):
        parse_label("layer7head3")
    with pytest.raises(ValueError):
        ComponentLabel("head", 3)  # no head index
    with pytest.raises(ValueError):
        ComponentLabel("mlp")  # no layer


def test_exact_stack_passes_and_broken_stack_fails() -> None:
    stack = _stack()
    assert stack.error() < 1e-12
    stack.check()
    broken = ComponentStack(stack.values, stack.labels, stack.reference * 1.001, meta=stack.meta)
    assert broken.error() == pytest.approx(1e-3 / 1.001, rel=1e-6)
    with pytest.raises(DecompositionError):
        broken.check()
    nan = ComponentStack(stack.values * float("nan"), stack.labels, stack.reference, meta=stack.meta)
    with pytest.raises(DecompositionError):
        nan.check()


def test_select_group_keep_the_total() -> None:
    stack = _stack()
    heads = stack.select(kind="head", layer=slice(-2, None))
    assert [str(l) for l in heads.labels] == ["L01.H00", "L01.H01", "L02.H00", "L02.H01"]
    assert heads.error() > 1e-3  # a subset does not add up ...
    kept = stack.select(kind="head", layer=-1, keep_rest=True)
    assert str(kept.labels[-1]) == "other" and kept.error() < 1e-12  # ... unless the rest is kept
    assert torch.equal(kept["L02.H01"], stack["L02.H01"])
    by_layer = stack.group("layer")
    assert [str(l) for l in by_layer.labels] == ["embed", "L00", "L01", "L02", "bias"]
    assert by_layer.error() < 1e-12
    torch.testing.assert_close(by_layer["L01"], sum(stack[f"L01.{x}"] for x in ("H00", "H01", "bias", "mlp")))
    attn_mlp = stack.group("attn_mlp")
    assert "L01.attn" in attn_mlp.names and "L01.mlp" in attn_mlp.names
    torch.testing.assert_close(attn_mlp["L01.attn"], stack["L01.H00"] + stack["L01.H01"] + stack["L01.bias"])


def test_select_by_head_and_take() -> None:
    stack = _stack(n_heads=3)
    assert [str(l) for l in stack.select(head=2).labels] == ["L00.H02", "L01.H02", "L02.H02"]
    taken = stack.take(["L02.mlp", "embed"])
    assert taken.names == ["L02.mlp", "embed"]
    with pytest.raises(KeyError):
        stack.index("L09.H00")


def test_project_is_linear_and_keeps_the_identity() -> None:
    stack = _stack(d=6)
    dirs = torch.randn(4, 6, dtype=torch.float64)
    proj = stack.project(dirs)
    assert proj.values.shape == (len(stack), 4, 4) and proj.space == "projected"
    assert proj.error() < 1e-12
    torch.testing.assert_close(proj["L01.H00"], stack["L01.H00"] @ dirs.T)
    with pytest.raises(InputError):
        stack.project(torch.randn(4, 5, dtype=torch.float64))


def test_token_stack_sum_and_flatten() -> None:
    stack = _stack(tokens=5)
    assert stack.has_tokens and stack.error() < 1e-12
    summed = stack.sum_tokens()
    torch.testing.assert_close(summed.values, stack.values.sum(2))
    flat = stack.flatten_tokens()
    assert len(flat) == 5 * len(stack) and flat.names[1] == "embed.t001"
    assert flat.error() < 1e-12
    torch.testing.assert_close(flat["L00.H01.t003"], stack["L00.H01"][:, 3])


def test_save_load_round_trip(tmp_path) -> None:
    stack = _stack(tokens=3)
    path = stack.save(tmp_path / "s.safetensors")
    back = ComponentStack.load(path)
    assert back.labels == stack.labels and back.tokens == stack.tokens and back.meta == stack.meta
    assert torch.equal(back.values, stack.values) and torch.equal(back.reference, stack.reference)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError):
        ComponentStack.load(tmp_path / "junk.safetensors")
    with pytest.raises(InputError):
        ComponentStack.load(tmp_path / "missing.safetensors")


def test_mismatched_shapes_are_rejected() -> None:
    stack = _stack()
    with pytest.raises(ValueError):
        ComponentStack(stack.values[:-1], stack.labels, stack.reference)
    with pytest.raises(ValueError):
        ComponentStack(stack.values, stack.labels, stack.reference[:, :-1])


@settings(max_examples=30, deadline=None)
@given(
    n_layers=st.integers(1, 4),
    n_heads=st.integers(1, 3),
    batch=st.integers(1, 3),
    layer_sel=st.integers(-4, 3),
    seed=st.integers(0, 1000),
)
def test_select_with_rest_and_group_always_sum_to_reference(n_layers, n_heads, batch, layer_sel, seed) -> None:
    stack = _stack(n_layers=n_layers, n_heads=n_heads, batch=batch, seed=seed)
    layer = max(-n_layers, min(layer_sel, n_layers - 1))
    for s in (
        stack.select(kind=("head", "mlp"), layer=layer, keep_rest=True),
        stack.group("layer"),
        stack.group("attn_mlp"),
    ):
        assert s.error() < 1e-12
    assert len(set(stack.names)) == len(stack)  # labels unique
