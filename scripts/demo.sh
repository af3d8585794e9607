#!/bin/bash
# A representative vdisk job on data made here (no download): builds vdisk, makes a 256 MiB raw disk
# holding an ext4 file system filled from this machine's /usr/share, and takes it through what an
# operator moving a machine does: inspect, convert to qcow2 (plain and compressed), check, compare,
# map, measure, and back to raw. Every result is verified.
#
#   scripts/demo.sh [WORKDIR]        (default: target/demo)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${1:-$REPO/target/demo}
cd "$REPO"
if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then PATH=$HOME/.cargo/bin:$PATH; fi
command -v mke2fs >/dev/null || { echo "demo: mke2fs (e2fsprogs) is needed to build the sample disk" >&2; exit 1; }

echo "== building vdisk (release)"
cargo build --release --bin vdisk
V=${CARGO_TARGET_DIR:-$REPO/target}/release/vdisk

mkdir -p "$WORK"
cd "$WORK"
rm -f disk.raw disk.qcow2 disk-zlib.qcow2 disk-zstd.qcow2 back.raw
echo "== making a 256 MiB raw disk with an ext4 file system from /usr/share/doc"
"$V" create -f raw disk.raw 256M
mke2fs -q -F -t ext4 -d /usr/share/doc disk.raw

run() { echo "\$ vdisk $*"; "$V" "$@"; }
run info disk.raw
run map -f raw disk.raw | head -8
run convert -p -f raw -O qcow2 disk.raw disk.qcow2
run convert -c -f raw -O qcow2 disk.raw disk-zlib.qcow2
run convert -c -f raw -O qcow2 -o compression_type=zstd disk.raw disk-zstd.qcow2
for img in disk.qcow2 disk-zlib.qcow2 disk-zstd.qcow2; do
  run check "$img"
  run compare -f raw -F qcow2 disk.raw "$img"
done
run info disk-zstd.qcow2
run measure -O qcow2 -f raw disk.raw
run convert -f qcow2 -O raw disk-zlib.qcow2 back.raw
cmp disk.raw back.raw && echo "round trip raw -> compressed qcow2 -> raw: identical"
ls -ls disk.raw disk.qcow2 disk-zlib.qcow2 disk-zstd.qcow2 back.raw
echo "demo finished: all conversions verified"
