"""The one seam between the storage agent and the operating system's less common calls.

Everything that is not plain ``os.pread``/``os.pwrite`` lives here (fallocate flags, block-device
ioctls, sysfs discovery), so tests substitute this module and nothing else.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import pathlib
import stat
import struct
from dataclasses import dataclass
from typing import Iterator, Optional

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

BLKGETSIZE64 = 0x80081272
BLKZEROOUT = 0x127F
BLKDISCARD = 0x1277
BLKSSZGET = 0x1268

SYS_BLOCK = pathlib.Path("/sys/block")


def is_block_device(fd: int) -> bool:
    return stat.S_ISBLK(os.fstat(fd).st_mode)


def device_size(fd: int) -> int:
    """Size in bytes of an open file or block device."""
    if is_block_device(fd):
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        return int(struct.unpack("Q", buf)[0])
    return os.fstat(fd).st_size


def logical_block_size(fd: int) -> int:
    if is_block_device(fd):
        buf = fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4)
        return int(struct.unpack("I", buf)[0])
    return 512


def zero_range(fd: int, offset: int, length: int) -> None:
    """Make ``[offset, offset+length)`` read as zeros, releasing the space where the OS can."""
    if length <= 0:
        return
    if is_block_device(fd):
        fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, length))
        return
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
        raise OSError(err, os.strerror(err))
    # file system without hole punching: write zeros
    chunk = bytes(min(length, 1 << 20))
    pos, end = offset, offset + length
    while pos < end:
        pos += os.pwrite(fd, chunk[: min(len(chunk), end - pos)], pos)


def reserve_zeroed(fd: int, offset: int, length: int) -> None:
    """Make ``[offset, offset+length)`` read as zeros *and* own its space, so later writes cannot
    fail with ENOSPC (a file drive is sparse). Raises OSError(ENOSPC) when the file system is full.
    Block devices own their space already: zeroed only."""
    if length <= 0:
        return
    if is_block_device(fd):
        zero_range(fd, offset, length)
        return
    if _libc.fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise OSError(err, os.strerror(err))
    zero_range(fd, offset, length)  # no ZERO_RANGE here: punch, then allocate
    if _libc.fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(err, os.strerror(err))


def punch(fd: int, offset: int, length: int) -> None:
    """Give a released range's space back to the file system (file drives; a no-op elsewhere)."""
    if length <= 0 or is_block_device(fd):
        return
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(err, os.strerror(err))


def data_ranges(fd: int, offset: int, length: int) -> list[tuple[int, int]]:
    """Ranges of ``[offset, offset+length)`` that may hold written data: SEEK_DATA/SEEK_HOLE on files
    (holes, punched and never-written ranges read as zeros); the whole range on block devices or
    where the file system cannot tell."""
    end = offset + length
    if length <= 0:
        return []
    if is_block_device(fd):
        return [(offset, length)]
    out, pos = [], offset
    try:
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos
                    break
                raise
            if start >= end:
                break
            stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
            out.append((start, stop - start))
            pos = stop
    except OSError:
        return [(offset, length)]
    return out


FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNWRITTEN = 0x800
_FIEMAP_HEAD = struct.Struct("=QQIIII")
_FIEMAP_EXTENT = struct.Struct("=QQQQQIIII")


def written_ranges(fd: int, offset: int, length: int) -> list[tuple[int, int]]:
    """Ranges of ``[offset, offset+length)`` written to, for reporting (``nvpool volume du``): the file's
    extents that are neither holes nor preallocated-unwritten, after writing back what is in the page
    cache (FIEMAP with FIEMAP_FLAG_SYNC). ``data_ranges`` cannot tell: on ext4, SEEK_DATA counts pages
    that mere reads of preallocated space brought into the cache as data. Falls back to
    ``data_ranges`` where FIEMAP is not supported; the whole range on block devices."""
    if length <= 0:
        return []
    if is_block_device(fd):
        return [(offset, length)]
    end = offset + length
    out: list[tuple[int, int]] = []
    pos, flags, batch = offset, FIEMAP_FLAG_SYNC, 256
    try:
        while pos < end:
            buf = bytearray(_FIEMAP_HEAD.size + batch * _FIEMAP_EXTENT.size)
            _FIEMAP_HEAD.pack_into(buf, 0, pos, end - pos, flags, 0, batch, 0)
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
            flags = 0  # written back once
            mapped = _FIEMAP_HEAD.unpack_from(buf, 0)[3]
            if mapped == 0:
                break
            last = False
            for i in range(mapped):
                logical, _phys, n, _r1, _r2, fe_flags, _a, _b, _c = _FIEMAP_EXTENT.unpack_from(
                    buf, _FIEMAP_HEAD.size + i * _FIEMAP_EXTENT.size)
                s, e = max(logical, offset), min(logical + n, end)
                if e > s and not fe_flags & FIEMAP_EXTENT_UNWRITTEN:
                    if out and out[-1][0] + out[-1][1] == s:
                        out[-1] = (out[-1][0], e - out[-1][0])
                    else:
                        out.append((s, e - s))
                pos = max(pos, logical + n)
                last = bool(fe_flags & FIEMAP_EXTENT_LAST)
            if last:
                break
    except OSError:
        return data_ranges(fd, offset, length)
    return out


@dataclass(frozen=True)
class NvmeNamespace:
    path: str  # /dev/nvme0n1
    model: str
    serial: str
    size: int


def device_identity(path: str, sys_block: pathlib.Path = SYS_BLOCK) -> tuple[str, str]:
    """(model, serial) of a block device from sysfs; ("file", "") for a file-backed drive."""
    real = os.path.realpath(path)
    if not real.startswith("/dev/"):
        return "file", ""
    dev = sys_block / os.path.basename(real)

    def read(rel: str) -> str:
        try:
            return (dev / rel).read_text().strip()
        except OSError:
            return ""

    return read("device/model"), read("device/serial")


#: (offset, magic, what) of on-disk signatures that mean "this device holds something already"
SIGNATURES = (
    (0x438, b"\x53\xef", "an ext2/3/4 file system"),
    (0, b"XFSB", "an XFS file system"),
    (0x10040, b"_BHRfS_M", "a btrfs file system"),
    (4086, b"SWAPSPACE2", "swap space"),
    (512, b"LABELONE", "an LVM physical volume"),
    (512, b"EFI PART", "a GPT partition table"),
    (0x1000, b"\xfc\x4e\x2b\xa9", "a Linux RAID member"),
    (510, b"\x55\xaa", "an MBR partition table"),
)


def in_use(path: str, sys_block: pathlib.Path = SYS_BLOCK, mounts: str = "/proc/mounts",
           own_magic: bytes = b"") -> Optional[str]:
    """Why a block device must not be taken over (mounted, partitioned, held by device-mapper or
    RAID, or carrying a file system or other signature), or None. A device carrying ``own_magic`` at
    offset 0 (an nvpool label) is ours and is not in use."""
    name = os.path.basename(os.path.realpath(path))
    dev = sys_block / name
    try:
        with open(mounts) as f:
            mounted = [ln.split()[:2] for ln in f if ln.strip()]
    except OSError:
        mounted = []
    for src, target in mounted:
        base = os.path.basename(os.path.realpath(src)) if src.startswith("/dev/") else ""
        if base == name or (base.startswith(name + "p") and base[len(name) + 1 :].isdigit()):
            return f"mounted on {target}" + (" (the boot device)" if target == "/" else "")
    if dev.is_dir():
        parts = sorted(p.name for p in dev.glob(f"{name}p*"))
        if parts:
            return f"has partitions ({', '.join(parts[:3])})"
        holders = sorted(p.name for p in (dev / "holders").glob("*")) if (dev / "holders").is_dir() else []
        if holders:
            return f"is held by {', '.join(holders)} (device-mapper, LVM or RAID)"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        return f"cannot be opened ({exc.strerror})"
    try:
        head = os.pread(fd, 0x10048, 0)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    finally:
        os.close(fd)
    if own_magic and head.startswith(own_magic):
        return None
    for off, magic, what in SIGNATURES:
        if head[off : off + len(magic)] == magic:
            return f"holds {what}"
    return None


def discover_nvme(sys_block: pathlib.Path = SYS_BLOCK) -> Iterator[NvmeNamespace]:
    """NVMe namespaces the kernel shows (``/sys/block/nvme*n*``), partitions excluded."""
    if not sys_block.is_dir():
        return
    for dev in sorted(sys_block.glob("nvme*n*")):
        name = dev.name
        if "p" in name.split("n", 1)[1]:  # nvme0n1p1 is a partition
            continue

        def read(rel: str, dev: pathlib.Path = dev) -> str:
            try:
                return (dev / rel).read_text().strip()
            except OSError:
                return ""

        sectors = read("size")
        yield NvmeNamespace(
            path=f"/dev/{name}",
            model=read("device/model"),
            serial=read("device/serial"),
            size=int(sectors) * 512 if sectors.isdigit() else 0,
        )
