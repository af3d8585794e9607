//! Crash consistency of the VHD (vpc) driver (harness: `vdisk_tests::crash`, workloads:
//! `vdisk_tests::workloads`).
//!
//! Each workload runs on a disk opened over a recording container. Every crash image — every
//! prefix of the writes, torn multi-sector writes, sampled reorderings between flushes — must
//! open in vdisk and read every sector as it was at the last completed flush unless a request in
//! flight was writing it; dynamic disks must also compare equal in qemu-img to what vdisk reads
//! (qemu reads them through its own driver). Layouts: dynamic, fixed, and a differencing disk over
//! a parent filled with one byte.

use std::path::Path;

use blockdev::OpenOptions;
use formats::Registry;
use vdisk_tests::crash::{self, GuestOp, SectorModel};
use vdisk_tests::workloads::{discard_zeroes_mix, random_overwrite, sequential_fill};
use vdisk_tests::{qemu_img, qemu_io, s, tempdir};

/// 60 x 4 x 17 sectors: a size the CHS geometry covers exactly.
const SIZE: u64 = 60 * 4 * 17 * 512;
const PARENT_BYTE: u8 = 0x77;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Layout {
    Dynamic,
    Fixed,
    Differencing,
}

/// Creates the disk (named `crash-source.vhd`); returns its path.
fn create(dir: &Path, reg: &Registry, layout: Layout) -> std::path::PathBuf {
    let img = dir.join("crash-source.vhd");
    let size = SIZE.to_string();
    match layout {
        Layout::Dynamic => drop(qemu_img(&["create", "-q", "-f", "vpc", s(&img), &size]).ok()),
        Layout::Fixed => drop(qemu_img(&["create", "-q", "-f", "vpc", "-o", "subformat=fixed", s(&img), &size]).ok()),
        Layout::Differencing => {
            let parent = dir.join("parent.vhd");
            qemu_img(&["create", "-q", "-f", "vpc", s(&parent), &size]).ok();
            qemu_io(&["-f", "vpc", "-c", &format!("write -P {PARENT_BYTE:#x} 0 {SIZE}"), s(&parent)]).ok();
            let mut o = blockdev::options::CreateOptions::new();
            o.set("backing_file", "parent.vhd");
            reg.create("vpc", s(&img), &o).unwrap();
        }
    }
    img
}

/// Opens a crash image in vdisk and reads it; a dynamic one must read the same in qemu-img.
fn judge(reg: &Registry, path: &Path, layout: Layout) -> Result<SectorModel, String> {
    let drv = vdisk_tests::open_image(reg, path, Some("vpc"), &OpenOptions::default())
        .map_err(|e| format!("vdisk cannot open the crash image: {e}"))?;
    let content = SectorModel::read(&*drv)?;
    drop(drv);
    if layout == Layout::Dynamic {
        let raw = path.with_extension("raw");
        let mut bytes = Vec::with_capacity(content.sectors.len() * 512);
        for &b in &content.sectors {
            bytes.extend(std::iter::repeat_n(b, 512));
        }
        std::fs::write(&raw, &bytes).map_err(|e| e.to_string())?;
        let c = qemu_img(&["compare", "-f", "vpc", "-F", "raw", s(path), s(&raw)]);
        if c.code != 0 {
            return Err(format!("qemu-img compare: {}{}", c.stdout, c.stderr));
        }
    }
    Ok(content)
}

fn reorder_samples() -> usize {
    vdisk_tests::model::env_number("VDISK_CRASH_REORDER").map_or(2, |n| n as usize)
}

/// Runs `ops` on a fresh disk of `layout` and verifies every crash image.
fn run(name: &str, layout: Layout, ops: &[GuestOp]) {
    let d = tempdir();
    let reg = Registry::new();
    let img = create(d.path(), &reg, layout);
    let (files, drv) = crash::open_recording(&reg, "vpc", &img, &OpenOptions::read_write()).unwrap();
    let backing = (layout == Layout::Differencing).then_some(PARENT_BYTE);
    let recorded = crash::record(&*drv, &files, ops, backing).unwrap();
    drop(drv);
    std::fs::write(&img, files[0].current()).unwrap();
    judge(&reg, &img, layout).unwrap_or_else(|e| panic!("{name}: after the workload: {e}"));
    let stats = crash::verify(&recorded, &[&img], reorder_samples(), |p| judge(&reg, p, layout))
        .unwrap_or_else(|e| panic!("{name} ({layout:?}): {e}"));
    assert!(stats.prefixes > 20, "{name}: too few cut points to mean anything: {stats:?}");
    eprintln!("crash vpc {name} {layout:?}: {stats}");
}

#[test]
fn dynamic_disks_survive_every_crash() {
    run("random overwrite", Layout::Dynamic, &random_overwrite(SIZE, 41));
    run("sequential fill", Layout::Dynamic, &sequential_fill(SIZE));
}

#[test]
fn fixed_disks_survive_every_crash() {
    run("random overwrite", Layout::Fixed, &random_overwrite(SIZE, 42));
}

#[test]
fn differencing_disks_survive_every_crash() {
    run("random overwrite", Layout::Differencing, &random_overwrite(SIZE, 43));
    run("discard/zeroes mix", Layout::Differencing, &discard_zeroes_mix(SIZE, 65536, 44));
}
