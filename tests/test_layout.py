"""Layout address math: pieces tile the request exactly and agree with a naive byte-by-byte model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nvpool.proto.layout import Column, Extent, Layout, column_length_for
from nvpool.proto.errors import UsageError


@st.composite
def layouts(draw: st.DrawFn) -> Layout:
    su = draw(st.sampled_from([512, 4096, 65536]))
    width = draw(st.integers(1, 6))
    size = draw(st.integers(1, 40 * su * width))
    need = column_length_for(size, su, width)
    cols, eid = [], 1
    for c in range(width):
        exts: list[Extent] = []
        left, off = need + draw(st.integers(0, 2)) * su, 0
        while left > 0:  # split columns into several extents at arbitrary points
            n = left if len(exts) == 3 or draw(st.booleans()) else draw(st.integers(1, left))
            exts.append(Extent(eid, f"drive{c}", off * 7 + 1000, n))
            eid, left, off = eid + 1, left - n, off + n
        cols.append(Column(tuple(exts)))
    return Layout(1, "v", 1, size, su, tuple(cols))


def naive(lay: Layout, vol_off: int) -> tuple[int, int]:
    """(extent_id, offset inside extent) of one volume byte, computed the slow obvious way."""
    s, within = divmod(vol_off, lay.stripe_unit)
    col = lay.columns[s % lay.width]
    col_off = (s // lay.width) * lay.stripe_unit + within
    for e in col.extents:
        if col_off < e.length:
            return e.extent_id, col_off
        col_off -= e.length
    raise AssertionError("beyond column")


@settings(max_examples=200, deadline=None)
@given(layouts(), st.data())
def test_map_matches_naive_model(lay: Layout, data: st.DataObject) -> None:
    lay.validate()
    off = data.draw(st.integers(0, lay.size))
    length = data.draw(st.integers(0, lay.size - off))
    pieces = list(lay.map(off, length))
    assert sum(p.length for p in pieces) == length
    pos = 0
    for p in pieces:
        assert p.buf_offset == pos and p.length > 0
        assert 0 <= p.extent_offset and p.extent_offset + p.length <= p.extent.length
        for k in (0, p.length - 1):  # both ends of the piece agree with the model
            assert naive(lay, off + pos + k) == (p.extent.extent_id, p.extent_offset + k)
        pos += p.length


@given(layouts(), st.data())
def test_single_piece_is_map_when_map_gives_one_piece(lay: Layout, data: st.DataObject) -> None:
    """The fast-path rule computes the piece directly; it must be exactly what ``map`` yields when
    ``map`` yields one piece of the whole range, and None otherwise."""
    off = data.draw(st.integers(-1, lay.size + 1))
    length = data.draw(st.integers(0, max(0, lay.size - off) + 1))
    if off < 0 or length <= 0 or off + length > lay.size:
        assert lay.single_piece(off, length, write=False) is None
        return
    pieces = list(lay.map(off, length))
    want = pieces[0] if len(pieces) == 1 and pieces[0].length == length else None
    assert lay.single_piece(off, length, write=False) == want
    assert lay.single_piece(off, length, write=True) == want


@given(layouts())
def test_roundtrip_dict(lay: Layout) -> None:
    assert Layout.from_dict(lay.to_dict()) == lay


def test_out_of_range_and_negative() -> None:
    lay = Layout(1, "v", 1, 8192, 4096, (Column((Extent(1, "d", 0, 8192),)),))
    for off, n in [(-1, 1), (0, -1), (8192, 1), (4096, 4097)]:
        with pytest.raises(UsageError):
            list(lay.map(off, n))
    assert list(lay.map(8192, 0)) == []


def test_validate_rejects_short_columns_and_duplicates() -> None:
    e = Extent(1, "d", 0, 4096)
    with pytest.raises(UsageError):
        Layout(1, "v", 1, 8192, 4096, (Column((e,)),)).validate()
    with pytest.raises(UsageError):
        Layout(1, "v", 1, 8192, 4096, (Column((e,)), Column((e,)))).validate()


def test_single_piece_is_the_fast_path_rule() -> None:
    def col(i: int, n: int) -> Column:
        return Column((Extent(i, f"d{i}", 0, n),))

    lay = Layout(1, "v", 1, 8 * 4096, 4096, (col(1, 4 * 4096), col(2, 4 * 4096)))
    p = lay.single_piece(4096 + 10, 100, write=False)
    assert p is not None and p.extent.extent_id == 2 and p.extent_offset == 10 and p.length == 100
    assert lay.single_piece(4000, 200, write=False) is None  # crosses a stripe unit
    assert lay.single_piece(0, 0, write=False) is None and lay.single_piece(-1, 1, write=False) is None
    assert lay.single_piece(8 * 4096 - 1, 2, write=False) is None  # past the end
    moving = lay.with_target(lay, 2)
    assert moving.single_piece(0, 10, write=False) is not None and moving.single_piece(0, 10, write=True) is None
