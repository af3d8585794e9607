#!/bin/bash
# Runs QEMU 10.0.2's own qemu-iotests for one image format, with vdisk as the qemu-img under test and
# QEMU's qemu-io / qemu-nbd as the independent oracle that writes and reads the data.
#
#   VDISK=target/release/vdisk iotests/run.sh FMT [TEST...]    FMT: raw, qcow2, vmdk, vdi or vpc
#   VDISK=target/release/vdisk iotests/run.sh enabled          each format in iotests/formats.txt
#
# Tests default to iotests/lists/FMT.txt; the ones EXCLUDED.md names for FMT are skipped (counted as
# skipped, listed with their reason). The last line is 'N passed, N failed, N skipped'; the exit status
# is non-zero when a test failed (or check itself broke).
#
# Environment:
#   VDISK=path         the binary under test. Unset: QEMU's qemu-img answers everything (the baseline).
#   MODE=route         (default) the subcommands in SUBCMDS go to vdisk, the others to QEMU's qemu-img.
#                      SUBCMDS defaults to iotests/subcommands.txt (what vdisk implements); SUBCMDS=all
#                      routes every call, SUBCMDS=create,info,check just those.
#   MODE=shadow        read-only subcommands in SUBCMDS (default info,check,map,measure,compare) run on both
#                      binaries; the test gets QEMU's result and every difference goes to OUT/FMT/shadow.log
#                      (or SHADOW_LOG).
#   INCLUDE_EXCLUDED=1 run the tests EXCLUDED.md names, too
#   JOBS=N             tests in parallel (default: nproc)
#   OUT=dir            results (default: target/iotests in the repository). OUT/FMT/ holds check.tap (TAP),
#                      check.log (check's stderr) and scratch/FMT-file-TEST/, each test's TEST_DIR, kept for
#                      failed and skipped tests: TEST.out.bad there is the output a failed test produced.
#   DIFF_LINES=N       lines of each failing test's diff printed here (default 400; 0 = all)
#   TIMEOUT=seconds    stop QEMU's check after this long (default 0: no limit); unfinished tests fail
#   REAL_QEMU_IMG, QEMU_IO_PROG, QEMU_NBD_PROG, PYTHON   the QEMU 10.0.2 tools, the python for check
#   IMG_LOG=file       log every qemu-img call and which binary answered it (see wrap/qemu-img)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
QEMU_VERSION=10.0.2
ALL_FORMATS=(raw qcow2 luks vmdk vdi vpc)

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2
  exit 2
}
die() { echo "run.sh: $*" >&2; exit 2; }

# The words of a list file, one per line; '#' starts a comment.
words() { awk '{ sub(/#.*/, ""); for (i = 1; i <= NF; i++) print $i }' "$1"; }

[ $# -ge 1 ] || usage
case "$1" in -h|--help) usage ;; esac
fmt=$1
shift

if [ "$fmt" = enabled ]; then
  [ $# = 0 ] || die "'enabled' runs each enabled format's own list; name a format to run single tests"
  rc=0
  while read -r f; do
    echo "=== iotests $f"
    "${BASH_SOURCE[0]}" "$f" || rc=1
  done < <(words "$HERE/formats.txt")
  exit "$rc"
fi
[[ " ${ALL_FORMATS[*]} " == *" $fmt "* ]] || die "unknown format '$fmt' (one of: ${ALL_FORMATS[*]}, enabled)"

# --- who answers which qemu-img subcommand
IMPL_IMG=""
if [ -n "${VDISK:-}" ]; then
  IMPL_IMG=$(realpath "$VDISK")
  [ -x "$IMPL_IMG" ] || die "VDISK=$VDISK is not an executable"
fi
MODE=${MODE:-route}
IMPL_SUBCMDS=""
SHADOW_SUBCMDS=""
case "$MODE" in
  route)
    IMPL_SUBCMDS=${SUBCMDS:-$(words "$HERE/subcommands.txt" | paste -sd, -)} ;;
  shadow)
    SHADOW_SUBCMDS=${SUBCMDS:-info,check,map,measure,compare}
    for s in ${SHADOW_SUBCMDS//,/ }; do
      case "$s" in info|check|map|measure|compare) ;; *) die "shadow mode runs only read-only subcommands, not '$s'" ;; esac
    done ;;
  *) die "MODE must be route or shadow" ;;
esac
[ -n "$IMPL_IMG" ] || IMPL_SUBCMDS=""
# Does vdisk answer subcommand $1 in this run?
to_vdisk() { [ -n "$IMPL_IMG" ] && [ "$MODE" = route ] && [[ "$IMPL_SUBCMDS" == all || ",$IMPL_SUBCMDS," == *",$1,"* ]]; }

# --- the tests
# Test names as check knows them: numbers padded to three digits, named tests as they are.
norm() { if [[ "$1" =~ ^[0-9]+$ ]]; then printf '%03d\n' "$((10#$1))"; else printf '%s\n' "$1"; fi; }

candidates=()
if [ $# -gt 0 ]; then
  for t in "$@"; do candidates+=("$(norm "$t")"); done
else
  [ -f "$HERE/lists/$fmt.txt" ] || die "no test list $HERE/lists/$fmt.txt"
  while read -r t; do candidates+=("$(norm "$t")"); done < <(words "$HERE/lists/$fmt.txt")
fi

# Exclusions: the table rows under '## FMT' in EXCLUDED.md, '| test | when | reason |'. when is
# 'always', 'vdisk: SUB, ...' (while vdisk answers any of those subcommands) or 'qemu-img: SUB, ...'
# (while QEMU's qemu-img answers any of them).
declare -A excluded=()
while IFS=$'\t' read -r t when reason; do
  applies=0
  case "$when" in
    always) applies=1 ;;
    vdisk:*|qemu-img:*)
      IFS=', ' read -ra subs <<< "${when#*:}"
      for s in "${subs[@]}"; do
        if [[ "$when" == vdisk:* ]]; then
          if to_vdisk "$s"; then applies=1; fi
        elif ! to_vdisk "$s"; then
          applies=1
        fi
      done ;;
    *) die "EXCLUDED.md, $fmt, $t: 'when' must be always, 'vdisk: SUB' or 'qemu-img: SUB', not '$when'" ;;
  esac
  [ "$applies" = 0 ] || excluded[$(norm "$t")]="$reason [$when]"
done < <(awk -v fmt="$fmt" '
  /^## / { cur = $2; next }
  cur == fmt && /^\|/ {
    split($0, c, "|"); t = c[2]; w = c[3]; r = c[4]
    gsub(/^[ \t`]+|[ \t`]+$/, "", t); gsub(/^[ \t]+|[ \t]+$/, "", w); gsub(/^[ \t]+|[ \t]+$/, "", r)
    if (t != "" && t != "test" && t !~ /^[-:]+$/) print t "\t" w "\t" r
  }' "$HERE/EXCLUDED.md")

tests=()
skipped_excl=()
declare -A seen=()
for t in "${candidates[@]}"; do
  [ -z "${seen[$t]+x}" ] || continue
  seen[$t]=1
  if [ -n "${excluded[$t]+x}" ] && [ "${INCLUDE_EXCLUDED:-0}" != 1 ]; then
    skipped_excl+=("$t")
  else
    tests+=("$t")
  fi
done

# --- QEMU's tools: the expected outputs are QEMU 10.0.2's, and qemu-io/qemu-nbd are the oracle.
REAL_QEMU_IMG=${REAL_QEMU_IMG:-$(command -v qemu-img || true)}
QEMU_IO_PROG=${QEMU_IO_PROG:-$(command -v qemu-io || true)}
QEMU_NBD_PROG=${QEMU_NBD_PROG:-$(command -v qemu-nbd || true)}
PYTHON=${PYTHON:-$(command -v python3 || true)}
for v in REAL_QEMU_IMG QEMU_IO_PROG QEMU_NBD_PROG PYTHON; do
  { [ -n "${!v}" ] && [ -x "${!v}" ]; } || die "$v: not found (install qemu-utils $QEMU_VERSION and python3; see .ci/run)"
done
for p in "$REAL_QEMU_IMG" "$QEMU_IO_PROG" "$QEMU_NBD_PROG"; do
  ver=$("$p" --version | awk 'NR == 1 { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+\.[0-9]+\.[0-9]+$/) { print $i; break } }')
  [ "$ver" = "$QEMU_VERSION" ] || die "$p is version $ver; the expected outputs are QEMU $QEMU_VERSION's"
done

# --- output directory
OUT_ROOT=${OUT:-$REPO/target/iotests}
mkdir -p "$OUT_ROOT"
out=$(cd "$OUT_ROOT" && pwd)/$fmt
# 197 and 215 skip themselves when TEST_DIR has other characters (a '.' in a mktemp name, say).
case "$out" in
  *[^-_a-zA-Z0-9/]*) echo "run.sh: warning: $out has characters outside [-_a-zA-Z0-9/]; some tests will skip" >&2 ;;
esac
rm -rf "$out"
mkdir -p "$out/scratch"

# Tests listed in lists/tmpfs.txt get their scratch directory on a tmpfs: their assertions about host
# allocation hold only on a filesystem whose free space is not fragmented (see that file). check makes
# TEST_DIR/FMT-file-TEST with mkdir -p, so a symlink there to a directory under /dev/shm is used as is.
shm_dirs=()
cleanup_shm() { if [ ${#shm_dirs[@]} -gt 0 ]; then rm -rf "${shm_dirs[@]}"; fi; }
declare -A on_tmpfs=()
while read -r t; do on_tmpfs[$(norm "$t")]=1; done < <(awk -v fmt="$fmt" '{ sub(/#.*/, "") } $1 == fmt && NF >= 2 { print $2 }' "$HERE/lists/tmpfs.txt")
trap cleanup_shm EXIT
for t in "${tests[@]}"; do
  [ -n "${on_tmpfs[$t]+x}" ] || continue
  if [ "$(stat -f -c %T /dev/shm 2>/dev/null)" != tmpfs ] || [ ! -w /dev/shm ]; then
    echo "run.sh: warning: /dev/shm is not a writable tmpfs; $fmt $t runs on $(stat -f -c %T "$out") and may fail there (lists/tmpfs.txt)" >&2
    continue
  fi
  d=$(mktemp -d /dev/shm/vdisk-iotests-XXXXXX)
  shm_dirs+=("$d")
  ln -s "$d" "$out/scratch/$fmt-file-${t##*/}"
done
tap=$out/check.tap
log=$out/check.log
: > "$tap"
: > "$log"
SHADOW_LOG=${SHADOW_LOG:-$out/shadow.log}
[ "$MODE" != shadow ] || : > "$SHADOW_LOG"

if [ -z "$IMPL_IMG" ]; then
  what="baseline: QEMU's qemu-img $REAL_QEMU_IMG answers every call"
elif [ "$MODE" = route ]; then
  what="vdisk $IMPL_IMG answers: ${IMPL_SUBCMDS:-nothing}; QEMU's qemu-img the rest"
else
  what="shadow: $SHADOW_SUBCMDS on vdisk $IMPL_IMG and on QEMU's qemu-img"
fi
echo "iotests $fmt: ${#tests[@]} tests, ${#skipped_excl[@]} excluded; $what"

# --- run QEMU's check
start=$SECONDS
rc=0
SRC=""
iotests=""
if [ ${#tests[@]} -gt 0 ]; then
  SRC=$("$HERE/fetch-qemu-src")
  iotests=$SRC/tests/qemu-iotests
  # Unix socket paths must stay short, so sockets get their own directory under /tmp.
  sock=$(mktemp -d "${TMPDIR:-/tmp}/vdisk-iotests.XXXXXX")
  trap 'rm -rf "$sock"; cleanup_shm' EXIT
  # check runs in OUT/FMT (its build dir: it keeps .last-elapsed-cache there), each test in the source
  # dir with TEST_DIR=OUT/FMT/scratch/FMT-file-TEST and SOCK_DIR under $sock.
  (
    cd "$out"
    export REAL_QEMU_IMG IMPL_IMG IMPL_SUBCMDS SHADOW_SUBCMDS SHADOW_LOG
    export QEMU_IMG_PROG=$HERE/wrap/qemu-img QEMU_PROG=$HERE/wrap/qemu-system QSD_PROG=$HERE/wrap/qemu-storage-daemon
    export QEMU_IO_PROG QEMU_NBD_PROG TEST_DIR=$out/scratch SOCK_DIR=$sock
    unset QEMU_IMG_OPTIONS QEMU_IO_OPTIONS QEMU_NBD_OPTIONS QEMU_OPTIONS IMGOPTS
    # timeout signals its whole process group: check, the tests and the daemons they started.
    timeout "${TIMEOUT:-0}" "$PYTHON" "$iotests/check" --source-dir "$iotests" --build-dir "$out" \
      --color off -"$fmt" -tap -j "${JOBS:-$(nproc)}" "${tests[@]}"
  ) > "$tap" 2> "$log" || rc=$?
fi
elapsed=$((SECONDS - start))
# A tmpfs scratch directory becomes a real one again, so what a failed test left stays after exit.
for l in "$out"/scratch/*; do
  [ -L "$l" ] || continue
  d=$(readlink "$l")
  rm "$l"
  cp -a "$d" "$l"
done
if [ "$rc" = 124 ]; then
  echo "run.sh: QEMU's check timed out after ${TIMEOUT}s; tests without a result count as failed" >&2
fi

# --- results
# The expected output check compared with (testrunner.py's find_reference for the default cache mode).
reference() {
  local r
  for r in "$1.out.$fmt" "$1.pc.out" "$1.out"; do
    if [ -f "$r" ]; then echo "$r"; return; fi
  done
  echo "$1.out"
}

# With -j, check's workers share stdout and a result line can land glued to the end of another
# ("ok qcow2 038ok qcow2 023"); split such lines before reading them.
results=$(perl -pe "s/(?<=\\S)((?:not )?ok \\Q$fmt\\E )/\\n\$1/g" "$tap")
passed=()
failed=()
skipped=()
noresult=()
for t in "${tests[@]}"; do
  name=${t##*/}
  line=$(grep -E "^(not )?ok $fmt $name( |\$)" <<<"$results" | tail -n 1 || true)
  case "$line" in
    "not ok "*) failed+=("$t") ;;
    *"# SKIP"*) skipped+=("$t") ;;
    "ok "*) passed+=("$t"); rm -rf "$out/scratch/$fmt-file-$name" ;;
    *) failed+=("$t"); noresult+=("$t") ;;
  esac
done

if [ ${#skipped[@]} -gt 0 ]; then
  echo "skipped by QEMU's check:"
  for t in "${skipped[@]}"; do
    name=${t##*/}
    reason=$(cat "$out/scratch/$fmt-file-$name/$name.notrun" 2>/dev/null || true)
    printf '  %-20s %s\n' "$t" "${reason:-(no reason recorded)}"
  done
fi
if [ ${#skipped_excl[@]} -gt 0 ]; then
  echo "excluded (iotests/EXCLUDED.md):"
  for t in "${skipped_excl[@]}"; do printf '  %-20s %s\n' "$t" "${excluded[$t]}"; done
fi

if [ ${#failed[@]} -gt 0 ]; then
  n=${DIFF_LINES:-400}
  for t in "${failed[@]}"; do
    [[ " ${noresult[*]} " != *" $t "* ]] || continue
    name=${t##*/}
    bad=$out/scratch/$fmt-file-$name/$name.out.bad
    ref=$(reference "$iotests/$t")
    echo
    echo "=== FAILED: $fmt $t  (diff -u ${ref#"$SRC/"} $bad)"
    if [ "$n" = 0 ]; then diff -u "$ref" "$bad" || true
    else diff -u "$ref" "$bad" | head -n "$n" || true; fi
  done
  if [ ${#noresult[@]} -gt 0 ]; then
    echo
    echo "=== NO RESULT from QEMU's check for: ${noresult[*]}"
    echo "(check exited with status $rc; the end of its stderr, $log:)"
    tail -n 50 "$log"
  fi
  echo
  echo "failed: ${failed[*]}"
fi
if [ "$MODE" = shadow ] && [ -n "$IMPL_IMG" ]; then
  echo "shadow: $(grep -c '^=== ' "$SHADOW_LOG" || true) calls differ (log: $SHADOW_LOG)"
fi

echo "TAP: $tap  (${elapsed}s)"
echo "${#passed[@]} passed, ${#failed[@]} failed, $(( ${#skipped[@]} + ${#skipped_excl[@]} )) skipped"
[ ${#failed[@]} = 0 ]
