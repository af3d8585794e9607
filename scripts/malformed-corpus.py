#!/usr/bin/env python3
"""Generates a corpus of malformed qcow2 images and classifies each one with qemu-img.

Usage: scripts/malformed-corpus.py OUTDIR      (QEMU_IMG=... overrides the oracle's path)

Every image is derived from a valid one -- the reference images in testdata/ (qemu-img 10.0.2)
plus one with an internal snapshot that this script makes with qemu-img -- by a named mutation:
header field changes, truncation, oversized tables, overlapping tables, loops (backing files
naming themselves or each other, header extension chains running off the header cluster), entries
past the end of the file, unaligned offsets, absurd compressed-cluster descriptors and seeded
random bit flips in metadata clusters.

qemu-img is the oracle. For each candidate the script runs `info`, `check`, `map` and
`convert -O raw` (working directory OUTDIR, relative names, the format probed unless the manifest
gives one) and classifies it:

  open    qemu-img info fails: the image cannot be opened at all;
  inside  it opens, but qemu-img check reports corruption or errors (exit status 1, 2 or 3),
          or does not finish (backing-file loops: qemu-img follows them until it is killed);
  read    it opens and checks clean, but map or convert fails (a broken read path).

Candidates on which all four commands succeed are valid, not malformed, and are dropped. The
manifest (OUTDIR/manifest.json) lists every image kept with its category, mutation, base image,
class, companion files (backing files it names) and qemu-img's exit status, wall time and peak RSS
for each of the four commands, so the classes are facts measured by this run, not guesses.

Only the Python standard library is used, and the output is deterministic: the random bit flips
come from fixed seeds, and the oracle's results are collected in a fixed order.
"""

import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
TESTDATA = os.path.join(HERE, "..", "testdata")
QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")
# A qemu-img run that takes longer than this (seconds) is killed and recorded as a timeout. Every
# run on a well-formed or merely corrupt image takes milliseconds; qemu-img only runs this long on
# backing-file loops, which it follows without end (its memory grows meanwhile).
ORACLE_TIMEOUT = float(os.environ.get("MALFORMED_ORACLE_TIMEOUT", "2"))

OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63
COMPRESSED = 1 << 62

# Header field offsets (qcow2 spec, big-endian).
MAGIC, VERSION, BACKING_OFF, BACKING_SIZE, CLUSTER_BITS, SIZE = 0, 4, 8, 16, 20, 24
CRYPT, L1_SIZE, L1_OFF, RT_OFF, RT_CLUSTERS = 32, 36, 40, 48, 56
NB_SNAP, SNAP_OFF, INCOMPAT, COMPAT, AUTOCLEAR = 60, 64, 72, 80, 88
REFCOUNT_ORDER, HEADER_LEN, COMPRESSION_TYPE = 96, 100, 104

EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857


def u32(b, off):
    return struct.unpack_from(">I", b, off)[0]


def u64(b, off):
    return struct.unpack_from(">Q", b, off)[0]


def p32(b, off, v):
    struct.pack_into(">I", b, off, v & 0xFFFFFFFF)


def p64(b, off, v):
    struct.pack_into(">Q", b, off, v & 0xFFFFFFFFFFFFFFFF)


class Image:
    """A parsed valid qcow2 image: the bytes plus where its metadata lives."""

    def __init__(self, name, data):
        self.name = name
        self.data = bytes(data)
        b = self.data
        self.version = u32(b, VERSION)
        self.cluster_bits = u32(b, CLUSTER_BITS)
        self.cs = 1 << self.cluster_bits
        self.l1_size = u32(b, L1_SIZE)
        self.l1_off = u64(b, L1_OFF)
        self.rt_off = u64(b, RT_OFF)
        self.rt_clusters = u32(b, RT_CLUSTERS)
        self.header_len = u32(b, HEADER_LEN) if self.version >= 3 else 72
        incompat = u64(b, INCOMPAT) if self.version >= 3 else 0
        self.extended_l2 = bool(incompat & 16)
        self.l2_entry = 16 if self.extended_l2 else 8
        self.l1 = [u64(b, self.l1_off + 8 * i) for i in range(self.l1_size)]
        self.l2_tables = [e & OFFSET_MASK for e in self.l1 if e & OFFSET_MASK]
        self.refblocks = [
            u64(b, self.rt_off + 8 * i)
            for i in range(self.rt_clusters * self.cs // 8)
            if u64(b, self.rt_off + 8 * i)
        ]
        # Guest-visible L2 entries: (offset of the entry in the file, entry value).
        self.l2_entries = []
        for t in self.l2_tables:
            for i in range(self.cs // self.l2_entry):
                e = u64(b, t + i * self.l2_entry)
                if e:
                    self.l2_entries.append((t + i * self.l2_entry, e))
        self.data_entries = [(o, e) for o, e in self.l2_entries if not e & COMPRESSED and e & OFFSET_MASK]
        self.compressed_entries = [(o, e) for o, e in self.l2_entries if e & COMPRESSED]
        # Header extensions: (offset of the extension header, type, length).
        self.extensions = []
        off = self.header_len
        while self.version >= 3 and off + 8 <= self.cs:
            t, n = u32(b, off), u32(b, off + 4)
            if t == 0:
                break
            self.extensions.append((off, t, n))
            off += 8 + ((n + 7) & ~7)
        self.ext_end = off  # offset of the end-of-extensions marker


class Candidate:
    def __init__(self, category, mutation, base, data, fmt=None, extra=None):
        self.category = category
        self.mutation = mutation
        self.base = base
        self.data = data
        self.fmt = fmt
        # Extra files written next to the image: {name: bytes}. Names containing "{self}" are
        # resolved once the image's own file name is known.
        self.extra = extra or {}
        self.file = None
        self.companions = []


def load_bases(workdir):
    names = [
        "v3-default",
        "v2",
        "cluster4k",
        "extended-l2",
        "compressed-zlib",
        "compressed-zstd",
        "backing-overlay",
        "zero",
        "refcount1",
        "refcount64",
        "lazy-refcounts",
    ]
    bases = {}
    for n in names:
        with open(os.path.join(TESTDATA, n + ".qcow2"), "rb") as f:
            bases[n] = Image(n, f.read())
    # An image with an internal snapshot, made here with qemu-img (testdata/ has none).
    raw = os.path.join(workdir, "snap-src.raw")
    with open(raw, "wb") as f:
        f.truncate(1 << 20)
        f.seek(0)
        f.write(bytes([0x5A]) * 12288)
        f.seek(512 << 10)
        f.write(bytes([0x5B]) * 4096)
    snap = os.path.join(workdir, "snapshot.qcow2")
    for args in (
        ["convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", raw, snap],
        ["snapshot", "-c", "s1", snap],
    ):
        subprocess.run([QEMU_IMG] + args, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    with open(snap, "rb") as f:
        data = bytearray(f.read())
    # The snapshot table entry carries timestamps (date_sec, date_nsec, vm_clock_nsec at bytes
    # 16..32): zero them so the corpus is deterministic.
    so = u64(data, SNAP_OFF)
    struct.pack_into(">IIQ", data, so + 16, 0, 0, 0)
    bases["snapshot"] = Image("snapshot", data)
    return bases


def mutate(img, edits):
    """Returns a copy of img's bytes with edits applied: (offset, width, value) or a callable."""
    b = bytearray(img.data)
    for e in edits:
        if callable(e):
            e(b)
        else:
            off, width, value = e
            if width == 4:
                p32(b, off, value)
            elif width == 8:
                p64(b, off, value)
            elif width == 1:
                b[off] = value & 0xFF
    return b


def candidates(bases):
    out = []

    def add(category, mutation, base, edits=(), data=None, fmt=None, extra=None):
        img = bases[base]
        d = data if data is not None else mutate(img, edits)
        out.append(Candidate(category, mutation, base, bytes(d), fmt, extra))

    # --- header: every validated field, on a version 3 image (64 KiB clusters) and a version 2 one.
    for base in ("v3-default", "v2"):
        img = bases[base]
        eof = len(img.data)
        add("header", "magic-bitflip", base, [(MAGIC, 4, u32(img.data, 0) ^ 0x00000100)], fmt="qcow2")
        add("header", "magic-probed", base, [(MAGIC, 4, u32(img.data, 0) ^ 0x01000000)])
        for v in (1, 4, 0xFFFFFFFF):
            add("header", "version=%#x" % v, base, [(VERSION, 4, v)])
        add("header", "version-swap", base, [(VERSION, 4, 5 - img.version)])
        for v in (8, img.cluster_bits - 1, img.cluster_bits + 1, 22, 0xFFFFFFFF):
            add("header", "cluster_bits=%d" % v, base, [(CLUSTER_BITS, 4, v)])
        # size: beyond what the L1 table covers, beyond qemu's limits, unaligned past the end
        covered = img.l1_size * (img.cs // img.l2_entry) * img.cs
        for v in (covered + img.cs, 1 << 62, 0xFFFFFFFFFFFFFFFF):
            add("header", "size=%#x" % v, base, [(SIZE, 8, v)])
        add("header", "size=0-with-data", base, [(SIZE, 8, 0)])
        for v in (1, 2, 3):
            add("header", "crypt_method=%#x" % v, base, [(CRYPT, 4, v)])
        for v in (0, img.l1_size + 1, 0x10000000, 0xFFFFFFFF):
            add("header", "l1_size=%#x" % v, base, [(L1_SIZE, 4, v)])
        for v in (0, img.l1_off + 8, eof + (1 << 40), 1 << 62):
            add("header", "l1_table_offset=%#x" % v, base, [(L1_OFF, 8, v)])
        for v in (0, img.rt_off + 8, 1 << 62):
            add("header", "refcount_table_offset=%#x" % v, base, [(RT_OFF, 8, v)])
        for v in (0, eof // img.cs + 10, 0xFFFFFFFF):
            add("header", "refcount_table_clusters=%#x" % v, base, [(RT_CLUSTERS, 4, v)])
        add("header", "nb_snapshots=1-offset=0", base, [(NB_SNAP, 4, 1)])
        add("header", "nb_snapshots=1-offset=eof", base, [(NB_SNAP, 4, 1), (SNAP_OFF, 8, eof)])
        add("header", "snapshots_offset-unaligned", base, [(NB_SNAP, 4, 1), (SNAP_OFF, 8, img.cs + 8)])
        add("header", "backing_offset=eof", base, [(BACKING_OFF, 8, eof), (BACKING_SIZE, 4, 8)])
        add("header", "backing_offset=huge", base, [(BACKING_OFF, 8, 1 << 62), (BACKING_SIZE, 4, 8)])
        add("header", "backing_size=1024", base, [(BACKING_OFF, 8, 512), (BACKING_SIZE, 4, 1024)])
        add("header", "backing-name-in-header-fields", base, [(BACKING_OFF, 8, 8), (BACKING_SIZE, 4, 16)])
        add("header", "backing-name-crosses-cluster", base, [(BACKING_OFF, 8, img.cs - 4), (BACKING_SIZE, 4, 16)])
        if img.version >= 3:
            for v in (0, 4, 5, 7, 0xFFFFFFFF):
                add("header", "refcount_order=%#x" % v, base, [(REFCOUNT_ORDER, 4, v)])
            for v in (0, 71, 103, 105, img.cs + 8, 0xFFFFFFFF):
                add("header", "header_length=%#x" % v, base, [(HEADER_LEN, 4, v)])
            for bit in (2, 3, 4, 5, 63):
                add("header", "incompatible-bit%d" % bit, base, [(INCOMPAT, 8, u64(img.data, INCOMPAT) | 1 << bit)])
            for v in (1, 2, 0xFF):
                add("header", "compression_type=%#x" % v, base, [(COMPRESSION_TYPE, 1, v)])

    # zstd image: its compression type field and incompatible bit disagree
    z = bases["compressed-zstd"]
    add("header", "zstd-bit-cleared", "compressed-zstd", [(INCOMPAT, 8, u64(z.data, INCOMPAT) & ~8)])
    add("header", "zstd-type=zlib", "compressed-zstd", [(COMPRESSION_TYPE, 1, 0)])
    add("header", "zstd-type=7", "compressed-zstd", [(COMPRESSION_TYPE, 1, 7)])
    # extended L2 image without the bit (and so reading 16-byte entries as 8-byte ones)
    e = bases["extended-l2"]
    add("header", "extended-l2-bit-cleared", "extended-l2", [(INCOMPAT, 8, u64(e.data, INCOMPAT) & ~16)])
    # lazy refcounts image marked dirty, with a refcount zeroed (qemu repairs it only read-write)
    lz = bases["lazy-refcounts"]
    rb = lz.refblocks[0]
    add("header", "lazy-dirty", "lazy-refcounts", [(INCOMPAT, 8, 1)])
    add("header", "lazy-dirty-refcount-zeroed", "lazy-refcounts", [(INCOMPAT, 8, 1), (rb, 1, 0), (rb + 1, 1, 0)])
    add("header", "corrupt-bit-and-bad-l2", "cluster4k", [(INCOMPAT, 8, 2), (bases["cluster4k"].data_entries[0][0], 8, 1 << 55)])

    # --- truncation
    for base in ("v3-default", "cluster4k", "compressed-zlib", "backing-overlay"):
        img = bases[base]
        cuts = {
            "inside-header": 48,
            "before-l1": img.l1_off,
            "inside-l1": img.l1_off + 4,
            "inside-refcount-table": img.rt_off + 4,
            "inside-refcount-block": img.refblocks[0] + 1,
            "inside-l2": img.l2_tables[0] + 8,
            "before-last-cluster": len(img.data) - img.cs,
            "inside-last-cluster": len(img.data) - img.cs // 2 - 3,
        }
        if img.data_entries:
            cuts["inside-first-data-cluster"] = (img.data_entries[0][1] & OFFSET_MASK) + 100
        if base == "v3-default":
            cuts["magic-only"] = 4
            cuts["two-bytes"] = 2
        for what, n in sorted(cuts.items()):
            add("truncation", what, base, data=img.data[:n], fmt="qcow2" if n < 4 else None)

    # --- oversized tables
    for base in ("v3-default", "cluster4k"):
        img = bases[base]
        add("oversized", "l1_size=max", base, [(L1_SIZE, 4, 0x7FFFFFFF), (SIZE, 8, 1 << 61)])
        add("oversized", "l1_size=32M-entries", base, [(L1_SIZE, 4, 1 << 25), (SIZE, 8, 1 << 60)])
        add("oversized", "refcount_table_clusters=max", base, [(RT_CLUSTERS, 4, 0xFFFFFFFF)])
        add("oversized", "refcount_table_clusters=16M", base, [(RT_CLUSTERS, 4, 1 << 24)])
        add("oversized", "nb_snapshots=max", base, [(NB_SNAP, 4, 0xFFFFFFFF), (SNAP_OFF, 8, img.cs)])
        add("oversized", "nb_snapshots=65537", base, [(NB_SNAP, 4, 65537), (SNAP_OFF, 8, img.cs)])
        add("oversized", "backing_name=max", base, [(BACKING_OFF, 8, 512), (BACKING_SIZE, 4, 0xFFFFFFFF)])
        add("oversized", "backing_name=64K", base, [(BACKING_OFF, 8, 512), (BACKING_SIZE, 4, 65536)])
        if img.extensions:
            off = img.extensions[0][0]
            add("oversized", "extension-length=max", base, [(off + 4, 4, 0xFFFFFFFF)])
            add("oversized", "extension-length=cluster", base, [(off + 4, 4, img.cs)])
    s = bases["snapshot"]
    so, eof = u64(s.data, SNAP_OFF), len(s.data)
    add("oversized", "snapshot-l1_size=max", "snapshot", [(so + 8, 4, 0x7FFFFFFF)])
    add("oversized", "snapshot-extra-data=max", "snapshot", [(so + 36, 4, 0xFFFFFFFF)])
    add("oversized", "snapshot-id-name-size=max", "snapshot", [(so + 12, 4, 0xFFFFFFFF)])
    add("oversized", "snapshot-nb=2", "snapshot", [(NB_SNAP, 4, 2)])
    add("oversized", "snapshot-nb=max", "snapshot", [(NB_SNAP, 4, 0xFFFFFFFF)])
    add("eof", "snapshot-l1-past-eof", "snapshot", [(so, 8, eof + (1 << 30))])
    add("eof", "snapshots_offset-past-eof", "snapshot", [(SNAP_OFF, 8, eof + s.cs)])
    add("unaligned", "snapshot-l1-unaligned", "snapshot", [(so, 8, u64(s.data, so) + 8)])
    add("overlap", "snapshot-table-on-header", "snapshot", [(SNAP_OFF, 8, 0)])
    add("overlap", "snapshot-l1-on-refcount-table", "snapshot", [(so, 8, s.rt_off)])
    add("header", "snapshot-nb=0-with-table", "snapshot", [(NB_SNAP, 4, 0)])
    bo = bases["backing-overlay"]
    for off, t, n in bo.extensions:
        if t == EXT_BACKING_FORMAT:
            add("oversized", "backing-format-ext-length=max", "backing-overlay", [(off + 4, 4, 0xFFFFFFF0)])
            add("header", "backing-format=nonsense", "backing-overlay", [lambda b, o=off: b.__setitem__(slice(o + 8, o + 13), b"nope\0")])
    add("oversized", "backing_size=1023-past-eof", "backing-overlay", [(BACKING_OFF, 8, len(bo.data) - 10), (BACKING_SIZE, 4, 1023)])

    # --- overlapping tables
    for base in ("cluster4k", "v2", "extended-l2"):
        img = bases[base]
        l1e = img.l1_off
        rb0 = img.refblocks[0]
        add("overlap", "l1-on-header", base, [(L1_OFF, 8, 0)])
        add("overlap", "l1-on-refcount-table", base, [(L1_OFF, 8, img.rt_off)])
        add("overlap", "l1-on-refcount-block", base, [(L1_OFF, 8, rb0)])
        add("overlap", "refcount-table-on-l1", base, [(RT_OFF, 8, img.l1_off)])
        add("overlap", "refcount-table-on-header", base, [(RT_OFF, 8, 0)])
        # An offset of 0 in an L1, L2 or refcount table entry means "unallocated", so the header
        # cluster is reached through the header's own table offsets or through the header
        # cluster's second sector.
        add("overlap", "l1-entry-into-header-cluster", base, [(l1e, 8, COPIED | 512)])
        add("overlap", "l1-entry-to-l1", base, [(l1e, 8, COPIED | img.l1_off)])
        add("overlap", "l1-entry-to-refcount-table", base, [(l1e, 8, COPIED | img.rt_off)])
        add("overlap", "refcount-table-entry-zeroed", base, [(img.rt_off, 8, 0)])
        add("overlap", "refcount-table-entry-into-header-cluster", base, [(img.rt_off, 8, 512)])
        add("overlap", "refcount-block-on-l1", base, [(img.rt_off, 8, img.l1_off)])
        add("overlap", "refcount-block-on-l2", base, [(img.rt_off, 8, img.l2_tables[0])])
        if img.data_entries:
            o, e = img.data_entries[0]
            flags = e & ~OFFSET_MASK
            add("overlap", "l2-entry-into-header-cluster", base, [(o, 8, flags | 512)])
            add("overlap", "l2-entry-to-l1", base, [(o, 8, flags | img.l1_off)])
            add("overlap", "l2-entry-to-refcount-table", base, [(o, 8, flags | img.rt_off)])
            add("overlap", "l2-entry-to-refcount-block", base, [(o, 8, flags | rb0)])
            add("overlap", "l2-entry-to-own-l2", base, [(o, 8, flags | img.l2_tables[0])])
            if len(img.data_entries) > 1:
                o2 = img.data_entries[1][0]
                add("overlap", "two-l2-entries-one-cluster", base, [(o2, 8, e)])
    # two L1 entries sharing one L2 table
    for base in ("cluster4k", "refcount64"):
        img = bases[base]
        add("overlap", "two-l1-entries-one-l2", base, [(img.l1_off + 8, 8, img.l1[0])] if img.l1_size > 1 else [(L1_SIZE, 4, 2), (img.l1_off + 8, 8, img.l1[0])])

    # --- loops
    for base in ("cluster4k", "backing-overlay"):
        img = bases[base]
        pos = img.cs - 128 if img.cs > 4096 else 3072
        nm = b"{self}"
        add("loop", "backing-names-itself", base, [(BACKING_OFF, 8, pos), (BACKING_SIZE, 4, len(nm)), lambda b, p=pos: b.__setitem__(slice(p, p + len(nm)), nm)])
    for base in ("cluster4k",):
        img = bases[base]
        pos = 3072
        nm = b"{peer}"
        add(
            "loop",
            "backing-chain-a-b-a",
            base,
            [(BACKING_OFF, 8, pos), (BACKING_SIZE, 4, len(nm)), lambda b, p=pos: b.__setitem__(slice(p, p + len(nm)), nm)],
            extra={"{peer}": "{self}"},
        )
    for base in ("cluster4k", "backing-overlay"):
        img = bases[base]
        # extensions of length 0 with non-zero types all the way to the cluster's end: no end marker
        def fill_no_end(b, img=img):
            for off in range(img.ext_end, img.cs, 8):
                p32(b, off, 0x12345678)
                p32(b, off + 4, 0)

        add("loop", "extensions-run-off-cluster", base, [fill_no_end])
        # the last extension's length takes the chain past the cluster's end
        last = img.extensions[-1][0] if img.extensions else img.ext_end

        def past_end(b, last=last, img=img):
            p32(b, last, 0x0BADF00D)
            p32(b, last + 4, img.cs - last - 8 + 16)

        add("loop", "extension-past-cluster-end", base, [past_end])
        # header_length placing the first extension 8 bytes before the cluster end
        add("loop", "header_length=cluster-8", base, [(HEADER_LEN, 4, img.cs - 8), (img.cs - 8, 4, 0x0BADF00D), (img.cs - 4, 4, 64)])
    # L2 entries pointing at their own L2 table, L1 entries pointing at the L1 (cycles)
    img = bases["cluster4k"]
    add("loop", "l1-entry-to-l1-all", "cluster4k", [(img.l1_off + 8 * i, 8, COPIED | img.l1_off) for i in range(img.l1_size)])

    # --- entries past the end of the file
    for base in ("cluster4k", "v2", "compressed-zlib", "refcount1"):
        img = bases[base]
        eof = len(img.data)
        far = (eof + (1 << 30)) & ~(img.cs - 1)
        add("eof", "l1-entry-past-eof", base, [(img.l1_off, 8, COPIED | far)])
        add("eof", "l1-entry-max-offset", base, [(img.l1_off, 8, COPIED | (OFFSET_MASK & ~(img.cs - 1)))])
        add("eof", "refcount-table-entry-past-eof", base, [(img.rt_off, 8, far)])
        add("eof", "refcount-table-entry-max", base, [(img.rt_off, 8, OFFSET_MASK & ~(img.cs - 1))])
        add("eof", "refcount-table-second-entry-past-eof", base, [(img.rt_off + 8, 8, far)])
        if img.data_entries:
            o, e = img.data_entries[-1]
            add("eof", "l2-entry-past-eof", base, [(o, 8, (e & ~OFFSET_MASK) | far)])
            add("eof", "l2-entry-max-offset", base, [(o, 8, (e & ~OFFSET_MASK) | (OFFSET_MASK & ~(img.cs - 1)))])
            add("eof", "l2-entry-reserved-bits", base, [(o, 8, e | (1 << 57))])

    # --- unaligned offsets
    for base in ("cluster4k", "v2", "extended-l2"):
        img = bases[base]
        add("unaligned", "l1-entry-unaligned", base, [(img.l1_off, 8, img.l1[0] + 512)])
        add("unaligned", "refcount-table-entry-unaligned", base, [(img.rt_off, 8, img.refblocks[0] + 512)])
        if img.data_entries:
            o, e = img.data_entries[0]
            add("unaligned", "l2-entry-unaligned", base, [(o, 8, e + 512)])
            add("unaligned", "l2-entry-unaligned-zero-flag", base, [(o, 8, e + 512 + (1 if img.version >= 3 else 0))])
        add("unaligned", "l1_table_offset-sector", base, [(L1_OFF, 8, img.l1_off + 512)])
        add("unaligned", "refcount_table_offset-sector", base, [(RT_OFF, 8, img.rt_off + 512)])
    ex = bases["extended-l2"]
    o, e = ex.data_entries[0]
    bm = u64(ex.data, o + 8)
    add("unaligned", "subcluster-alloc-and-zero", "extended-l2", [(o + 8, 8, bm | (bm << 32) | 1 | (1 << 32))])
    add("unaligned", "subcluster-bitmap-on-unallocated", "extended-l2", [(ex.l2_tables[0] + 16 * 100 + 8, 8, 0x0000000F)])

    # --- compressed-cluster descriptors
    for base in ("compressed-zlib", "compressed-zstd"):
        img = bases[base]
        x = 62 - (img.cluster_bits - 8)
        off_mask = (1 << x) - 1
        o, e = img.compressed_entries[0]
        off = e & off_mask
        sectors = (e >> x) & ((1 << (62 - x)) - 1)
        eof = len(img.data)
        add("compressed", "max-sectors", base, [(o, 8, COMPRESSED | off | (((1 << (62 - x)) - 1) << x))])
        add("compressed", "offset-past-eof", base, [(o, 8, COMPRESSED | (eof + (1 << 30)) | (sectors << x))])
        add("compressed", "offset-max", base, [(o, 8, COMPRESSED | off_mask | (sectors << x))])
        add("compressed", "runs-past-eof", base, [(o, 8, COMPRESSED | (eof - 16) | (sectors << x))])
        add("compressed", "on-header", base, [(o, 8, COMPRESSED | 0 | (sectors << x))])
        add("compressed", "on-l1", base, [(o, 8, COMPRESSED | img.l1_off | (sectors << x))])
        add("compressed", "with-copied-flag", base, [(o, 8, e | COPIED)])
        add("compressed", "garbage-payload", base, [lambda b, s=off: b.__setitem__(slice(s, s + 64), bytes(range(64)))])
        add("compressed", "zero-flag-set", base, [(o, 8, e | 1)])
        if len(img.compressed_entries) > 1:
            o2, e2 = img.compressed_entries[1]
            add("compressed", "two-descriptors-one-payload", base, [(o2, 8, e)])
    for base in ("v3-default", "cluster4k"):
        img = bases[base]
        o, e = img.data_entries[0]
        add("compressed", "compressed-bit-on-normal-cluster", base, [(o, 8, e | COMPRESSED)])
        add("compressed", "compressed-bit-in-l1", base, [(img.l1_off, 8, img.l1[0] | COMPRESSED)])

    # --- random bit flips in metadata clusters (fixed seeds)
    rng = random.Random(20250711)
    for base in ("v3-default", "cluster4k", "v2", "compressed-zlib", "extended-l2", "snapshot"):
        img = bases[base]
        regions = {
            "header-cluster": (0, min(img.cs, 4096)),
            "l1": (img.l1_off, img.l1_size * 8),
            "l2": (img.l2_tables[0], img.cs),
            "refcount-table": (img.rt_off, 64),
            "refcount-block": (img.refblocks[0], 512),
        }
        for region, (start, length) in sorted(regions.items()):
            for k in range(2):
                flips = sorted(set((start + rng.randrange(length)) * 8 + rng.randrange(8) for _ in range(rng.choice((1, 2, 4, 8)))))

                def flip(b, flips=flips):
                    for bit in flips:
                        b[bit // 8] ^= 1 << (bit % 8)

                add("bitflip", "%s-%d" % (region, k), base, [flip])
    return out


def run_oracle(args, cwd):
    """Runs qemu-img; returns (exit status or signal as negative, seconds, peak RSS in KiB)."""
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(
            [QEMU_IMG] + args, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=dict(os.environ, LC_ALL="C")
        )
        killed = []
        timer = threading.Timer(ORACLE_TIMEOUT, lambda: (killed.append(1), p.kill()))
        timer.start()
        _, status, ru = os.wait4(p.pid, 0)
        timer.cancel()
        p.returncode = 0  # reaped by wait4: keep Popen from waiting again
    secs = time.monotonic() - t0
    code = "timeout" if killed else os.waitstatus_to_exitcode(status)
    return {"exit": code, "secs": round(secs, 4), "maxrss_kib": ru.ru_maxrss}


def classify(outdir, c):
    fmt = ["-f", c.fmt] if c.fmt else []
    res = {}
    res["info"] = run_oracle(["info"] + fmt + [c.file], outdir)
    res["check"] = run_oracle(["check"] + fmt + [c.file], outdir)
    if res["check"]["exit"] == "timeout":
        # map and convert open the same backing chain that check could not finish opening
        for cmd in ("map", "convert"):
            res[cmd] = {"exit": "not run: check timed out", "secs": 0, "maxrss_kib": 0}
    else:
        res["map"] = run_oracle(["map"] + fmt + [c.file], outdir)
        tmp = tempfile.mkdtemp(prefix="malformed-oracle-")
        try:
            res["convert"] = run_oracle(["convert"] + fmt + ["-O", "raw", c.file, os.path.join(tmp, "out.raw")], outdir)
        finally:
            shutil.rmtree(tmp)
    if res["info"]["exit"] != 0:
        cls = "open"
    elif res["check"]["exit"] not in (0, 63):  # 63: the (probed) format has no checks
        cls = "inside"
    elif res["map"]["exit"] != 0 or res["convert"]["exit"] != 0:
        cls = "read"
    else:
        cls = None
    return cls, res


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: malformed-corpus.py OUTDIR")
    outdir = os.path.abspath(sys.argv[1])
    os.makedirs(outdir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="malformed-bases-")
    try:
        bases = load_bases(work)
    finally:
        shutil.rmtree(work)
    # Backing files the overlay-based images name, by their original relative name.
    shutil.copyfile(os.path.join(TESTDATA, "backing-base.qcow2"), os.path.join(outdir, "backing-base.qcow2"))

    cands = candidates(bases)
    seen = set()
    uniq = []
    for c in cands:
        key = (c.data, c.fmt, tuple(sorted(c.extra.items())))
        if key in seen:
            continue
        seen.add(key)
        uniq.append(c)
    counters = {}
    for c in uniq:
        n = counters.get(c.category, 0)
        counters[c.category] = n + 1
        c.file = "%s-%03d.qcow2" % (c.category, n)
        data = c.data
        if b"{self}" in data or b"{peer}" in data:
            me = c.file.encode()
            peer = c.file.replace(".qcow2", "-peer.qcow2").encode()
            # Names are written in place of the placeholder; the length field is fixed up.
            i = data.find(b"{self}") if b"{self}" in data else data.find(b"{peer}")
            name = me if b"{self}" in data else peer
            b = bytearray(data)
            b[i : i + len(name)] = name
            p32(b, BACKING_SIZE, len(name))
            data = bytes(b)
            if b"{peer}" in c.data:
                # the peer is the same image naming the first one: A -> B -> A
                pb = bytearray(c.data)
                pb[i : i + len(me)] = me
                p32(pb, BACKING_SIZE, len(me))
                with open(os.path.join(outdir, peer.decode()), "wb") as f:
                    f.write(pb)
                c.companions.append(peer.decode())
        if c.base == "backing-overlay" and u32(data, BACKING_SIZE) == 18 and u64(data, BACKING_OFF) == 528:
            c.companions.append("backing-base.qcow2")
        c.data = data
        with open(os.path.join(outdir, c.file), "wb") as f:
            f.write(data)

    # Loops first: qemu-img spends the whole timeout on them, so they overlap with the rest.
    order = sorted(range(len(uniq)), key=lambda i: uniq[i].category != "loop")
    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 2)) as pool:
        done = dict(zip(order, pool.map(lambda i: classify(outdir, uniq[i]), order)))
    results = [done[i] for i in range(len(uniq))]

    manifest = []
    for c, (cls, res) in zip(uniq, results):
        if cls is None:
            os.unlink(os.path.join(outdir, c.file))
            for comp in c.companions:
                if comp != "backing-base.qcow2":
                    os.unlink(os.path.join(outdir, comp))
            continue
        manifest.append(
            {
                "file": c.file,
                "category": c.category,
                "mutation": c.mutation,
                "base": c.base + ".qcow2",
                "format": c.fmt,
                "class": cls,
                "companions": c.companions,
                "qemu_img": res,
            }
        )
    with open(os.path.join(outdir, "manifest.json"), "w") as f:
        json.dump({"qemu_img": QEMU_IMG, "images": manifest}, f, indent=1, sort_keys=True)
        f.write("\n")
    by = {}
    for m in manifest:
        by.setdefault(m["category"], {}).setdefault(m["class"], 0)
        by[m["category"]][m["class"]] += 1
    print("%d candidates, %d malformed kept: %s" % (len(uniq), len(manifest), json.dumps(by, sort_keys=True)))


if __name__ == "__main__":
    main()
