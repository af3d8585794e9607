#!/bin/bash
# Seeds corpus/qcow2_image from the reference images in ../testdata (see ../README.md).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$HERE/corpus/qcow2_image"
for f in "$HERE"/../testdata/*.qcow2; do
    # 0x01: open writable; 0x00: no operations; then the image.
    { printf '\x01\x00'; cat "$f"; } > "$HERE/corpus/qcow2_image/seed-$(basename "$f" .qcow2)"
done
echo "seeded $(ls "$HERE/corpus/qcow2_image" | wc -l) inputs in corpus/qcow2_image"
