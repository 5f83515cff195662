"""One kinds= / --kinds convention: rankings consider the components that compute something from the
input unless asked otherwise (embed / rest / bias rows only on request)."""
from __future__ import annotations

import argparse

import numpy as np
import pytest

from vitdecomp.cli.main import build_parser
from vitdecomp.core.labels import INPUT_KINDS, kind_mask, resolve_kinds
from vitdecomp.interpret.score import ScoreTable

LABELS = ("embed", "L00.H00", "L00.bias", "L00.mlp", "L01.N0003", "L01.mlp_bias", "S0.B01.H02", "bias")


def test_resolve_and_mask():
    assert resolve_kinds() == frozenset(INPUT_KINDS) == resolve_kinds("input")
    assert "embed" in resolve_kinds("input,embed") and "embed" in resolve_kinds("input+embed")
    assert kind_mask(LABELS).tolist() == [False, True, False, True, True, False, True, False]
    assert kind_mask(LABELS, "all").all()
    with pytest.raises(ValueError, match="unknown component kind"):
        resolve_kinds("heads")


def test_rankings_skip_constant_rows_unless_asked():
    scores = np.array([[9.0], [0.5], [8.0], [0.4], [0.3], [7.0], [0.2], [6.0]])
    table = ScoreTable(scores, LABELS, ("colour",))
    assert [name for name, _ in table.top("colour", 3)] == ["L00.H00", "L00.mlp", "L01.N0003"]
    assert [name for name, _ in table.top("colour", 2, kinds="all")] == ["embed", "L00.bias"]
    assert "embed" not in table.format(top=3) and "embed" in table.format(top=3, kinds="input,embed")


@pytest.mark.parametrize("command", ["score", "retrieve", "heatmap", "debias"])
def test_commands_that_rank_components_take_kinds(command):
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    action = next(a for a in sub._actions if "--kinds" in a.option_strings)
    assert action.default == "input"
