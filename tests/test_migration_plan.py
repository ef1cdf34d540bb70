"""The migration copy plan: applying it to a copy of the old placement yields the new placement."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nvpool.proto.layout import Column, Extent, Layout, column_length_for
from nvpool.pool.migration import bytes_to_move, copy_plan


def make(size: int, su: int, cols: list[list[tuple[int, str, int]]]) -> Layout:
    need = column_length_for(size, su, len(cols))
    columns = []
    for c in cols:
        exts, left = [], need
        for k, (eid, drive, off) in enumerate(c):
            n = left if k == len(c) - 1 else max(1, left // 2)
            exts.append(Extent(eid, drive, off, n))
            left -= n
        columns.append(Column(tuple(exts)))
    return Layout(1, "v", 1, size, su, tuple(columns))


@st.composite
def pairs(draw: st.DrawFn) -> tuple[Layout, Layout]:
    su = draw(st.sampled_from([512, 4096]))
    size = draw(st.integers(1, 30 * su))
    w_old, w_new = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    old_cols = [[(100 + i * 2 + k, f"d{i}", 0) for k in range(draw(st.integers(1, 2)))] for i in range(w_old)]
    # the new layout keeps some old columns (same extents) and adds new ones
    keep = draw(st.integers(0, min(w_old, w_new))) if w_old == w_new else 0
    new_cols = old_cols[:keep] + [[(500 + i * 2 + k, f"n{i}", 0) for k in range(draw(st.integers(1, 2)))] for i in range(w_new - keep)]
    return make(size, su, old_cols), make(size, su, new_cols)


def simulate(old: Layout, new: Layout) -> None:
    """Fill 'drives' per old placement, apply the plan, then read every byte per the new placement."""
    store: dict[tuple[int, int], int] = {}
    for p in old.map(0, old.size):
        for k in range(p.length):
            store[(p.extent.extent_id, p.extent_offset + k)] = (p.buf_offset + k) % 251
    for c in copy_plan(old, new, chunk=1000):
        assert c.length <= 1000 and c.src_offset + c.length <= c.src.length and c.dst_offset + c.length <= c.dst.length
        for k in range(c.length):
            store[(c.dst.extent_id, c.dst_offset + k)] = store[(c.src.extent_id, c.src_offset + k)]
    for p in new.map(0, new.size):
        for k in (0, p.length - 1):
            assert store[(p.extent.extent_id, p.extent_offset + k)] == (p.buf_offset + k) % 251


@settings(max_examples=60, deadline=None)
@given(pairs())
def test_plan_moves_every_byte_to_its_new_place(pair: tuple[Layout, Layout]) -> None:
    simulate(*pair)


def test_unchanged_columns_are_not_copied() -> None:
    old = make(64 * 4096, 4096, [[(1, "a", 0)], [(2, "b", 0)]])
    same = make(64 * 4096, 4096, [[(1, "a", 0)], [(2, "b", 0)]])
    assert bytes_to_move(old, same) == 0
    moved_one = make(64 * 4096, 4096, [[(1, "a", 0)], [(3, "c", 0)]])
    assert bytes_to_move(old, moved_one) == 32 * 4096
    wider = make(64 * 4096, 4096, [[(5, "a", 0)], [(6, "b", 0)], [(7, "c", 0)], [(8, "d", 0)]])
    assert bytes_to_move(old, wider) == 64 * 4096
