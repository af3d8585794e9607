#!/bin/bash
# CI smoke run of every fuzz target: seeds the corpora, builds all targets once, runs each for
# SECONDS (default 60) and prints the executions each one did. Exits non-zero if a target
# crashed (panic, timeout, out-of-memory: libFuzzer then leaves the input in artifacts/<target>/)
# or did not run. Needs stable Rust; installs cargo-fuzz when missing.
#
#   fuzz/scripts/smoke.sh [SECONDS]
set -uo pipefail
SECONDS_PER_TARGET=${1:-60}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$HERE"
export RUSTC_BOOTSTRAP=1
export PATH="$HOME/.cargo/bin:$PATH"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "smoke: installing cargo-fuzz"
    cargo install cargo-fuzz --locked || exit 1
fi
scripts/seed.sh || exit 1
echo "smoke: building all targets"
cargo fuzz build -O || exit 1

# Longest input for each target: whole images for the image targets, a header cluster, a few
# hundred bytes of structured mutations, short texts for the text parsers.
max_len() {
    case $1 in
        qcow2_image | probe | vmdk_image | vpc_image | vdi_image) echo 524288 ;;
        qcow2_header | qcow2_snapshot_table) echo 65536 ;;
        qcow2_tables) echo 512 ;;
        nbd_server | nbd_client) echo 65536 ;;
        virtio_blk_request) echo 65600 ;;
        *) echo 4096 ;;
    esac
}

LOGS=$(mktemp -d)
trap 'rm -rf "$LOGS"' EXIT
failed=()
printf '%-16s %12s %8s  %s\n' target executions seconds result
for target in $(cargo fuzz list); do
    start=$(date +%s)
    cargo fuzz run -O "$target" -- \
        -max_total_time="$SECONDS_PER_TARGET" -max_len="$(max_len "$target")" -len_control=0 \
        -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$LOGS/$target.log" 2>&1
    rc=$?
    took=$(($(date +%s) - start))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$LOGS/$target.log" | tail -1)
    result=ok
    if [ "$rc" -ne 0 ] || [ -z "$execs" ]; then
        result="FAILED (exit $rc)"
        failed+=("$target")
    fi
    printf '%-16s %12s %8s  %s\n' "$target" "${execs:-?}" "$took" "$result"
    if [ "$result" != ok ]; then
        echo "---- last lines of the $target log:"
        grep -v -e '^#[0-9]' "$LOGS/$target.log" | tail -40
        echo "----"
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "smoke: crashed: ${failed[*]} (inputs in fuzz/artifacts/<target>/; reproduce with"
    echo "       RUSTC_BOOTSTRAP=1 cargo fuzz run -O <target> fuzz/artifacts/<target>/<file>)"
    exit 1
fi
echo "smoke: all targets ran ${SECONDS_PER_TARGET}s without a crash"
