#!/usr/bin/env bash
# Builds (once, cached) the guest the end-to-end tests boot under QEMU (TCG): Debian 12's cloud
# kernel (downloaded with apt-get download and unpacked, not installed) and an initramfs of static
# busybox, the six virtio modules, tests/e2e/init and the static iobench (tests/e2e/iobench.c).
# Prints the kernel's and the initramfs's paths
# on two lines.
#
# Needs: apt-get (with the machine's Debian sources), dpkg-deb, busybox-static, cpio-capable
# busybox, gzip. Cache: ${VDISK_E2E_CACHE:-~/.cache/vdisk-e2e}; the initramfs is rebuilt when init
# changes.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${VDISK_E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vdisk-e2e}
mkdir -p "$CACHE"
say() { echo "guest-assets: $*" >&2; }
# Tests run in parallel and may call this at once: one builds, the others wait for it.
exec 9>"$CACHE/.lock"
flock 9

if [[ ! -f $CACHE/vmlinuz ]]; then
    pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ { print $2; exit }')
    [[ -n $pkg ]] || { say "no linux-image-cloud-amd64 in the apt sources"; exit 1; }
    say "downloading $pkg"
    rm -rf "$CACHE/kernel" && mkdir -p "$CACHE/kernel"
    (cd "$CACHE/kernel" && apt-get download -q "$pkg" >&2)
    dpkg-deb -x "$CACHE"/kernel/*.deb "$CACHE/kernel/root"
    mods=$CACHE/modules && rm -rf "$mods" && mkdir -p "$mods"
    for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
        f=$(find "$CACHE/kernel/root/lib/modules" -name "$m.ko*" | head -n 1)
        [[ -n $f ]] || { say "module $m not found in $pkg"; exit 1; }
        case $f in
            *.xz) xz -dc "$f" > "$mods/$m.ko" ;;
            *.zst) zstd -dqc "$f" > "$mods/$m.ko" ;;
            *) cp "$f" "$mods/$m.ko" ;;
        esac
    done
    cp "$CACHE"/kernel/root/boot/vmlinuz-* "$CACHE/vmlinuz.tmp"
    rm -rf "$CACHE/kernel"
    mv "$CACHE/vmlinuz.tmp" "$CACHE/vmlinuz"
fi

stamp=$(cat "$HERE/init" "$HERE/iobench.c" | sha256sum | cut -c1-16)
if [[ ! -f $CACHE/initramfs-$stamp.cpio.gz ]]; then
    bb=$(command -v busybox) || { say "busybox-static is not installed"; exit 1; }
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    mkdir -p "$root"/{bin,dev,proc,sys,lib}
    cp "$bb" "$root/bin/busybox"
    cp "$CACHE"/modules/*.ko "$root/lib/"
    cp "$HERE/init" "$root/init"
    # The I/O benchmark of bench/guest-io.sh (static: the initramfs has no C library).
    cc -static -O2 -o "$root/bin/iobench" "$HERE/iobench.c"
    chmod +x "$root/init"
    (cd "$root" && find . | "$bb" cpio -o -H newc 2>/dev/null | gzip -1) > "$CACHE/initramfs-$stamp.cpio.gz.tmp"
    mv "$CACHE/initramfs-$stamp.cpio.gz.tmp" "$CACHE/initramfs-$stamp.cpio.gz"
fi
echo "$CACHE/vmlinuz"
echo "$CACHE/initramfs-$stamp.cpio.gz"
