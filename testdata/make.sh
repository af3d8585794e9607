#!/bin/sh
# Regenerates every reference image in this directory with qemu-img / qemu-io (10.0.2).
#
# The output is deterministic: qcow2 headers carry no timestamps or UUIDs, every write uses a
# fixed pattern, and the "random" (incompressible) data is a SHA-256 counter stream. Running the
# script twice produces byte-identical files. See README.md for what each file exercises.
#
# Usage: testdata/make.sh            (QEMU_IMG / QEMU_IO override the tools' paths)
set -eu

cd "$(dirname "$0")"
QEMU_IMG=${QEMU_IMG:-qemu-img}
QEMU_IO=${QEMU_IO:-qemu-io}
PYTHON=${PYTHON:-python3}
export LC_ALL=C

version=$("$QEMU_IMG" --version | head -n 1)
case "$version" in
"qemu-img version 10.0.2"*) ;;
*) echo "warning: these images were made with qemu-img 10.0.2, this is: $version" >&2 ;;
esac

rm -f ./*.qcow2 ./*.raw ./*.data

# create FMT FILE SIZE [qemu-img create options...]
create() {
    fmt=$1 file=$2 size=$3
    shift 3
    "$QEMU_IMG" create -q -f "$fmt" "$@" "$file" "$size"
}

# io FMT FILE 'cmd' ['cmd'...]: runs qemu-io commands on FILE, quietly.
io() {
    fmt=$1 file=$2
    shift 2
    for c in "$@"; do
        set -- "$@" -c "$c"
        shift
    done
    "$QEMU_IO" -f "$fmt" "$@" "$file" >/dev/null
}

# qcow2edit FILE OP ARGS...: byte-level edits of a qcow2 file (used for the corrupt images).
#   setref CLUSTER VALUE     sets the refcount of host cluster CLUSTER
#   hostcluster GUESTCLUSTER prints the host cluster index that guest cluster maps to
#   setl2 GUESTCLUSTER ENTRY sets the raw 64-bit L2 entry of GUESTCLUSTER
#   append                   appends one zero cluster to the file and prints its index
qcow2edit() {
    "$PYTHON" - "$@" <<'EOF'
import struct, sys

path, op, args = sys.argv[1], sys.argv[2], [int(a, 0) for a in sys.argv[3:]]
f = open(path, "r+b")
hdr = f.read(104)
(version,) = struct.unpack(">I", hdr[4:8])
(cluster_bits,) = struct.unpack(">I", hdr[20:24])
(l1_offset,) = struct.unpack(">Q", hdr[40:48])
(reftable_offset,) = struct.unpack(">Q", hdr[48:56])
refcount_order = struct.unpack(">I", hdr[96:100])[0] if version >= 3 else 4
cs = 1 << cluster_bits
OFFSET_MASK = 0x00FFFFFFFFFFFE00


def u64(off):
    f.seek(off)
    return struct.unpack(">Q", f.read(8))[0]


def put64(off, v):
    f.seek(off)
    f.write(struct.pack(">Q", v))


def l2_entry_offset(guest_cluster):
    per_l2 = cs // 8  # no extended L2 in the corrupt images
    l2 = u64(l1_offset + 8 * (guest_cluster // per_l2)) & OFFSET_MASK
    assert l2, "no L2 table"
    return l2 + 8 * (guest_cluster % per_l2)


def setref(cluster, value):
    bits = 1 << refcount_order
    assert bits == 16, "only 16-bit refcounts are edited here"
    per_block = cs * 8 // bits
    block = u64(reftable_offset + 8 * (cluster // per_block)) & ~(cs - 1)
    assert block, "no refcount block"
    f.seek(block + 2 * (cluster % per_block))
    f.write(struct.pack(">H", value))


if op == "setref":
    setref(args[0], args[1])
elif op == "hostcluster":
    print((u64(l2_entry_offset(args[0])) & OFFSET_MASK) >> cluster_bits)
elif op == "setl2":
    put64(l2_entry_offset(args[0]), args[1])
elif op == "append":
    f.seek(0, 2)
    end = f.tell()
    assert end % cs == 0, "file end not cluster aligned"
    f.write(bytes(cs))
    print(end // cs)
else:
    raise SystemExit("unknown op " + op)
EOF
}

# stream FILE SIZE SEED: writes SIZE bytes of deterministic incompressible data (SHA-256 stream).
stream() {
    "$PYTHON" - "$@" <<'EOF'
import hashlib, sys

path, size, seed = sys.argv[1], int(sys.argv[2], 0), sys.argv[3]
out = bytearray()
i = 0
while len(out) < size:
    out += hashlib.sha256(("%s:%d" % (seed, i)).encode()).digest()
    i += 1
with open(path, "wb") as f:
    f.write(out[:size])
EOF
}

# --- raw ------------------------------------------------------------------------------------
create raw raw.raw 128K
io raw raw.raw 'write -P 0x11 0 4k' 'write -P 0x22 70000 3000' 'write -z 96k 8k' 'write -P 0x33 124k 4k'

# --- qcow2 v3, all defaults (64 KiB clusters) -----------------------------------------------
create qcow2 v3-default.qcow2 4M
io qcow2 v3-default.qcow2 'write -P 0xa5 3M 12345'

# --- qcow2 v2 (compat=0.10), 8 KiB clusters ------------------------------------------------
create qcow2 v2.qcow2 2M -o compat=0.10,cluster_size=8k
io qcow2 v2.qcow2 'write -P 0x01 0 20k' 'write -P 0x02 1M 1k' 'write -z 4k 12k' 'write -P 0x03 2040k 8k'

# --- qcow2 with 4 KiB clusters, several L2 tables --------------------------------------------
create qcow2 cluster4k.qcow2 4M -o cluster_size=4096
io qcow2 cluster4k.qcow2 'write -P 0x41 0 6k' 'write -P 0x42 2044k 8k' 'write -P 0x43 3M 1' \
    'write -P 0x44 4092k 4k'

# --- extended L2 entries: 16 KiB clusters with 512-byte subclusters ---------------------------
create qcow2 extended-l2.qcow2 2M -o extended_l2=on,cluster_size=16k
io qcow2 extended-l2.qcow2 'write -P 0x51 512 512' 'write -P 0x52 3k 2k' 'write -z 8k 1k' \
    'write -P 0x53 1M 16k' 'write -z 1049600 512' 'write -z -u 1052672 1k' 'write -P 0x54 2096640 512'

# --- compressed clusters (qemu-img convert -c) -----------------------------------------------
# Source: compressible patterns, one incompressible run (stored uncompressed), holes and zeros.
create raw src.tmp 1M
io raw src.tmp 'write -P 0x61 0 16k' 'write -P 0x62 100k 5000' 'write -P 0x63 512k 64k'
stream rnd.tmp 12288 compressed
"$QEMU_IO" -f raw -c "write -s rnd.tmp 768k 12k" src.tmp >/dev/null
"$QEMU_IMG" convert -c -f raw -O qcow2 -o cluster_size=4096 src.tmp compressed-zlib.qcow2
"$QEMU_IMG" convert -c -f raw -O qcow2 -o cluster_size=8192,compression_type=zstd src.tmp \
    compressed-zstd.qcow2
rm -f src.tmp rnd.tmp

# --- backing chain: base <- overlay (relative backing name, -F qcow2), overlay larger ---------
create qcow2 backing-base.qcow2 1M -o cluster_size=4096
io qcow2 backing-base.qcow2 'write -P 0x71 0 16k' 'write -P 0x72 512k 8k' 'write -z 256k 8k'
create qcow2 backing-overlay.qcow2 2M -o cluster_size=8192 -b backing-base.qcow2 -F qcow2
io qcow2 backing-overlay.qcow2 'write -P 0x73 1000 3000' 'write -P 0x74 40k 1k' 'write -z 520k 4k' \
    'discard 256k 8k' 'write -P 0x75 1052672 8k' 'write -z 2088960 8k'

# --- zero clusters: unallocated zero, allocated zero (write -z on data), unmapped zero --------
create qcow2 zero.qcow2 1M -o cluster_size=4096
io qcow2 zero.qcow2 'write -P 0x81 0 32k' 'write -z 8k 8k' 'write -z -u 24k 4k' 'write -z 512k 64k' \
    'write -z 1020k 4k'

# --- refcount widths ------------------------------------------------------------------------
create qcow2 refcount1.qcow2 1M -o cluster_size=4096,refcount_bits=1
io qcow2 refcount1.qcow2 'write -P 0x91 0 12k' 'write -P 0x92 700k 1k'
create qcow2 refcount64.qcow2 1M -o cluster_size=4096,refcount_bits=64
io qcow2 refcount64.qcow2 'write -P 0x93 4k 12k' 'write -P 0x94 900k 3k'

# --- lazy refcounts (closed cleanly, so not dirty) ------------------------------------------
create qcow2 lazy-refcounts.qcow2 1M -o cluster_size=4096,lazy_refcounts=on
io qcow2 lazy-refcounts.qcow2 'write -P 0xa1 0 8k' 'write -P 0xa2 300k 2k'

# --- external data files (names relative to the working directory, as qemu resolves them) ---
create qcow2 datafile-raw.qcow2 64K -o cluster_size=4096,data_file=datafile-raw.data,data_file_raw=on
io qcow2 datafile-raw.qcow2 'write -P 0xb1 0 5k' 'write -P 0xb2 32k 4k' 'write -z 48k 8k'
create qcow2 datafile.qcow2 64K -o cluster_size=4096,data_file=datafile.data
io qcow2 datafile.qcow2 'write -P 0xb3 40k 8k' 'write -P 0xb4 4k 2k'

# --- corrupt: leaked clusters only (header refcount 2, one unreferenced cluster) -------------
create qcow2 corrupt-leak.qcow2 1M -o cluster_size=4096
io qcow2 corrupt-leak.qcow2 'write -P 0xc1 0 16k' 'write -P 0xc2 600k 4k'
qcow2edit corrupt-leak.qcow2 setref 0 2
qcow2edit corrupt-leak.qcow2 setref "$(qcow2edit corrupt-leak.qcow2 append)" 1

# --- corrupt: a data cluster's refcount too high (leak + OFLAG_COPIED error) ---------------
create qcow2 corrupt-refcount-high.qcow2 1M -o cluster_size=4096
io qcow2 corrupt-refcount-high.qcow2 'write -P 0xc3 0 16k'
qcow2edit corrupt-refcount-high.qcow2 setref "$(qcow2edit corrupt-refcount-high.qcow2 hostcluster 1)" 2

# --- corrupt: refcount too low (a data cluster has refcount 0) -----------------------------
create qcow2 corrupt-refcount-low.qcow2 1M -o cluster_size=4096
io qcow2 corrupt-refcount-low.qcow2 'write -P 0xd1 0 16k' 'write -P 0xd2 800k 4k'
qcow2edit corrupt-refcount-low.qcow2 setref "$(qcow2edit corrupt-refcount-low.qcow2 hostcluster 2)" 0

# --- corrupt: an L2 entry pointing past the end of the file --------------------------------
create qcow2 corrupt-l2-eof.qcow2 1M -o cluster_size=4096
io qcow2 corrupt-l2-eof.qcow2 'write -P 0xe1 0 16k'
qcow2edit corrupt-l2-eof.qcow2 setl2 5 0x8000000000100000

ls -l ./*.qcow2 ./*.raw ./*.data
