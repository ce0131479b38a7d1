"""Dispatch tables that cannot be read: one found by scanning is skipped with one warning naming the file and
why; one named by FUSED_RESIDUAL_DISPATCH_TABLE is a ValueError naming the file and the variable. Good tables
around them still decide."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import fused_residual as fr
from fused_residual import dispatch
from fused_residual.activations import REFERENCE_FORM


def good_table(winner: str = "torch") -> dict:
    return {"format": 1, "device": "cpu", "capability": [0, 0], "torch": "x", "triton": None, "date": "2026-01-01",
            "commit": "test", "entries": [{"dtype": "float32", "width": 32, "rows": 128, "mode": "train",
                                           "winner": winner}]}


def _with(**changes) -> str:
    return json.dumps({**good_table(), **changes})


def _entry(**changes) -> str:
    return _with(entries=[{**good_table()["entries"][0], **changes}])


CORRUPT = {
    "truncated": json.dumps(good_table())[:40],
    "empty": "",
    "not_utf8": b"\xff\xfe{".decode("latin-1"),
    "a_list": json.dumps([good_table()]),
    "no_entries": json.dumps({k: v for k, v in good_table().items() if k != "entries"}),
    "entries_not_a_list": _with(entries={"a": 1}),
    "entry_not_an_object": _with(entries=[3]),
    "entry_without_rows": json.dumps({**good_table(), "entries": [
        {k: v for k, v in good_table()["entries"][0].items() if k != "rows"}]}),
    "width_not_an_integer": _entry(width="32"),
    "width_a_float": _entry(width=32.5),
    "width_zero": _entry(width=0),
    "rows_negative": _entry(rows=-4),
    "unknown_dtype": _entry(dtype="float8"),
    "unknown_winner": _entry(winner="fastest"),
    "unknown_mode": _entry(mode="training"),
    "no_device": json.dumps({k: v for k, v in good_table().items() if k != "device"}),
    "bad_capability": _with(capability="9.0"),
    "other_format": _with(format=2),
}


@pytest.fixture
def tables_here(tmp_path, monkeypatch, use_backend):
    """The user cache is ``tmp_path``; auto routing; no table named by the variable."""
    use_backend("auto")
    monkeypatch.setenv(dispatch.CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.delenv(dispatch.TABLE_ENV_VAR, raising=False)
    dispatch.reset()
    yield tmp_path
    dispatch.reset()


def _train_route():
    return dispatch.route(torch.empty(100, 32), torch.empty(32, 32), None, REFERENCE_FORM, True)


@pytest.mark.parametrize("corruption", list(CORRUPT))
def test_a_corrupt_table_found_by_scanning_is_skipped_with_one_warning(tables_here, corruption):
    bad = tables_here / "dispatch-broken.json"
    if corruption == "not_utf8":
        bad.write_bytes(b"\xff\xfe{")
    else:
        bad.write_text(CORRUPT[corruption])
    (tables_here / "dispatch-cpu.json").write_text(json.dumps(good_table("torch")))
    with pytest.warns(UserWarning, match=r"skipped the dispatch table .*dispatch-broken\.json: ") as caught:
        assert _train_route().name == "torch", "the good table beside the corrupt one still decides"
        block = fr.FusedResidualBlock(32, 32)
        block(torch.randn(100, 32, requires_grad=True)).sum().backward()
        block(torch.randn(7, 32))
    assert len([w for w in caught if "dispatch-broken" in str(w.message)]) == 1
    assert [str(p) for p, _ in dispatch.skipped_tables()] == [str(bad)]


@pytest.mark.parametrize("corruption", [*CORRUPT, "missing"])
def test_a_corrupt_table_named_by_the_variable_is_a_value_error_naming_both(tables_here, monkeypatch, corruption):
    bad = tables_here / "named.json"
    if corruption == "not_utf8":
        bad.write_bytes(b"\xff\xfe{")
    elif corruption != "missing":
        bad.write_text(CORRUPT[corruption])
    monkeypatch.setenv(dispatch.TABLE_ENV_VAR, str(bad))
    dispatch.reset()
    with pytest.raises(ValueError, match=rf"{dispatch.TABLE_ENV_VAR}=.*named\.json.*: "):
        fr.FusedResidualBlock(32, 32)(torch.randn(100, 32))


def test_a_good_table_named_by_the_variable_decides(tables_here, monkeypatch):
    named = tables_here / "named.json"
    named.write_text(json.dumps(good_table("composite")))
    monkeypatch.setenv(dispatch.TABLE_ENV_VAR, str(named))
    dispatch.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _train_route() is dispatch.COMPOSITE
