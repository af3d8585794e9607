//! Crash consistency of the VDI driver (harness: `vdisk_tests::crash`, workloads:
//! `vdisk_tests::workloads`): every crash image of a dynamic or static image must open in vdisk,
//! read every sector as at the last completed flush (or as a request in flight left it), and
//! pass `qemu-img check` (a header block count one behind the map, the window between two
//! single-sector writes, is accepted).

use std::path::Path;

use blockdev::OpenOptions;
use formats::Registry;
use vdisk_tests::crash::{self, GuestOp, SectorModel};
use vdisk_tests::workloads::{discard_zeroes_mix, random_overwrite, sequential_fill};
use vdisk_tests::{qemu_img, s, tempdir};

const SIZE: u64 = 3 << 20;

fn judge(reg: &Registry, path: &Path) -> Result<SectorModel, String> {
    let drv = vdisk_tests::open_image(reg, path, Some("vdi"), &OpenOptions::default())
        .map_err(|e| format!("vdisk cannot open the crash image: {e}"))?;
    let content = SectorModel::read(&*drv)?;
    drop(drv);
    let q = qemu_img(&["check", "-f", "vdi", s(path)]);
    // The header's count of allocated blocks and the map entry are two writes in two sectors: a
    // crash between them leaves the count one behind the map (qemu has the same window; vdisk
    // recounts from the map at the next allocation). That finding alone is accepted.
    let errors: Vec<&str> = q.stderr.lines().filter(|l| l.starts_with("ERROR")).collect();
    let count_lag = q.code == 2 && errors.len() == 1 && errors[0].starts_with("ERROR: allocated blocks mismatch");
    if q.code != 0 && q.code != 3 && !count_lag {
        return Err(format!("qemu-img check exit {}:\n{}{}", q.code, q.stdout, q.stderr));
    }
    Ok(content)
}

fn reorder_samples() -> usize {
    vdisk_tests::model::env_number("VDISK_CRASH_REORDER").map_or(2, |n| n as usize)
}

/// Runs `ops` on a fresh image (`-o static=...`) and verifies every crash image.
fn run(name: &str, fixed: bool, ops: &[GuestOp]) {
    let d = tempdir();
    let reg = Registry::new();
    let img = d.path().join("crash-source.vdi");
    let o = if fixed { "static=on" } else { "static=off" };
    qemu_img(&["create", "-q", "-f", "vdi", "-o", o, s(&img), &SIZE.to_string()]).ok();
    let (files, drv) = crash::open_recording(&reg, "vdi", &img, &OpenOptions::read_write()).unwrap();
    let recorded = crash::record(&*drv, &files, ops, None).unwrap();
    drop(drv);
    std::fs::write(&img, files[0].current()).unwrap();
    judge(&reg, &img).unwrap_or_else(|e| panic!("{name}: after the workload: {e}"));
    let stats = crash::verify(&recorded, &[&img], reorder_samples(), |p| judge(&reg, p))
        .unwrap_or_else(|e| panic!("{name} ({o}): {e}"));
    assert!(stats.prefixes > 20, "{name}: too few cut points to mean anything: {stats:?}");
    eprintln!("crash vdi {name} {o}: {stats}");
}

#[test]
fn dynamic_images_survive_every_crash() {
    run("random overwrite", false, &random_overwrite(SIZE, 51));
    run("sequential fill", false, &sequential_fill(SIZE));
    run("discard/zeroes mix", false, &discard_zeroes_mix(SIZE, 65536, 52));
}

#[test]
fn static_images_survive_every_crash() {
    run("random overwrite", true, &random_overwrite(SIZE, 53));
}
