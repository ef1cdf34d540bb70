"""Placement planner properties (hypothesis)."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nvpool.proto.layout import ALLOC_ALIGN, Layout, column_length_for
from nvpool.pool.migration import bytes_to_move
from nvpool.pool.planner import (
    DriveSpace,
    default_columns,
    imbalance,
    plan_columns,
    plan_grow,
    plan_rebalance,
    with_allocations,
)
from nvpool.proto.errors import CapacityError

MiB = ALLOC_ALIGN


@st.composite
def pools(draw: st.DrawFn) -> list[DriveSpace]:
    hosts = draw(st.integers(1, 6))
    drives = []
    for h in range(hosts):
        for d in range(draw(st.integers(1, 3))):
            cap = draw(st.integers(8, 64)) * MiB
            used = []
            pos = 2 * MiB
            for _ in range(draw(st.integers(0, 3))):  # some existing allocations with gaps
                gap, n = draw(st.integers(0, 4)) * MiB, draw(st.integers(1, 6)) * MiB
                if pos + gap + n > 2 * MiB + cap:
                    break
                used.append((pos + gap, n))
                pos += gap + n
            drives.append(DriveSpace(f"h{h}d{d}", f"host{h}", cap, 2 * MiB, tuple(used), draw(st.booleans()) or d > 0))
    return drives


def check_no_overlap_and_capacity(drives: list[DriveSpace], layout_extents: list) -> None:  # type: ignore[type-arg]
    by = {d.drive_id: d for d in drives}
    per_drive: dict[str, list[tuple[int, int]]] = {d: list(by[d].used) for d in by}
    for e in layout_extents:
        d = by[e.drive_id]
        assert e.drive_offset % ALLOC_ALIGN == 0 and e.length % ALLOC_ALIGN == 0
        assert d.data_offset <= e.drive_offset and e.drive_offset + e.length <= d.data_offset + d.capacity
        per_drive[e.drive_id].append((e.drive_offset, e.length))
    for ranges in per_drive.values():
        ranges.sort()
        for (a, n), (b, _) in zip(ranges, ranges[1:]):
            assert a + n <= b, "extents overlap"


def fits(drives: list[DriveSpace], col_len: int) -> int:
    """How many columns of ``col_len`` bytes the usable drives could take (a column may be split)."""
    n = -(-col_len // ALLOC_ALIGN) * ALLOC_ALIGN
    return sum(d.free_bytes() // n for d in drives if d.usable and d.capacity > 0)


@settings(max_examples=200, deadline=None)
@given(pools(), st.integers(1, 200), st.sampled_from([64 * 1024, MiB]), st.integers(0, 40), st.integers(0, 99))
def test_plan_properties(drives: list[DriveSpace], size_mib: int, su: int, width: int, seed: int) -> None:
    size = size_mib * MiB
    usable = [d for d in drives if d.usable]
    w = width or default_columns(size, su, usable)
    col_len = column_length_for(size, su, w)
    try:
        cols, next_id = plan_columns(drives, size, su, width, seed, 100)
    except CapacityError:
        # justified: the usable drives really cannot hold w columns of this length
        assert fits(drives, col_len) < w
        return
    assert len(cols) == w
    if not width:  # the default spreads over every usable drive that has room, one column each at least
        assert w >= min(len(usable), -(-size // ALLOC_ALIGN), -(-size // su))
    lay = Layout(1, "v", 1, size, su, cols)
    lay.validate()
    exts = list(lay.extents())
    assert next_id == 100 + len(exts) and sorted(e.extent_id for e in exts) == list(range(100, next_id))
    check_no_overlap_and_capacity(drives, exts)
    by = {d.drive_id: d for d in drives}
    col_drives = [c.extents[0].drive_id for c in cols]
    assert all(by[d].usable for d in col_drives) and all(len({e.drive_id for e in c.extents}) == 1 for c in cols)
    # servers are used evenly: a server that still has room for a column has at most one fewer than any
    hosts = Counter(by[d].host for d in col_drives)
    after = with_allocations(drives, exts)
    n = -(-col_len // ALLOC_ALIGN) * ALLOC_ALIGN
    roomy = {d.host for d in after if d.usable and d.free_bytes() >= n}
    for h in roomy:
        assert hosts.get(h, 0) >= max(hosts.values()) - 1, f"server {h} has room but few columns: {hosts}"
    # deterministic for a given seed
    assert plan_columns(drives, size, su, width, seed, 100) == (cols, next_id)


def test_default_columns() -> None:
    eight = [DriveSpace(f"d{i}", f"h{i}", 64 * MiB, 0) for i in range(8)]
    assert default_columns(1 << 30, MiB, eight) == 32  # many more columns than drives
    assert default_columns(48 * MiB, 64 * 1024, eight) == 12  # at least MIN_COLUMN_BYTES each
    assert default_columns(4 * MiB, MiB, eight) == 4 and default_columns(16 * MiB, MiB, eight) == 8
    assert default_columns(4096, 4096, eight) == 1  # a tiny volume: one column, no 8 x 1 MiB of waste
    big = [DriveSpace(f"d{i}", f"h{i}", 64 * MiB, 0) for i in range(300)]
    assert default_columns(1 << 40, MiB, big) == 256


def test_consecutive_columns_alternate_servers() -> None:
    drives = [DriveSpace(f"h{h}d{d}", f"h{h}", 1024 * MiB, 0) for h in range(3) for d in range(2)]
    cols, _ = plan_columns(drives, 96 * MiB, MiB, 24, 7, 1)
    hosts = [c.extents[0].drive_id[:2] for c in cols]
    assert all(a != b for a, b in zip(hosts, hosts[1:]))
    assert Counter(hosts) == {"h0": 8, "h1": 8, "h2": 8}
    assert Counter(c.extents[0].drive_id for c in cols) == {d.drive_id: 4 for d in drives}


@settings(max_examples=80, deadline=None)
@given(pools(), st.integers(1, 20), st.integers(1, 20), st.integers(0, 9))
def test_grow_keeps_existing_mapping(drives: list[DriveSpace], size_mib: int, more_mib: int, seed: int) -> None:
    su = 256 * 1024
    try:
        cols, nid = plan_columns(drives, size_mib * MiB, su, 0, seed, 1)
    except CapacityError:
        return
    lay = Layout(1, "v", 1, size_mib * MiB, su, cols)
    after = with_allocations(drives, lay.extents())
    try:
        grown, _ = plan_grow(lay, after, (size_mib + more_mib) * MiB, nid)
    except CapacityError:
        return
    grown.validate()
    assert grown.generation == 2 and grown.width == lay.width
    for c_old, c_new in zip(lay.columns, grown.columns):
        assert c_new.extents[: len(c_old.extents)] == c_old.extents
    probe = [0, lay.size // 3, lay.size - 1]
    for off in probe:
        (a,), (b,) = list(lay.map(off, 1)), list(grown.map(off, 1))
        assert (a.extent, a.extent_offset) == (b.extent, b.extent_offset)
    check_no_overlap_and_capacity(after, [e for e in grown.extents() if e.extent_id >= nid])


def test_capacity_error_names_sizes_and_changes_nothing() -> None:
    drives = [DriveSpace("a", "h1", 16 * MiB, 0), DriveSpace("b", "h2", 16 * MiB, 0)]
    with pytest.raises(CapacityError, match="bytes free"):
        plan_columns(drives, 64 * MiB, MiB, 0, 1, 1)
    with pytest.raises(CapacityError, match="no usable drives"):
        plan_columns([DriveSpace("a", "h1", 16 * MiB, 0, usable=False)], MiB, MiB, 0, 1, 1)
    assert drives[0].used == () and drives[1].used == ()
    # more columns than drives is fine: drives hold several columns of a volume
    cols, _ = plan_columns(drives, 8 * MiB, MiB, 4, 1, 1)
    assert Counter(c.extents[0].drive_id for c in cols) == {"a": 2, "b": 2}


def test_uneven_hosts_spread_evenly_and_emptiest_first() -> None:
    drives = [DriveSpace(f"h0d{i}", "h0", 64 * MiB, 0) for i in range(4)] + [
        DriveSpace("h1d0", "h1", 64 * MiB, 0, ((0, 32 * MiB),)), DriveSpace("h1d1", "h1", 64 * MiB, 0)]
    cols, _ = plan_columns(drives, 8 * MiB, MiB, 4, 5, 1)
    assert Counter(c.extents[0].drive_id[:2] for c in cols) == {"h0": 2, "h1": 2}
    assert len({c.extents[0].drive_id for c in cols}) == 4  # spread over drives within a server too
    cols, _ = plan_columns(drives, 8 * MiB, MiB, 2, 5, 1)
    assert Counter(c.extents[0].drive_id[:2] for c in cols) == {"h0": 1, "h1": 1}
    assert "h1d0" not in {c.extents[0].drive_id for c in cols}  # the fuller drive on h1 is skipped
    assert imbalance(drives) > 0


# ---------------------------------------------------------------------- rebalance: move whole columns
def place(drives: list[DriveSpace], size: int, width: int, seed: int = 1) -> tuple[Layout, list[DriveSpace], int]:
    cols, nid = plan_columns(drives, size, MiB, width, seed, 1)
    lay = Layout(1, "v", 1, size, MiB, cols)
    return lay, with_allocations(drives, lay.extents()), nid


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.integers(1, 64), st.integers(0, 3), st.integers(0, 99))
def test_rebalance_moves_the_fewest_columns_to_even_shares(
    hosts: int, new_hosts: int, width: int, drained: int, seed: int
) -> None:
    old = [DriveSpace(f"h{h}", f"h{h}", 512 * MiB, 0) for h in range(hosts)]
    lay, placed, nid = place(old, width * MiB, width, seed)
    new = [DriveSpace(f"n{h}", f"n{h}", 512 * MiB, 0) for h in range(new_hosts)]
    pool = placed + new
    if drained and drained < hosts:  # some old servers drain at the same time
        pool = [DriveSpace(d.drive_id, d.host, d.capacity, d.data_offset, d.used, int(d.host[1:]) >= drained
                           if d.host.startswith("h") else True) for d in pool]
    usable = {d.drive_id for d in pool if d.usable}
    cols, nid2 = plan_rebalance(lay, pool, nid, seed)
    before = Counter(c.extents[0].drive_id for c in lay.columns)
    q, r = divmod(width, len(usable))
    must = sum(n for d, n in before.items() if d not in usable)
    surplus = sum(max(0, n - (q + (1 if r else 0))) for d, n in before.items() if d in usable)
    final = cols if cols is not None else lay.columns
    after = Counter(c.extents[0].drive_id for c in final)
    # every usable drive ends with its even share (space is ample here), and nothing is left behind
    assert set(after) <= usable
    shares = sorted(after.get(d, 0) for d in usable)
    assert shares == sorted([q] * (len(usable) - r) + [q + 1] * r), (before, after)
    moved = [i for i, (a, b) in enumerate(zip(lay.columns, final)) if a != b]
    assert (cols is None) == (not moved)
    # the fewest moves: what must leave, what is above the share, and no more than the raw surplus
    assert must + surplus <= len(moved) <= must + sum(max(0, n - q) for d, n in before.items() if d in usable)
    if cols is not None:
        target = Layout(1, "v", 2, lay.size, MiB, cols)
        target.validate()
        new_exts = [e for e in target.extents() if e.extent_id >= nid]
        assert nid2 == nid + len(new_exts) and len(new_exts) >= len(moved)
        check_no_overlap_and_capacity(pool, new_exts)


def test_growing_four_servers_to_five_moves_about_a_fifth() -> None:
    four = [DriveSpace(f"h{h}", f"h{h}", 1024 * MiB, 0) for h in range(4)]
    lay, placed, nid = place(four, 1024 * MiB, 0)
    assert lay.width == 32 and Counter(c.extents[0].drive_id for c in lay.columns) == {d.drive_id: 8 for d in four}
    cols, _ = plan_rebalance(lay, placed + [DriveSpace("h4", "h4", 1024 * MiB, 0)], nid)
    assert cols is not None
    target = Layout(1, "v", 2, lay.size, MiB, cols)
    moved = bytes_to_move(lay, target)
    assert moved <= 0.30 * lay.size, moved / lay.size
    assert {c.extents[0].drive_id for c in cols} == {"h0", "h1", "h2", "h3", "h4"}  # still every server
    # already balanced: nothing moves
    again = with_allocations(with_allocations(placed + [DriveSpace("h4", "h4", 1024 * MiB, 0)],
                                              target.extents()), lay.extents(), -1)
    assert plan_rebalance(target, again, 10_000)[0] is None


def test_drain_after_growth_moves_only_the_drained_columns() -> None:
    """The trap of issue 10.7: after a full-width rebalance, draining a server still works."""
    three = [DriveSpace(f"h{h}", f"h{h}", 256 * MiB, 0) for h in range(3)]
    lay, placed, nid = place(three, 48 * MiB, 0)
    drained = [DriveSpace(d.drive_id, d.host, d.capacity, d.data_offset, d.used, d.host != "h0") for d in placed]
    cols, _ = plan_rebalance(lay, drained, nid)
    assert cols is not None
    assert "h0" not in {c.extents[0].drive_id for c in cols}
    moved = [i for i, (a, b) in enumerate(zip(lay.columns, cols)) if a != b]
    assert moved == [i for i, c in enumerate(lay.columns) if c.extents[0].drive_id == "h0"]
