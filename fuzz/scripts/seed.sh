#!/bin/bash
# Seeds the corpus of every fuzz target (corpus/<target>/seed-*) from the reference images in
# ../testdata (see ../README.md) and from small hand-written inputs for the text parsers.
# Idempotent: seed files are overwritten, inputs the fuzzer added are kept.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TESTDATA="$HERE/../testdata"
C="$HERE/corpus"
mkdir -p "$C"/{qcow2_image,qcow2_header,qcow2_tables,probe,json_filename,image_opts}

for f in "$TESTDATA"/*.qcow2; do
    name=$(basename "$f" .qcow2)
    # qcow2_image: 0x01 open writable, 0x00 no operations, then the image.
    { printf '\x01\x00'; cat "$f"; } > "$C/qcow2_image/seed-$name"
    # qcow2_header: the first cluster (the header never needs more than 64 KiB here).
    head -c 65536 "$f" > "$C/qcow2_header/seed-$name"
done

# qcow2_image: an image with two internal snapshots (made here: snapshots carry timestamps, so
# no reference image in ../testdata has them), for the target's snapshot operations.
if command -v qemu-img >/dev/null && command -v qemu-io >/dev/null; then
    tmp=$(mktemp -d)
    qemu-img create -q -f qcow2 -o cluster_size=4096 "$tmp/s.qcow2" 256k
    qemu-io -c "write -P 1 0 64k" "$tmp/s.qcow2" >/dev/null
    qemu-img snapshot -c a "$tmp/s.qcow2"
    qemu-io -c "write -P 2 32k 64k" "$tmp/s.qcow2" >/dev/null
    qemu-img snapshot -c b "$tmp/s.qcow2"
    { printf '\x01\x00'; cat "$tmp/s.qcow2"; } > "$C/qcow2_image/seed-snapshots"
    # ... and one with persistent bitmaps (two enabled with bits set, one disabled).
    qemu-img create -q -f qcow2 -o cluster_size=4096 "$tmp/b.qcow2" 256k
    qemu-img bitmap --add -g 512 "$tmp/b.qcow2" fine
    qemu-img bitmap --add "$tmp/b.qcow2" coarse
    qemu-img bitmap --add --disable "$tmp/b.qcow2" off
    qemu-io -c "write -P 3 4k 12k" -c "write -P 4 200k 8k" "$tmp/b.qcow2" >/dev/null
    { printf '\x01\x00'; cat "$tmp/b.qcow2"; } > "$C/qcow2_image/seed-bitmaps"
    # luks_header: the area length (little-endian u32), then a LUKS header of each key size.
    mkdir -p "$C/luks_header"
    for alg in aes-128 aes-256; do
        qemu-img create -q -f luks --object secret,id=s0,data=x -o key-secret=s0,iter-time=1,cipher-alg=$alg "$tmp/l.luks" 1M
        area=$(($(stat -c %s "$tmp/l.luks") - 1048576))
        { python3 -c "import struct,sys; sys.stdout.buffer.write(struct.pack('<I', $area))"; head -c 592 "$tmp/l.luks"; } \
            > "$C/luks_header/seed-$alg"
    done
    # vmdk_image: small disks of each sparse kind (monolithic, zeroed grains, streamOptimized with
    # data) and a descriptor with a ZERO extent, each behind 0x01 0x00.
    mkdir -p "$C/vmdk_image"
    head -c 262144 /dev/urandom > "$tmp/r.raw"
    qemu-img create -q -f vmdk "$tmp/v1.vmdk" 1M
    qemu-io -f vmdk -c "write -P 5 64k 64k" "$tmp/v1.vmdk" >/dev/null
    qemu-img create -q -f vmdk -o zeroed_grain=on "$tmp/v2.vmdk" 1M
    qemu-io -f vmdk -c "write -z 0 64k" -c "write -P 6 128k 4k" "$tmp/v2.vmdk" >/dev/null
    qemu-img convert -f raw -O vmdk -o subformat=streamOptimized "$tmp/r.raw" "$tmp/v3.vmdk"
    printf 'version=1\nCID=1\nparentCID=ffffffff\ncreateType="custom"\nRW 2048 ZERO\nNOACCESS 8 ZERO\n' > "$tmp/v4.vmdk"
    for i in 1 2 3 4; do
        { printf '\x01\x00'; cat "$tmp/v$i.vmdk"; } > "$C/vmdk_image/seed-$i"
    done
    # vpc_image: a dynamic disk with data, a force-sized one, a small fixed one, each behind
    # 0x01 0x00.
    mkdir -p "$C/vpc_image"
    qemu-img create -q -f vpc "$tmp/h1.vhd" 4M
    qemu-io -f vpc -c "write -P 5 0 4k" -c "write -P 6 2M 8k" "$tmp/h1.vhd" >/dev/null
    qemu-img create -q -f vpc -o force_size=on "$tmp/h2.vhd" 3M
    qemu-img create -q -f vpc -o subformat=fixed "$tmp/h3.vhd" 64k
    for i in 1 2 3; do
        { printf '\x01\x00'; cat "$tmp/h$i.vhd"; } > "$C/vpc_image/seed-$i"
    done
    # vdi_image: a dynamic image with data and zeros, a static one, each behind 0x01 0x00.
    mkdir -p "$C/vdi_image"
    qemu-img create -q -f vdi "$tmp/d1.vdi" 3M
    qemu-io -f vdi -c "write -P 5 0 4k" -c "write -z 1M 1M" "$tmp/d1.vdi" >/dev/null
    qemu-img create -q -f vdi -o static=on "$tmp/d2.vdi" 2M
    for i in 1 2; do
        { printf '\x01\x00'; cat "$tmp/d$i.vdi"; } > "$C/vdi_image/seed-$i"
    done
    rm -rf "$tmp"
fi

# nbd_server: a mode byte (see the target), then requests: read, write, block status, trim,
# write zeroes, flush, cache, disconnect; and a bare negotiation with LIST, INFO and meta contexts.
mkdir -p "$C/nbd_server"
python3 - "$C/nbd_server" <<'PY'
import struct, sys
d = sys.argv[1]
def req(kind, flags, cookie, off, ln, payload=b""):
    return struct.pack(">IHHQQI", 0x25609513, flags, kind, cookie, off, ln) + payload
reqs = (req(0, 0, 1, 0, 8192) + req(1, 1, 2, 4096, 16, b"x" * 16) + req(7, 0, 3, 0, 65536)
        + req(4, 0, 4, 8192, 4096) + req(6, 2, 5, 0, 512) + req(3, 0, 6, 0, 0) + req(5, 0, 7, 0, 4096)
        + req(2, 0, 8, 0, 0))
for mode in (1, 3, 5, 7):
    open(f"{d}/seed-go-{mode}", "wb").write(bytes([mode]) + reqs)
def opt(o, data=b""):
    return struct.pack(">QII", 0x49484156454F5054, o, len(data)) + data
ctx = struct.pack(">I", 4) + b"disk" + struct.pack(">I", 1) + struct.pack(">I", 5) + b"base:"
neg = (struct.pack(">I", 3) + opt(3) + opt(8) + opt(9, ctx)
       + opt(6, struct.pack(">I", 2) + b"ro" + struct.pack(">HHH", 2, 1, 3)) + opt(1, b"disk") + reqs)
open(f"{d}/seed-negotiate", "wb").write(bytes([0]) + neg)
PY

# nbd_client: a mode byte (see the target), then the server's replies to the target's requests
# in order (cookies 1..8): structured data chunks for the two reads, a block status chunk, simple
# replies for write, write zeroes, trim and flush, a second block status; and a simple-reply
# variant (no structured replies).
mkdir -p "$C/nbd_client"
python3 - "$C/nbd_client" <<'PY'
import struct, sys
d = sys.argv[1]
def chunk(kind, cookie, payload, flags=1):
    return struct.pack(">IHHQI", 0x668E33EF, flags, kind, cookie, len(payload)) + payload
def simple(cookie, err=0, data=b""):
    return struct.pack(">IIQ", 0x67446698, err, cookie) + data
size = 1 << 20
structured = (chunk(1, 1, struct.pack(">Q", 0) + b"\x11" * 8192)
              + chunk(2, 2, struct.pack(">QI", size - 4096, 4096))
              + chunk(5, 3, struct.pack(">III", 7, 65536, 0))
              + simple(4) + simple(5) + simple(6) + simple(7)
              + chunk(5, 8, struct.pack(">IIIII", 7, 4096, 3, 8192, 0)))
open(f"{d}/seed-structured", "wb").write(bytes([3]) + structured)
plain = simple(1, 0, b"\x22" * 8192) + simple(2, 0, b"\x33" * 4096) + simple(3) + simple(4, 5) + simple(5) + simple(6) + simple(7)
open(f"{d}/seed-simple", "wb").write(bytes([1]) + plain)
open(f"{d}/seed-read-only", "wb").write(bytes([7]) + structured)
PY

# virtio_blk_request: a mode byte, then guest memory with a 16-entry split queue holding six
# well-formed chains: IN, OUT, FLUSH, GET_ID, WRITE_ZEROES and DISCARD.
mkdir -p "$C/virtio_blk_request"
python3 - "$C/virtio_blk_request" <<'PY'
import struct, sys
d = sys.argv[1]
mem = bytearray(0x8000)
NEXT, WRITE = 1, 2
descs = [(0x3000, 16, NEXT, 1), (0x4000, 4096, WRITE | NEXT, 2), (0x5000, 1, WRITE, 0),
         (0x3010, 16, NEXT, 4), (0x6000, 4096, NEXT, 5), (0x5001, 1, WRITE, 0),
         (0x3020, 16, NEXT, 7), (0x5002, 1, WRITE, 0),
         (0x3030, 16, NEXT, 9), (0x7000, 20, WRITE | NEXT, 10), (0x5003, 1, WRITE, 0),
         (0x3040, 16, NEXT, 12), (0x3100, 16, NEXT, 13), (0x5004, 1, WRITE, 0),
         (0x3060, 32, NEXT, 15), (0x5005, 1, WRITE, 0)]
for i, (a, l, f, n) in enumerate(descs):
    mem[i * 16:(i + 1) * 16] = struct.pack("<QIHH", a, l, f, n)
heads = [0, 3, 6, 8, 11, 14]
mem[0x1000:0x1004] = struct.pack("<HH", 0, len(heads))
for i, h in enumerate(heads):
    mem[0x1004 + 2 * i:0x1006 + 2 * i] = struct.pack("<H", h)
for at, kind, sector in [(0x3000, 0, 8), (0x3010, 1, 16), (0x3020, 4, 0), (0x3030, 8, 0), (0x3040, 13, 0), (0x3060, 11, 0)]:
    mem[at:at + 16] = struct.pack("<IIQ", kind, 0, sector)
mem[0x3100:0x3110] = struct.pack("<QII", 32, 8, 1)
mem[0x3070:0x3080] = struct.pack("<QII", 64, 8, 0)
mem[0x6000:0x7000] = bytes(range(256)) * 16
for mode in (0, 1):
    open(f"{d}/seed-{mode}", "wb").write(bytes([mode]) + bytes(mem))
PY

# probe: a flag byte (bit 0 writable, bit 1 write sector 0, bit 2 inverted), then the container.
for f in "$TESTDATA"/*.qcow2 "$TESTDATA"/*.raw "$TESTDATA"/*.data; do
    name=$(basename "$f")
    { printf '\x00'; cat "$f"; } > "$C/probe/seed-$name"
    { printf '\x03'; head -c 4096 "$f"; } > "$C/probe/seed-w-$name"
done
printf '\x03' > "$C/probe/seed-empty"
printf '\x03QFI\xfb\x00\x00\x00\x03' > "$C/probe/seed-short-qcow2"

# qcow2_tables: base image N (see the target), no mutations. Keep the count in step with the
# number of bases in fuzz_targets/qcow2_tables.rs.
for i in $(seq 0 16); do
    printf "\\x$(printf %02x "$i")\\x00" > "$C/qcow2_tables/seed-base$i"
    # The same with one mutation (arbitrary bytes for the fuzzer to start from).
    printf "\\x$(printf %02x "$i")\\x01\\x00\\x00\\x00\\x05\\x01\\x00" > "$C/qcow2_tables/seed-base$i-m"
done

# json_filename: the text after "json:".
n=0
while IFS= read -r line; do
    printf '%s' "$line" > "$C/json_filename/seed-$n"
    n=$((n + 1))
done <<'JSON'
{"driver":"qcow2","file":{"driver":"file","filename":"/x.qcow2"}}
{"driver":"raw","file.filename":"y"}
{"file":"a b,c.img"}
{"filename":"z","driver":"qcow2","file.locking":"off","read-only":true}
{"driver":"qcow2","file":{"driver":"nbd","host":"h"}}
{"driver":"qcow2","cache.direct":false,"file":{"filename":"\u00e9\n","aio":"threads"}}
{"driver":1,"file":{"filename":2.5e3}}
[1]
{
JSON

# image_opts: a byte choosing the option list (0 qcow2 create, 1 raw create, 2 qcow2 amend,
# 3 qcow2 + file create options), then the option string.
n=0
while IFS= read -r line; do
    sel=${line%% *}
    text=${line#* }
    { printf "\\x0$sel"; printf '%s' "$text"; } > "$C/image_opts/seed-$n"
    n=$((n + 1))
done <<'OPTS'
0 cluster_size=64k,compat=1.1,lazy_refcounts=on,refcount_bits=16,size=1G
0 compression_type=zstd,extended_l2=on,preallocation=metadata,size=0x100000
0 backing_file=a,,b.img,backing_fmt=qcow2,data_file=d,data_file_raw=off
1 size=1.5M,preallocation=falloc,nocow
2 compat=0.10,refcount_bits=1,size=2E
3 size=18446744073709551615,cluster_size=2M,help
3 ,,=,,=x,no,nonsense,?,size=-1,size=1e3
OPTS

for t in "$C"/*/; do
    echo "seeded $(ls "$t" | grep -c '^seed-') inputs in corpus/$(basename "$t")"
done
