#!/usr/bin/env bash
# Benchmark vdisk against qemu-img on the same inputs; writes BENCHMARKS.md and
# bench/results.json.  See the "How to run" section of BENCHMARKS.md.
#
# Environment knobs:
#   BENCH_RUNS             timed runs per tool and case (default 3)
#   BENCH_DROP_CACHES      0 (default): warm caches, sync before every timed run; 1: drop the page cache too
#   BENCH_CASES            space-separated case ids to run (default: all)
#   BENCH_SKIP             space-separated case ids not to run (e.g. guest_io, which takes ~10 minutes)
#   BENCH_DIR              input cache and work directory (default target/bench)
#   BENCH_SPARSE_CLUSTERS  allocated clusters in the 1 TiB sparse qcow2 (default 100000)
#   BENCH_LOAD_NOTE        free text added to the report next to the load average
#   VDISK, QEMU_IMG, QEMU_IO  binaries (default: target/release/vdisk, built first; qemu-img, qemu-io)
#   VDISK_BASELINE         an older vdisk binary run in the same cases as a third tool ("vdisk-baseline"):
#                          the report then compares both against qemu-img from the same runs
#   BENCH_OUT_MD, BENCH_OUT_JSON, BENCH_OUT_SVG  report paths (default BENCHMARKS.md,
#                          bench/results.json, bench/ratios.svg)
#   GUEST_IO_RUNS          runs of bench/guest-io.sh (case guest_io; default 3)
#   BENCH_RUN_TIMEOUT      seconds after which a hung run is killed (default 1800)
#   BENCH_HANG_RETRIES     times a killed run is run again before it counts as failed (default 0)
# The remote cases (convert_http_qcow2_raw, convert_nbd_raw) need nginx (nginx-light) and qemu-img's
# curl driver (qemu-block-extra from bookworm-backports, the same version as qemu-utils).
set -euo pipefail

T_START=$(date +%s.%N)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

RUNS=${BENCH_RUNS:-3}
DROP=${BENCH_DROP_CACHES:-0}
BENCH_DIR=${BENCH_DIR:-$REPO/target/bench}
SPARSE_CLUSTERS=${BENCH_SPARSE_CLUSTERS:-100000}
VDISK_GIVEN=${VDISK:-}
VDISK=${VDISK:-$REPO/target/release/vdisk}
QEMU_IMG=${QEMU_IMG:-$(command -v qemu-img)}
QEMU_IO=${QEMU_IO:-$(command -v qemu-io)}
OUT_MD=${BENCH_OUT_MD:-$REPO/BENCHMARKS.md}
OUT_JSON=${BENCH_OUT_JSON:-$REPO/bench/results.json}
MEASURE=(python3 "$HERE/measure.py")
cd "$REPO"   # command lines in the report are shown relative to the repository
export QEMU_IMG

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [[ -z ${VDISK_GIVEN:-} ]]; then
    log "cargo build --release"
    cargo build --release --quiet --bin vdisk
fi
[[ -x $VDISK ]] || { echo "vdisk binary not found at $VDISK (cargo build --release)" >&2; exit 1; }
[[ -x $QEMU_IMG ]] || { echo "qemu-img not found" >&2; exit 1; }
[[ -x $QEMU_IO ]] || { echo "qemu-io not found" >&2; exit 1; }
command -v mke2fs >/dev/null || { echo "mke2fs not found" >&2; exit 1; }

if [[ $DROP == 1 ]]; then
    if ! { sync && echo 3 > /proc/sys/vm/drop_caches; } 2>/dev/null; then
        log "cannot drop the page cache (not root?); measuring with warm caches"
        DROP=0
    fi
fi

mkdir -p "$BENCH_DIR"
WORK=$BENCH_DIR/work
rm -rf "$WORK"
mkdir -p "$WORK"

# Run a private copy of the binary, so that a rebuild during the benchmark
# cannot mix two builds in one report.
VDISK_ORIG=$VDISK
VDISK=$WORK/vdisk
cp "$VDISK_ORIG" "$VDISK"
if [[ -n ${VDISK_BASELINE:-} ]]; then cp "$VDISK_BASELINE" "$WORK/vdisk-baseline"; fi

# ---------------------------------------------------------------------------
# inputs (cached in $BENCH_DIR, reused when present)

# Directories copied into the ext4 file system: shared libraries, binaries,
# Python's standard library and /usr/share (many small files); about 1.5 GiB.
STAGE_SRC=(/usr/lib/x86_64-linux-gnu /usr/bin /usr/lib/python3.11 /usr/share)
STAGE=$BENCH_DIR/stage
RAW=$BENCH_DIR/disk.raw
QCOW=$BENCH_DIR/disk.qcow2
SPARSE=$BENCH_DIR/sparse-1T.qcow2

if [[ ! -f $RAW ]]; then
    log "staging ${STAGE_SRC[*]} in $STAGE"
    rm -rf "$STAGE"
    mkdir -p "$STAGE"
    for d in "${STAGE_SRC[@]}"; do
        [[ -d $d ]] || continue
        # hard links when on the same file system (fast), else a real copy
        cp -al "$d" "$STAGE/" 2>/dev/null || cp -a "$d" "$STAGE/"
    done
    log "mke2fs -q -t ext4 -d $STAGE -F $RAW.tmp 4G"
    mke2fs -q -t ext4 -d "$STAGE" -F "$RAW.tmp" 4G
    mv "$RAW.tmp" "$RAW"
fi
if [[ ! -f $BENCH_DIR/stage.txt ]] || [[ $RAW -nt $BENCH_DIR/stage.txt ]]; then
    if [[ -d $STAGE ]]; then
        printf '%s files, %s' "$(find "$STAGE" | wc -l)" \
            "$(du -sh --apparent-size "$STAGE" | cut -f1)" > "$BENCH_DIR/stage.txt"
    else
        echo "unknown" > "$BENCH_DIR/stage.txt"
    fi
fi
STAGE_DESC=$(cat "$BENCH_DIR/stage.txt")

if [[ ! -f $QCOW ]]; then
    log "$QEMU_IMG convert -f raw -O qcow2 $RAW $QCOW"
    "$QEMU_IMG" convert -f raw -O qcow2 "$RAW" "$QCOW.tmp"
    mv "$QCOW.tmp" "$QCOW"
fi

if [[ ! -f $SPARSE ]]; then
    log "creating 1 TiB qcow2 with $SPARSE_CLUSTERS scattered 4 KiB writes (qemu-io)"
    "$QEMU_IMG" create -q -f qcow2 "$SPARSE.tmp" 1T
    # one 4 KiB write into each of N distinct 64 KiB clusters picked at random
    # (fixed seed) over the whole 1 TiB, written in random order
    python3 - "$SPARSE_CLUSTERS" > "$BENCH_DIR/sparse-1T.qemu-io" <<'EOF'
import random, sys
n = int(sys.argv[1])
r = random.Random(20260101)
for i, c in enumerate(r.sample(range(1 << 24), n)):
    print(f"write -P {i % 255 + 1} {c * 65536 + r.randrange(16) * 4096} 4k")
EOF
    "$QEMU_IO" -t unsafe -f qcow2 "$SPARSE.tmp" < "$BENCH_DIR/sparse-1T.qemu-io" > /dev/null
    mv "$SPARSE.tmp" "$SPARSE"
fi

# LUKS-encrypted copy of disk.qcow2 (AES-256-XTS, the default). iter-time=100 keeps the key
# derivation (the same for both tools: both run PBKDF2 on the same header) from drowning the data path.
BENCH_SECRET=secret,id=bk,data=vdisk-bench
LUKS_QCOW=$BENCH_DIR/disk-luks.qcow2
if [[ ! -f $LUKS_QCOW ]]; then
    log "creating the LUKS qcow2 copy of disk.raw"
    "$QEMU_IMG" convert -q --object "$BENCH_SECRET" -f raw -O qcow2 \
        -o encrypt.format=luks,encrypt.key-secret=bk,encrypt.iter-time=100 "$RAW" "$LUKS_QCOW.tmp"
    mv "$LUKS_QCOW.tmp" "$LUKS_QCOW"
fi

# A dynamic VHD copy of disk.raw (made by qemu-img).
VHD=$BENCH_DIR/disk.vhd
if [[ ! -f $VHD ]]; then
    log "creating the dynamic VHD copy of disk.raw"
    "$QEMU_IMG" convert -q -f raw -O vpc "$RAW" "$VHD.tmp"
    mv "$VHD.tmp" "$VHD"
fi

# A dynamic VDI copy of disk.raw (made by qemu-img).
VDI=$BENCH_DIR/disk.vdi
if [[ ! -f $VDI ]]; then
    log "creating the dynamic VDI copy of disk.raw"
    "$QEMU_IMG" convert -q -f raw -O vdi "$RAW" "$VDI.tmp"
    mv "$VDI.tmp" "$VDI"
fi

# A monolithicSparse VMDK copy of disk.raw (made by qemu-img).
VMDK=$BENCH_DIR/disk.vmdk
if [[ ! -f $VMDK ]]; then
    log "creating the VMDK copy of disk.raw"
    "$QEMU_IMG" convert -q -f raw -O vmdk "$RAW" "$VMDK.tmp"
    mv "$VMDK.tmp" "$VMDK"
fi

# `bench` inputs: a 1 GiB qcow2 with every cluster allocated and written (preallocation=full), and
# what BENCH_IO_REQUESTS 4 KiB writes of byte 0xa5, BENCH_IO_STEP apart, leave in an empty 1 GiB
# qcow2 (made by qemu-img bench; every write case must leave the same content). The step is 7919
# blocks of 4 KiB, a prime: the requests visit distinct blocks scattered over the whole image.
BENCH_IO_REQUESTS=40000
BENCH_IO_STEP=$((7919 * 4096))
BENCH_FULL=$BENCH_DIR/bench-full.qcow2
BENCH_EXPECT=$BENCH_DIR/bench-expect.qcow2
if [[ ! -f $BENCH_FULL ]]; then
    "$QEMU_IMG" create -q -f qcow2 -o preallocation=full "$BENCH_FULL.tmp" 1G
    mv "$BENCH_FULL.tmp" "$BENCH_FULL"
fi
if [[ ! -f $BENCH_EXPECT ]]; then
    "$QEMU_IMG" create -q -f qcow2 "$BENCH_EXPECT.tmp" 1G
    "$QEMU_IMG" bench -q -w --pattern=165 -c $BENCH_IO_REQUESTS -S $BENCH_IO_STEP -f qcow2 "$BENCH_EXPECT.tmp"
    mv "$BENCH_EXPECT.tmp" "$BENCH_EXPECT"
fi

PREALLOC=$BENCH_DIR/prealloc-1T.qcow2
if [[ ! -f $PREALLOC ]]; then
    log "creating 1 TiB qcow2 with 1M allocated clusters (metadata preallocation of 64 GiB)"
    "$QEMU_IMG" create -q -f qcow2 -o preallocation=metadata "$PREALLOC.tmp" 64G
    "$QEMU_IMG" resize -q "$PREALLOC.tmp" 1T
    mv "$PREALLOC.tmp" "$PREALLOC"
fi

# Backing chains for commit and safe rebase (qemu-io writes with a fixed seed; cached).
CHAIN_BASE=$BENCH_DIR/chain-base.qcow2   # disk.qcow2's content
CHAIN_MID=$BENCH_DIR/chain-mid.qcow2     # standalone: the base plus about 1 GiB written over it
CHAIN_TOP=$BENCH_DIR/chain-top.qcow2     # over the base: about 1 GiB written
REBASE_TOP=$BENCH_DIR/rebase-top.qcow2   # over chain-mid: about 256 MiB written
COMMIT_EXPECT=$BENCH_DIR/commit-expect.qcow2
REBASE_EXPECT=$BENCH_DIR/rebase-expect.qcow2
scattered_writes() {  # COUNT SIZE SEED -> qemu-io commands: COUNT writes of SIZE at random 64 KiB-aligned offsets
    python3 - "$1" "$2" "$3" <<'EOF2'
import random, sys
n, size, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
r = random.Random(seed)
for i in range(n):
    off = r.randrange((4 << 30) // 65536 - size // 65536) * 65536
    print(f"write -P {i % 250 + 1} {off} {size}")
EOF2
}
if [[ ! -f $REBASE_EXPECT ]]; then
    log "building the backing chains for commit and rebase"
    cp --sparse=always "$QCOW" "$CHAIN_BASE"
    scattered_writes 2048 524288 11 > "$BENCH_DIR/chain-top.qemu-io"
    "$QEMU_IMG" create -q -f qcow2 -b "$CHAIN_BASE" -F qcow2 "$CHAIN_TOP"
    "$QEMU_IO" -t unsafe -f qcow2 "$CHAIN_TOP" < "$BENCH_DIR/chain-top.qemu-io" > /dev/null
    "$QEMU_IMG" convert -O qcow2 "$CHAIN_TOP" "$COMMIT_EXPECT"
    cp --sparse=always "$QCOW" "$CHAIN_MID"
    scattered_writes 2048 524288 12 > "$BENCH_DIR/chain-mid.qemu-io"
    "$QEMU_IO" -t unsafe -f qcow2 "$CHAIN_MID" < "$BENCH_DIR/chain-mid.qemu-io" > /dev/null
    scattered_writes 512 524288 13 > "$BENCH_DIR/rebase-top.qemu-io"
    "$QEMU_IMG" create -q -f qcow2 -b "$CHAIN_MID" -F qcow2 "$REBASE_TOP"
    "$QEMU_IO" -t unsafe -f qcow2 "$REBASE_TOP" < "$BENCH_DIR/rebase-top.qemu-io" > /dev/null
    "$QEMU_IMG" convert -O qcow2 "$REBASE_TOP" "$REBASE_EXPECT.tmp"
    mv "$REBASE_EXPECT.tmp" "$REBASE_EXPECT"
fi

# ---------------------------------------------------------------------------
# metadata

RESULTS=$WORK/results.jsonl
META=$WORK/meta.json
: > "$RESULTS"
"${MEASURE[@]}" meta --out "$META" --repo "$REPO" --vdisk "$VDISK_ORIG" --vdisk-snapshot "$VDISK" --qemu-img "$QEMU_IMG" \
    --bench-dir "$BENCH_DIR" --runs "$RUNS" --drop-caches "$DROP" \
    --load-note "${BENCH_LOAD_NOTE:-}" \
    --input "disk.raw|$RAW|raw image, 4 GiB, ext4 created with \`mke2fs -q -t ext4 -d <stage> -F disk.raw 4G\` ($(mke2fs -V 2>&1 | head -1)); <stage> = copy of ${STAGE_SRC[*]} ($STAGE_DESC)" \
    --input "disk.qcow2|$QCOW|\`qemu-img convert -f raw -O qcow2 disk.raw disk.qcow2\` (64 KiB clusters)" \
    --input "disk-luks.qcow2|$LUKS_QCOW|\`qemu-img convert -f raw -O qcow2 -o encrypt.format=luks,encrypt.key-secret=bk,encrypt.iter-time=100 disk.raw disk-luks.qcow2\` (LUKS1, AES-256-XTS-plain64, sha256; passphrase from \`--object $BENCH_SECRET\`; iter-time 100 ms so that key derivation, identical work for both tools, does not drown the data path)" \
    --input "disk.vhd|$VHD|\`qemu-img convert -f raw -O vpc disk.raw disk.vhd\` (dynamic, 2 MiB blocks)" \
    --input "disk.vmdk|$VMDK|\`qemu-img convert -f raw -O vmdk disk.raw disk.vmdk\` (monolithicSparse, 64 KiB grains)" \
    --input "bench-full.qcow2|$BENCH_FULL|\`qemu-img create -f qcow2 -o preallocation=full bench-full.qcow2 1G\` (the preallocated image of the \`bench\` cases)" \
    --input "bench-expect.qcow2|$BENCH_EXPECT|an empty 1 GiB qcow2 after \`qemu-img bench -w --pattern=165 -c $BENCH_IO_REQUESTS -S $BENCH_IO_STEP\`: what every \`bench\` write case must leave" \
    --input "disk.vdi|$VDI|\`qemu-img convert -f raw -O vdi disk.raw disk.vdi\` (dynamic, 1 MiB blocks)" \
    --input "prealloc-1T.qcow2|$PREALLOC|qcow2, 1 TiB virtual size, 64 KiB clusters, 1,048,576 allocated clusters: \`qemu-img create -o preallocation=metadata 64G\` then \`qemu-img resize 1T\` (the clusters are allocated in the L2 tables and refcounts; the file holds no data there)" \
    --input "chain-base.qcow2 ← chain-top.qcow2|$CHAIN_TOP|commit chain: chain-base.qcow2 is a copy of disk.qcow2; chain-top.qcow2 is a qcow2 over it into which \`qemu-io\` wrote 2048 × 512 KiB at random 64 KiB-aligned offsets (fixed seed; about 1 GiB, \`target/bench/chain-top.qemu-io\`)" \
    --input "chain-mid.qcow2 ← rebase-top.qcow2|$REBASE_TOP|safe rebase chain: chain-mid.qcow2 is a copy of disk.qcow2 with 2048 × 512 KiB written over it the same way (another seed); rebase-top.qcow2 is a qcow2 over chain-mid with 512 × 512 KiB written (256 MiB); rebased onto chain-base.qcow2" \
    --input "sparse-1T.qcow2|$SPARSE|qcow2, 1 TiB virtual size, 64 KiB clusters; \`qemu-io -t unsafe\` wrote 4 KiB into each of $SPARSE_CLUSTERS distinct clusters chosen at random (fixed seed) over the whole disk, in random order (commands in \`target/bench/sparse-1T.qemu-io\`)"

# ---------------------------------------------------------------------------
# cases

want() {
    [[ " ${BENCH_SKIP:-} " != *" $1 "* ]] && { [[ -z ${BENCH_CASES:-} ]] || [[ " $BENCH_CASES " == *" $1 "* ]]; }
}

# case ID TITLE KIND OUT_EXT OUT_FMT TEMPLATE INPUT...
case_() {
    local id=$1 title=$2 kind=$3 ext=$4 fmt=$5 template=$6
    shift 6
    want "$id" || return 0
    log "case $id: $template"
    local inputs=()
    for i in "$@"; do inputs+=(--input "$i"); done
    local tools=(--tool "vdisk=$VDISK" --tool "qemu-img=$QEMU_IMG" $(baseline_tool))
    if [[ $kind == none ]]; then tools=(--tool "${FLOOR_TOOL:-cp}=$(command -v "${FLOOR_TOOL:-cp}")"); fi
    # SERVERS=1: the cases compare servers; qemu-nbd stands in the qemu-img column.
    if [[ -n ${SERVERS:-} ]]; then tools=(--tool "vdisk=$VDISK" --tool "qemu-img=$(command -v qemu-nbd)"); fi
    # ENCRYPTED_OUT=1: the outputs are LUKS qcow2 under the bench key; verification opens them with it.
    local verify=()
    if [[ -n ${ENCRYPTED_OUT:-} ]]; then verify=(--object "$BENCH_SECRET" --out-image-opts "encrypt.key-secret=bk"); fi
    "${MEASURE[@]}" case --results "$RESULTS" --workdir "$WORK" --runs "$RUNS" --drop-caches "$DROP" \
        --id "$id" --title "$title" --kind "$kind" --out-ext "$ext" --out-fmt "$fmt" \
        --template "$template" "${tools[@]}" "${inputs[@]}" "${verify[@]}" $(case_extras)
}
# The baseline vdisk as a third tool, when VDISK_BASELINE names one (copied like VDISK).
baseline_tool() {
    if [[ -n ${VDISK_BASELINE:-} ]]; then printf -- '--tool vdisk-baseline=%s ' "$WORK/vdisk-baseline"; fi
}
# Options every case may take from the environment: FLOOR_FOR=PATH (a reference case: the floor of
# the cases reading PATH) and IO_REQUESTS=N (a `bench` case: the tools print their own run time).
case_extras() {
    if [[ -n ${FLOOR_FOR:-} ]]; then printf -- '--floor-for %s ' "$FLOOR_FOR"; fi
    if [[ -n ${IO_REQUESTS:-} ]]; then printf -- '--requests %s ' "$IO_REQUESTS"; fi
}

case_ convert_raw_raw "convert raw → raw" image .raw raw \
    "{tool} convert -q -f raw -O raw $RAW {out}" "$RAW"
case_ convert_raw_qcow2 "convert raw → qcow2" image .qcow2 qcow2 \
    "{tool} convert -q -f raw -O qcow2 $RAW {out}" "$RAW"
case_ convert_qcow2_raw "convert qcow2 → raw" image .raw raw \
    "{tool} convert -q -f qcow2 -O raw $QCOW {out}" "$QCOW"
case_ convert_zlib "convert -c raw → qcow2 (zlib)" image .qcow2 qcow2 \
    "{tool} convert -q -c -f raw -O qcow2 $RAW {out}" "$RAW"
case_ convert_zstd "convert -c -o compression_type=zstd raw → qcow2" image .qcow2 qcow2 \
    "{tool} convert -q -c -o compression_type=zstd -f raw -O qcow2 $RAW {out}" "$RAW"
case_ convert_raw_vmdk "convert raw → vmdk (monolithicSparse)" image .vmdk vmdk \
    "{tool} convert -q -f raw -O vmdk $RAW {out}" "$RAW"
case_ convert_raw_stream "convert raw → vmdk (streamOptimized)" image .vmdk vmdk \
    "{tool} convert -q -f raw -O vmdk -o subformat=streamOptimized $RAW {out}" "$RAW"
case_ convert_raw_vpc "convert raw → vpc (dynamic VHD)" image .vhd vpc \
    "{tool} convert -q -f raw -O vpc $RAW {out}" "$RAW"
case_ convert_vpc_raw "convert vpc (dynamic VHD) → raw" image .raw raw \
    "{tool} convert -q -f vpc -O raw $VHD {out}" "$VHD"
case_ convert_raw_vdi "convert raw → vdi (dynamic)" image .vdi vdi \
    "{tool} convert -q -f raw -O vdi $RAW {out}" "$RAW"
case_ convert_vdi_raw "convert vdi (dynamic) → raw" image .raw raw \
    "{tool} convert -q -f vdi -O raw $VDI {out}" "$VDI"
# The rest of the matrix: every pair of raw, qcow2, vmdk, vdi and vpc not measured above.
declare -A FMT_FILE=([raw]=$RAW [qcow2]=$QCOW [vmdk]=$VMDK [vdi]=$VDI [vpc]=$VHD)
declare -A FMT_EXT=([raw]=.raw [qcow2]=.qcow2 [vmdk]=.vmdk [vdi]=.vdi [vpc]=.vhd)
for src in raw qcow2 vmdk vdi vpc; do
    for dst in raw qcow2 vmdk vdi vpc; do
        [[ $src == "$dst" ]] && continue
        case $src-$dst in raw-qcow2 | qcow2-raw | raw-vmdk | raw-vpc | vpc-raw | raw-vdi | vdi-raw) continue ;; esac
        case_ "convert_${src}_${dst}" "convert $src → $dst" image "${FMT_EXT[$dst]}" "$dst" \
            "{tool} convert -q -f $src -O $dst ${FMT_FILE[$src]} {out}" "${FMT_FILE[$src]}"
    done
done
case_ convert_luks_raw "convert LUKS qcow2 → raw (decrypt)" image .raw raw \
    "{tool} convert -q --object $BENCH_SECRET --image-opts driver=qcow2,file.filename=$LUKS_QCOW,encrypt.key-secret=bk -O raw {out}" "$LUKS_QCOW"
ENCRYPTED_OUT=1 case_ convert_raw_luks "convert raw → LUKS qcow2 (encrypt)" image .qcow2 qcow2 \
    "{tool} convert -q --object $BENCH_SECRET -f raw -O qcow2 -o encrypt.format=luks,encrypt.key-secret=bk,encrypt.iter-time=100 $RAW {out}" "$RAW"
case_ compare_raw_qcow2 "compare raw vs qcow2 (identical)" stdout "" raw \
    "{tool} compare -f raw -F qcow2 $RAW $QCOW" "$RAW" "$QCOW"
case_ map_qcow2 "map --output=json (disk.qcow2)" stdout "" raw \
    "{tool} map --output=json -f qcow2 $QCOW" "$QCOW"
case_ check_sparse "check (1 TiB sparse qcow2)" stdout "" raw \
    "{tool} check -f qcow2 $SPARSE" "$SPARSE"
case_ check_1m "check (1 TiB qcow2, 1M allocated clusters)" stdout "" raw \
    "{tool} check -f qcow2 $PREALLOC" "$PREALLOC"
case_ map_1m "map --output=json (1 TiB qcow2, 1M allocated clusters)" stdout "" raw \
    "{tool} map --output=json -f qcow2 $PREALLOC" "$PREALLOC"
case_ map_sparse "map --output=json (1 TiB sparse qcow2)" stdout "" raw \
    "{tool} map --output=json -f qcow2 $SPARSE" "$SPARSE"
case_ info_sparse "info (1 TiB sparse qcow2)" stdout "" raw \
    "{tool} info -f qcow2 $SPARSE" "$SPARSE"
case_ info_1m "info (1 TiB qcow2, 1M allocated clusters)" stdout "" raw \
    "{tool} info -f qcow2 $PREALLOC" "$PREALLOC"
case_ compare_sparse "compare (1 TiB sparse qcow2 with itself)" stdout "" raw \
    "{tool} compare -f qcow2 -F qcow2 $SPARSE $SPARSE" "$SPARSE"
SERVERS=1 case_ nbdcopy_qcow2 "nbdcopy from an NBD export of disk.qcow2 (vdisk serve --nbd vs qemu-nbd, in the qemu-img column)" image .raw raw \
    "$HERE/nbdcopy-from.sh {tool} $QCOW {out}" "$QCOW"
# Remote sources: the same disk.qcow2 from nginx over HTTP and from qemu-nbd (exporting its
# content), both on loopback and started once for both tools (bench/remote-servers.sh).
if want convert_http_qcow2_raw || want convert_nbd_raw; then
    REMOTE_FIFO=$WORK/remote.out
    mkfifo "$REMOTE_FIFO"
    "$HERE/remote-servers.sh" "$BENCH_DIR" "$QCOW" "$WORK/remote" > "$REMOTE_FIFO" &
    REMOTE_PID=$!
    trap 'kill $REMOTE_PID 2>/dev/null || true' EXIT
    read -r HTTP_PORT NBD_SOCK < "$REMOTE_FIFO"
    # qemu-img's curl driver (10.0.2, libcurl 7.88) stalls in about half of these runs at 0% CPU:
    # such a run is killed after 60 s and run again, and the report counts the hangs.
    BENCH_RUN_TIMEOUT=60 BENCH_HANG_RETRIES=10 \
    case_ convert_http_qcow2_raw "convert qcow2 → raw from an HTTP URL (nginx on loopback)" image .raw raw \
        "{tool} convert -q -f qcow2 -O raw http://127.0.0.1:$HTTP_PORT/disk.qcow2 {out}" "$QCOW"
    case_ convert_nbd_raw "convert from an NBD export of disk.qcow2 (qemu-nbd -f qcow2 on a unix socket) → raw" image .raw raw \
        "{tool} convert -q -f raw -O raw nbd+unix:///disk?socket=$NBD_SOCK {out}" "$QCOW"
    kill "$REMOTE_PID" 2>/dev/null || true
    wait "$REMOTE_PID" 2>/dev/null || true
fi
# case_inplace ID TITLE SETUP EXPECT EXPECT_BACKING TEMPLATE INPUT...: commands that change their
# files in place; SETUP lays out a fresh copy at {out} (untimed) before every run, and every tool's
# {out} must then compare equal to EXPECT, pass `qemu-img check` and have the backing file
# EXPECT_BACKING (a path, or none).
case_inplace() {
    local id=$1 title=$2 setup=$3 expect=$4 expect_backing=$5 template=$6
    shift 6
    want "$id" || return 0
    log "case $id: $template"
    local inputs=()
    for i in "$@"; do inputs+=(--input "$i"); done
    "${MEASURE[@]}" case --results "$RESULTS" --workdir "$WORK" --runs "$RUNS" --drop-caches "$DROP" \
        --id "$id" --title "$title" --kind image --out-ext .qcow2 --out-fmt qcow2 \
        --setup "$setup" --expect "$expect" --expect-backing "$expect_backing" \
        --template "$template" --tool "vdisk=$VDISK" --tool "qemu-img=$QEMU_IMG" $(baseline_tool) "${inputs[@]}" \
        $(case_extras)
}

case_inplace commit_chain "commit (4 GiB chain, 1 GiB in the top)" \
    "cp --reflink=never --sparse=always $CHAIN_BASE {out} && cp --reflink=never --sparse=always $CHAIN_TOP {out}.top && $QEMU_IMG rebase -u -f qcow2 -b {out} -F qcow2 {out}.top" \
    "$COMMIT_EXPECT" none "{tool} commit -q -f qcow2 {out}.top" "$CHAIN_BASE" "$CHAIN_TOP"
case_inplace rebase_safe "safe rebase (4 GiB chain: top over chain-mid onto chain-base)" \
    "cp --reflink=never --sparse=always $REBASE_TOP {out} && $QEMU_IMG rebase -u -f qcow2 -b $CHAIN_MID -F qcow2 {out}" \
    "$REBASE_EXPECT" "$CHAIN_BASE" "{tool} rebase -q -f qcow2 -b $CHAIN_BASE -F qcow2 {out}" "$CHAIN_BASE" "$CHAIN_MID" "$REBASE_TOP"
# `bench`: 4 KiB requests scattered over a 1 GiB qcow2, at queue depth 1 and 32, with cache=none
# (O_DIRECT) and writeback: reads and writes on the preallocated image, writes on a growing one.
# The preallocated copy is made with --sparse=never: its clusters were fallocated, which cp
# would otherwise read as holes and skip, so every write would allocate file blocks.
for cache in none writeback; do
    for depth in 1 32; do
        io="-c $BENCH_IO_REQUESTS -d $depth -t $cache -S $BENCH_IO_STEP -f qcow2"
        IO_REQUESTS=$BENCH_IO_REQUESTS case_ "bench_read_${cache}_qd${depth}" \
            "bench 4 KiB reads, QD $depth, cache=$cache, preallocated" stdout "" qcow2 \
            "{tool} bench $io $BENCH_FULL" "$BENCH_FULL"
        IO_REQUESTS=$BENCH_IO_REQUESTS case_inplace "bench_write_${cache}_qd${depth}" \
            "bench 4 KiB writes, QD $depth, cache=$cache, preallocated" \
            "cp --reflink=never --sparse=never $BENCH_FULL {out}" "$BENCH_EXPECT" none \
            "{tool} bench -w --pattern=165 $io {out}" "$BENCH_FULL"
        IO_REQUESTS=$BENCH_IO_REQUESTS case_inplace "bench_grow_${cache}_qd${depth}" \
            "bench 4 KiB writes, QD $depth, cache=$cache, growing image" \
            "$QEMU_IMG create -q -f qcow2 {out} 1G" "$BENCH_EXPECT" none \
            "{tool} bench -w --pattern=165 $io {out}"
    done
done

# What commit cannot avoid: writing the top's data into the base and making it durable.
FLOOR_1G=$BENCH_DIR/floor-1G.bin
[[ -f $FLOOR_1G ]] || head -c 1073741824 "$RAW" > "$FLOOR_1G"
FLOOR_TOOL=dd case_ sync_floor "floor: 1 GiB written and synced (dd conv=fdatasync)" none .bin raw \
    "{tool} if=$FLOOR_1G of={out} bs=1M conv=fdatasync status=none" "$FLOOR_1G"
FLOOR_FOR=$RAW case_ cp_floor "floor: cp --sparse=always raw → raw" none .raw raw \
    "{tool} --sparse=always $RAW {out}" "$RAW"
for fmt in qcow2 vmdk vdi vpc; do
    FLOOR_FOR=${FMT_FILE[$fmt]} case_ "cp_floor_$fmt" "floor: cp --sparse=always of the $fmt input" none \
        "${FMT_EXT[$fmt]}" "$fmt" "{tool} --sparse=always ${FMT_FILE[$fmt]} {out}" "${FMT_FILE[$fmt]}"
done

# Guest I/O over vhost-user-blk (vdisk serve vs qemu-storage-daemon): its own harness, since the
# timing happens inside the guest; its table is appended to the report below.
GUEST_IO_MD=$WORK/guest-io.md
rm -f "$GUEST_IO_MD"
if want guest_io; then
    log "case guest_io: bench/guest-io.sh ${GUEST_IO_RUNS:-3}"
    VDISK=$VDISK GUEST_IO_OUT=$GUEST_IO_MD "$HERE/guest-io.sh" "${GUEST_IO_RUNS:-3}" >&2
fi

# ---------------------------------------------------------------------------
# report

T_END=$(date +%s.%N)
TOTAL=$(python3 -c "print($T_END - $T_START)")
"${MEASURE[@]}" report --results "$RESULTS" --meta "$META" --md "$OUT_MD" --json "$OUT_JSON" \
    --total-runtime "$TOTAL" --svg "${BENCH_OUT_SVG:-$HERE/ratios.svg}"
if [[ -f $GUEST_IO_MD ]]; then
    { echo; sed '1s/^# /## /' "$GUEST_IO_MD"; } >> "$OUT_MD"
else
    # Not run this time: point at the newest saved guest report.
    LATEST_GUEST=$(ls "$HERE"/reports/*-guest-io.md 2>/dev/null | sort | tail -1 || true)
    if [[ -n $LATEST_GUEST ]]; then
        { echo; echo "## Guest I/O over vhost-user-blk"; echo
          echo "Not run with this report (case \`guest_io\`, about 10 minutes). The newest saved run:" \
               "[\`bench/reports/$(basename "$LATEST_GUEST")\`](bench/reports/$(basename "$LATEST_GUEST"))."; } >> "$OUT_MD"
    fi
fi
log "done in ${TOTAL%.*} s; wrote $OUT_MD and $OUT_JSON"
