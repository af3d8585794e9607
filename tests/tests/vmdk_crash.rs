//! Crash consistency of the VMDK driver (harness: `vdisk_tests::crash`, workloads:
//! `vdisk_tests::workloads`).
//!
//! Each workload runs on a disk opened over recording containers (the descriptor or monolithic
//! file and every extent file it names, in one log). Every crash image — every prefix of the
//! writes, torn multi-sector writes, sampled reorderings between flushes — must open in vdisk, pass
//! `qemu-img check`, and read every sector as it was at the last completed flush unless a request
//! in flight was writing it. Layouts: monolithicSparse with and without zeroed grains,
//! twoGbMaxExtentSparse (descriptor plus extent file), monolithicFlat, and a delta disk over a
//! parent filled with one byte.
//!
//! Also checks the unclean-shutdown flag: a crash image cut after the first change of the session
//! has it set, the clean close clears it.

use std::path::{Path, PathBuf};

use blockdev::{OpenOptions, Storage};
use formats::Registry;
use vdisk_tests::crash::{self, GuestOp, SectorModel};
use vdisk_tests::workloads::{discard_zeroes_mix, random_overwrite, sequential_fill};
use vdisk_tests::{qemu_img, qemu_io, s, tempdir};

const SIZE: u64 = 2 << 20;
const PARENT_BYTE: u8 = 0x77;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Layout {
    Sparse,
    SparseZeroedGrains,
    SplitSparse,
    Flat,
    Delta,
}

/// Creates the disk (named `crash-source.vmdk`) with qemu-img; returns its path.
fn create(dir: &Path, layout: Layout) -> PathBuf {
    let img = dir.join("crash-source.vmdk");
    let size = SIZE.to_string();
    let mut args = vec!["create", "-q", "-f", "vmdk"];
    let parent = dir.join("parent.vmdk");
    match layout {
        Layout::Sparse => {}
        Layout::SparseZeroedGrains => args.extend(["-o", "zeroed_grain=on"]),
        Layout::SplitSparse => args.extend(["-o", "subformat=twoGbMaxExtentSparse"]),
        Layout::Flat => args.extend(["-o", "subformat=monolithicFlat"]),
        Layout::Delta => {
            qemu_img(&["create", "-q", "-f", "vmdk", s(&parent), &size]).ok();
            qemu_io(&["-f", "vmdk", "-c", &format!("write -P {PARENT_BYTE:#x} 0 {SIZE}"), s(&parent)]).ok();
            args.extend(["-b", s(&parent), "-F", "vmdk"]);
        }
    }
    qemu_img(&[&args[..], &[s(&img), &size]].concat()).ok();
    img
}

/// Opens a crash image in vdisk and reads it, and requires `qemu-img check` to pass.
fn judge(reg: &Registry, path: &Path) -> Result<SectorModel, String> {
    let drv = vdisk_tests::open_image(reg, path, Some("vmdk"), &OpenOptions::default())
        .map_err(|e| format!("vdisk cannot open the crash image: {e}"))?;
    let content = SectorModel::read(&*drv)?;
    drop(drv);
    let q = qemu_img(&["check", "-f", "vmdk", s(path)]);
    if q.code != 0 && !q.stderr.contains("does not support checks") {
        return Err(format!("qemu-img check exit {}:\n{}{}", q.code, q.stdout, q.stderr));
    }
    Ok(content)
}

fn reorder_samples() -> usize {
    vdisk_tests::model::env_number("VDISK_CRASH_REORDER").map_or(2, |n| n as usize)
}

/// The unclean-shutdown byte of a sparse file's header, if `bytes` is one.
fn unclean_flag(bytes: &[u8]) -> Option<u8> {
    bytes.starts_with(b"KDMV").then(|| bytes[72])
}

/// Runs `ops` on a fresh disk of `layout` and verifies every crash image.
fn run(name: &str, layout: Layout, ops: &[GuestOp]) {
    let d = tempdir();
    let reg = Registry::new();
    let img = create(d.path(), layout);
    let (files, drv) = crash::open_recording(&reg, "vmdk", &img, &OpenOptions::read_write()).unwrap();
    let expected_files = if matches!(layout, Layout::SplitSparse | Layout::Flat) { 2 } else { 1 };
    assert_eq!(files.len(), expected_files, "{name}: every extent file is recorded");
    let backing = (layout == Layout::Delta).then_some(PARENT_BYTE);
    let recorded = crash::record(&*drv, &files, ops, backing).unwrap();
    drop(drv);
    // The workload left a clean disk: written back, it checks clean, its flags are clear.
    let paths: Vec<PathBuf> = files.iter().map(|f| PathBuf::from(f.name())).collect();
    for (f, p) in files.iter().zip(&paths) {
        let now = f.current();
        assert_ne!(unclean_flag(&now), Some(1), "{name}: {} keeps the unclean flag", s(p));
        std::fs::write(p, now).unwrap();
    }
    judge(&reg, &img).unwrap_or_else(|e| panic!("{name}: after the workload: {e}"));
    // Crash images replace the files in place (the descriptor names its extents).
    let path_refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    let mut flagged = 0;
    let stats = crash::verify_with(&recorded, &path_refs, reorder_samples(), |_, p| {
        let content = judge(&reg, p[0])?;
        let sparse = std::fs::read(p.last().unwrap()).map_err(|e| e.to_string())?;
        flagged += (unclean_flag(&sparse) == Some(1)) as usize;
        Ok(content)
    })
    .unwrap_or_else(|e| panic!("{name} ({layout:?}): {e}"));
    assert!(stats.prefixes > 20, "{name}: too few cut points to mean anything: {stats:?}");
    if layout != Layout::Flat {
        assert!(flagged > stats.total() / 2, "{name}: crash images mid-session should carry the unclean flag");
    }
    eprintln!("crash vmdk {name} {layout:?}: {stats}, {flagged} flagged unclean");
}

#[test]
fn sparse_disks_survive_every_crash() {
    run("random overwrite", Layout::Sparse, &random_overwrite(SIZE, 31));
    run("discard/zeroes mix", Layout::Sparse, &discard_zeroes_mix(SIZE, 65536, 32));
}

#[test]
fn zeroed_grain_disks_survive_every_crash() {
    run("discard/zeroes mix", Layout::SparseZeroedGrains, &discard_zeroes_mix(SIZE, 65536, 33));
}

#[test]
fn split_sparse_disks_survive_every_crash() {
    run("sequential fill", Layout::SplitSparse, &sequential_fill(SIZE));
}

#[test]
fn flat_disks_survive_every_crash() {
    run("random overwrite", Layout::Flat, &random_overwrite(SIZE, 34));
}

#[test]
fn delta_disks_survive_every_crash() {
    run("random overwrite", Layout::Delta, &random_overwrite(SIZE, 35));
    run("discard/zeroes mix", Layout::Delta, &discard_zeroes_mix(SIZE, 65536, 36));
}
