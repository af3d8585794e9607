#!/usr/bin/env bash
# nbdcopy-from.sh SERVER IMAGE OUT: serves the qcow2 IMAGE read-only over a unix socket with SERVER
# (qemu-nbd, or a vdisk binary: `vdisk serve --nbd` with the same options) and copies the export to
# OUT with nbdcopy (libnbd, several connections). The server's start is part of the time.
set -euo pipefail
server=$1 image=$2 out=$3
sock=$(mktemp -u "${TMPDIR:-/tmp}/bench-nbd.XXXXXX")
case $(basename "$server") in
    qemu-nbd) "$server" -r -t -e 8 -x disk -f qcow2 -k "$sock" "$image" & ;;
    *) "$server" serve --nbd -r -t -e 8 -x disk -f qcow2 -k "$sock" "$image" & ;;
esac
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -f "$sock"' EXIT
for _ in $(seq 500); do [[ -S $sock ]] && break; sleep 0.01; done
nbdcopy "nbd+unix:///disk?socket=$sock" "$out"
