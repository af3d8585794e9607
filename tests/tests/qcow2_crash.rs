//! Crash consistency of the qcow2 driver (harness: `vdisk_tests::crash`).
//!
//! Each workload runs on an image opened over a recording container. Then every crash image —
//! every prefix of the writes, torn multi-sector writes, and sampled reorderings of the writes
//! between two flushes — must open, pass vdisk's check and `qemu-img check` with no corruption
//! (leaks allowed; images with lazy refcounts are first repaired by opening them read-write, as
//! vdisk and qemu do with a dirty image), and read back every sector as it was at the last
//! completed flush unless a request in flight since then was writing it.
//!
//! Workloads: a sequential fill, random overwrites, a mix of writes, zeroes and discards, growth
//! past the L1 table's and the refcount table's first cluster, and internal snapshots taken,
//! deleted and applied between writes (every snapshot a crash image lists must read as it was
//! taken; an apply in flight may leave either content), persistent bitmap operations (every
//! bitmap a crash image lists must load); with and without lazy
//! refcounts, a backing file and an external data file (recorded in the same log).
//!
//! Commit (`formats::commit::commit_into`, then emptying the top, in the order `qemu-img commit`
//! runs them): a qcow2 top with scattered writes and zero writes over a qcow2 base (smaller than
//! the top, so the commit grows it) or a raw one, with the top and the base recorded in one log.
//! Every crash image must pass both checks (top, and qcow2 base), read through the chain exactly
//! as the top did before the commit, have a base holding per sector its old content or the top's,
//! and, once the base's flush was durable, a base holding the top's content.
//!
//! `VDISK_CRASH_REORDER` sets the reordered samples per crash point (default 2),
//! `VDISK_CRASH_SEEDS` the seeds per random workload (default 1).

use std::path::{Path, PathBuf};

use blockdev::{OpenOptions, RepairMode};
use formats::Registry;
use vdisk_tests::crash::{self, GuestOp, SectorModel, SECTOR};
use vdisk_tests::workloads::{discard_zeroes_mix, random_overwrite, random_range, sequential_fill};
use vdisk_tests::{qemu_img, qemu_io, s, tempdir, XorShift};

/// The backing file's fill.
const BACKING_BYTE: u8 = 0x77;

#[derive(Debug, Clone, Copy)]
struct Setup {
    size: u64,
    cluster: u64,
    refcount_bits: u32,
    lazy: bool,
    backing: bool,
    /// Guest data in an external data file.
    data_file: bool,
}

impl Setup {
    fn small(lazy: bool, backing: bool) -> Setup {
        Setup { size: 2 << 20, cluster: 4096, refcount_bits: 16, lazy, backing, data_file: false }
    }

    fn with_data_file(self) -> Setup {
        Setup { data_file: true, ..self }
    }
}

/// The external data file next to the image.
fn data_file_of(dir: &Path) -> PathBuf {
    dir.join("crash-source.data")
}

/// Creates the image (with vdisk) and, if asked, a raw backing file filled with [`BACKING_BYTE`].
fn create(dir: &Path, reg: &Registry, st: Setup) -> PathBuf {
    let img = dir.join("crash-source.qcow2");
    let mut o = blockdev::options::CreateOptions::new();
    o.set("size", &st.size.to_string());
    o.set("cluster_size", &st.cluster.to_string());
    o.set("refcount_bits", &st.refcount_bits.to_string());
    o.set("lazy_refcounts", if st.lazy { "on" } else { "off" });
    if st.data_file {
        o.set("data_file", s(&data_file_of(dir)));
    }
    if st.backing {
        let base = dir.join("base.raw");
        // Larger than the disk will grow to, so all of it reads the backing file's fill.
        let len = 8 << 20;
        qemu_img(&["create", "-q", "-f", "raw", s(&base), &len.to_string()]).ok();
        qemu_io(&["-f", "raw", "-c", &format!("write -P {BACKING_BYTE:#x} 0 {len}"), s(&base)]).ok();
        o.set("backing_file", s(&base));
        o.set("backing_fmt", "raw");
    }
    reg.create("qcow2", s(&img), &o).unwrap();
    img
}

/// Opens a crash image, checks its metadata with vdisk and qemu-img and the content of every
/// snapshot it lists against `snapshots` (what the workload took them with), and returns its
/// content.
fn judge(reg: &Registry, path: &Path, lazy: bool, snapshots: &[(String, SectorModel)]) -> Result<SectorModel, String> {
    let drv = vdisk_tests::open_image(reg, path, Some("qcow2"), &OpenOptions::default())
        .map_err(|e| format!("vdisk cannot open the crash image: {e}"))?;
    let content = SectorModel::read(&*drv)?;
    drop(drv);
    if lazy {
        // A dirty image's refcounts are rebuilt when it is opened read-write.
        let drv = vdisk_tests::open_image(reg, path, Some("qcow2"), &OpenOptions::read_write())
            .map_err(|e| format!("vdisk cannot open the crash image read-write: {e}"))?;
        drv.close().map_err(|e| format!("close after repair: {e}"))?;
    }
    let drv = vdisk_tests::open_image(reg, path, Some("qcow2"), &OpenOptions::default())
        .map_err(|e| format!("vdisk cannot reopen the crash image: {e}"))?;
    let mut lines = Vec::new();
    let report = drv
        .check()
        .expect("qcow2 has check")
        .check(RepairMode::None, &mut |l| lines.push(l.to_string()))
        .map_err(|e| format!("vdisk check: {e}"))?;
    // A crash inside a snapshot operation may leave COPIED flags that disagree with refcounts
    // (raised before the flags are cleared, or lowered before they are set; qemu has the same
    // window). That is no harm to data: a write copies a cluster it could have written in place,
    // or writes in place a cluster no snapshot in the table refers to. Snapshot workloads accept
    // those findings only, and `check -r all` must then leave a clean image.
    let copied_only = |findings: u64, lines: &[String]| {
        !snapshots.is_empty() && findings == lines.iter().filter(|l| l.contains("OFLAG_COPIED")).count() as u64
    };
    if report.check_errors > 0 || (report.corruptions > 0 && !copied_only(report.corruptions, &lines)) {
        return Err(format!("vdisk check: {report:?}\n{}", lines.join("\n")));
    }
    drop(drv);
    let q = qemu_img(&["check", "-f", "qcow2", s(path)]);
    let q_lines: Vec<String> = q.stderr.lines().filter(|l| l.starts_with("ERROR")).map(str::to_string).collect();
    let q_ok = q.code == 0 || q.code == 3 || (q.code == 2 && copied_only(q_lines.len() as u64, &q_lines));
    if !q_ok {
        return Err(format!("qemu-img check exit {}:\n{}{}", q.code, q.stdout, q.stderr));
    }
    if q.code == 2 {
        let copy = path.with_extension("repaired");
        std::fs::copy(path, &copy).map_err(|e| e.to_string())?;
        let r = qemu_img(&["check", "-q", "-r", "all", "-f", "qcow2", s(&copy)]);
        let again = qemu_img(&["check", "-f", "qcow2", s(&copy)]);
        if again.code != 0 {
            return Err(format!("after qemu-img check -r all (exit {}): {}{}", r.code, again.stdout, again.stderr));
        }
    }
    check_snapshots(reg, path, snapshots)?;
    Ok(content)
}

/// Every snapshot a crash image lists must read as it was taken.
fn check_snapshots(reg: &Registry, path: &Path, snapshots: &[(String, SectorModel)]) -> Result<(), String> {
    if snapshots.is_empty() {
        return Ok(());
    }
    let open = || {
        vdisk_tests::open_image(reg, path, Some("qcow2"), &OpenOptions::default())
            .map_err(|e| format!("vdisk cannot open the crash image: {e}"))
    };
    let listed = open()?.snapshots().expect("qcow2 has snapshots").list().map_err(|e| format!("list: {e}"))?;
    for sn in listed {
        let want = snapshots
            .iter()
            .find(|(n, _)| *n == sn.name)
            .map(|(_, m)| m)
            .ok_or_else(|| format!("the crash image lists a snapshot never taken: {sn:?}"))?;
        let drv = open()?;
        drv.snapshots()
            .expect("qcow2 has snapshots")
            .load_temporarily(None, Some(&sn.name))
            .map_err(|e| format!("load snapshot {}: {e}", sn.name))?;
        let got = SectorModel::read(&*drv)?;
        if got.sectors[..want.sectors.len().min(got.sectors.len())] != want.sectors[..] {
            return Err(format!("snapshot {} does not read as it was taken", sn.name));
        }
    }
    Ok(())
}

/// Seeds per random workload (`VDISK_CRASH_SEEDS`, default 1; long runs use more).
fn seeds() -> u64 {
    vdisk_tests::model::env_number("VDISK_CRASH_SEEDS").unwrap_or(1)
}

fn reorder_samples() -> usize {
    vdisk_tests::model::env_number("VDISK_CRASH_REORDER").map_or(2, |n| n as usize)
}

/// Runs `ops` on a fresh image made by `st` and verifies every crash image; returns the image's
/// bytes before and after the workload.
fn run(name: &str, st: Setup, ops: &[GuestOp]) -> (Vec<u8>, Vec<u8>) {
    let d = tempdir();
    let reg = Registry::new();
    let img = create(d.path(), &reg, st);
    let (files, drv) = crash::open_recording(&reg, "qcow2", &img, &OpenOptions::read_write()).unwrap();
    assert_eq!(files.len(), if st.data_file { 2 } else { 1 }, "the data file is recorded too");
    let recorded = crash::record(&*drv, &files, ops, st.backing.then_some(BACKING_BYTE)).unwrap();
    drop(drv);
    // The workload itself left a clean image with the final content.
    std::fs::write(&img, files[0].current()).unwrap();
    if st.data_file {
        std::fs::write(data_file_of(d.path()), files[1].current()).unwrap();
    }
    let q = qemu_img(&["check", "-f", "qcow2", s(&img)]);
    assert_eq!(q.code, 0, "{name}: qemu-img check after the workload:\n{}{}", q.stdout, q.stderr);
    // Crash images of the data file replace it (the image names it).
    let crash_img = d.path().join("crash.qcow2");
    let data = data_file_of(d.path());
    let paths: Vec<&Path> = if st.data_file { vec![&crash_img, &data] } else { vec![&crash_img] };
    let stats = crash::verify(&recorded, &paths, reorder_samples(), |p| judge(&reg, p, st.lazy, &recorded.snapshots))
        .unwrap_or_else(|e| panic!("{name} ({st:?}): {e}"));
    assert!(stats.prefixes > 20, "{name}: too few cut points to mean anything: {stats:?}");
    eprintln!("crash {name} lazy={} backing={} data_file={}: {stats}", st.lazy, st.backing, st.data_file);
    (recorded.initial[0].clone(), files[0].current())
}

/// The header's (L1 table offset, refcount table offset).
fn table_offsets(image: &[u8]) -> (u64, u64) {
    let be = |at: usize| u64::from_be_bytes(image[at..at + 8].try_into().unwrap());
    (be(40), be(48))
}

/// Runs the growth workload and checks that both tables really moved.
fn run_growth(st: Setup) {
    let (before, after) = run("growth", st, &growth(st));
    let (l1_before, rt_before) = table_offsets(&before);
    let (l1_after, rt_after) = table_offsets(&after);
    assert_ne!(l1_before, l1_after, "the L1 table did not move");
    assert_ne!(rt_before, rt_after, "the refcount table did not move");
}

/// 512-byte clusters and 64-bit refcounts: the L1 table of a 1 MiB disk fits one cluster and
/// one refcount table cluster covers 2 MiB of file. Filling the disk, growing it to 4 MiB (the
/// L1 table moves) and filling that makes the file cross 2 MiB (the refcount table moves).
fn growth(setup: Setup) -> Vec<GuestOp> {
    let piece = 96 * 1024;
    let mut ops = vec![];
    let mut byte = 1u8;
    let mut fill = |ops: &mut Vec<GuestOp>, from: u64, to: u64| {
        let mut off = from;
        while off < to {
            let len = piece.min(to - off);
            ops.push(GuestOp::Write { offset: off, len, byte });
            byte = byte.wrapping_add(1).max(1);
            if ops.len() % 3 == 2 {
                ops.push(GuestOp::Flush);
            }
            off += len;
        }
    };
    fill(&mut ops, 0, setup.size);
    ops.push(GuestOp::Grow(4 << 20));
    fill(&mut ops, setup.size - 8 * SECTOR, 3 << 20);
    ops
}

/// Writes and zeroes between snapshot creates, deletes and applies (of snapshots still there).
fn snapshot_mix(size: u64, cluster: u64, seed: u64) -> Vec<GuestOp> {
    let mut rng = XorShift::new(seed);
    let mut ops = vec![GuestOp::Write { offset: 0, len: size / 2, byte: 0xc0 }, GuestOp::Flush];
    let mut live: Vec<u8> = Vec::new();
    let mut next = 1u8;
    for i in 0..40u64 {
        let pick = |rng: &mut XorShift, live: &[u8]| live[rng.below(live.len() as u64) as usize];
        match rng.below(10) {
            0 | 1 => {
                ops.push(GuestOp::Snapshot(next));
                live.push(next);
                next += 1;
            }
            2 if !live.is_empty() => {
                let n = pick(&mut rng, &live);
                live.retain(|&x| x != n);
                ops.push(GuestOp::DeleteSnapshot(n));
            }
            3 if !live.is_empty() => ops.push(GuestOp::ApplySnapshot(pick(&mut rng, &live))),
            4 => ops.push(GuestOp::Flush),
            5 => {
                let (offset, len) = random_range(&mut rng, size / 2, 4 * cluster / SECTOR);
                ops.push(GuestOp::Zeroes { offset, len, unmap: rng.below(2) == 0 });
            }
            _ => {
                let (offset, len) = random_range(&mut rng, size / 2, 6 * cluster / SECTOR);
                ops.push(GuestOp::Write { offset, len, byte: (i % 250) as u8 + 2 });
            }
        }
    }
    ops
}

fn growth_setup(lazy: bool, backing: bool) -> Setup {
    Setup { size: 1 << 20, cluster: 512, refcount_bits: 64, lazy, backing, data_file: false }
}

#[test]
fn sequential_fill_survives_every_crash() {
    let st = Setup::small(false, false);
    run("sequential fill", st, &sequential_fill(st.size));
}

#[test]
fn sequential_fill_over_backing_file_with_lazy_refcounts_survives_every_crash() {
    let st = Setup::small(true, true);
    run("sequential fill", st, &sequential_fill(st.size));
}

#[test]
fn random_overwrite_survives_every_crash() {
    let st = Setup::small(false, false);
    for k in 0..seeds() {
        run("random overwrite", st, &random_overwrite(st.size, 11 + 1000 * k));
    }
}

#[test]
fn random_overwrite_over_backing_file_survives_every_crash() {
    let st = Setup::small(false, true);
    for k in 0..seeds() {
        run("random overwrite", st, &random_overwrite(st.size, 12 + 1000 * k));
    }
}

#[test]
fn random_overwrite_with_lazy_refcounts_survives_every_crash() {
    let st = Setup::small(true, false);
    for k in 0..seeds() {
        run("random overwrite", st, &random_overwrite(st.size, 13 + 1000 * k));
    }
}

#[test]
fn discard_zeroes_mix_survives_every_crash() {
    let st = Setup::small(false, false);
    for k in 0..seeds() {
        run("discard/zeroes mix", st, &discard_zeroes_mix(st.size, st.cluster, 21 + 1000 * k));
    }
}

#[test]
fn discard_zeroes_mix_over_backing_file_survives_every_crash() {
    let st = Setup::small(false, true);
    for k in 0..seeds() {
        run("discard/zeroes mix", st, &discard_zeroes_mix(st.size, st.cluster, 22 + 1000 * k));
    }
}

#[test]
fn discard_zeroes_mix_with_lazy_refcounts_survives_every_crash() {
    let st = Setup::small(true, false);
    for k in 0..seeds() {
        run("discard/zeroes mix", st, &discard_zeroes_mix(st.size, st.cluster, 23 + 1000 * k));
    }
}

#[test]
fn growth_past_l1_and_refcount_table_survives_every_crash() {
    run_growth(growth_setup(false, false));
}

#[test]
fn growth_over_backing_file_with_lazy_refcounts_survives_every_crash() {
    run_growth(growth_setup(true, true));
}

#[test]
fn random_overwrite_with_external_data_file_survives_every_crash() {
    let st = Setup::small(false, false).with_data_file();
    for k in 0..seeds() {
        run("random overwrite", st, &random_overwrite(st.size, 14 + 1000 * k));
    }
}

#[test]
fn discard_zeroes_mix_with_external_data_file_and_lazy_refcounts_survives_every_crash() {
    let st = Setup::small(true, true).with_data_file();
    for k in 0..seeds() {
        run("discard/zeroes mix", st, &discard_zeroes_mix(st.size, st.cluster, 24 + 1000 * k));
    }
}

#[test]
fn snapshot_create_delete_apply_survive_every_crash() {
    let st = Setup::small(false, false);
    for k in 0..seeds() {
        run("snapshot mix", st, &snapshot_mix(st.size, st.cluster, 31 + 1000 * k));
    }
}

#[test]
fn snapshots_over_backing_file_with_lazy_refcounts_survive_every_crash() {
    let st = Setup::small(true, true);
    for k in 0..seeds() {
        run("snapshot mix", st, &snapshot_mix(st.size, st.cluster, 32 + 1000 * k));
    }
}

/// The commit workload's images: a base of `base_fmt` and a qcow2 top over it.
#[derive(Debug, Clone, Copy)]
struct CommitSetup {
    base_fmt: &'static str,
    base_size: u64,
    top_size: u64,
}

/// The recording containers of the commit workload: the top, then its backing file (the base).
const TOP: usize = 0;
const BASE: usize = 1;

/// Makes the base (known content: three filled runs, the rest unallocated) and a qcow2 top over it
/// with scattered writes and zero writes (aligned ones over the base's data too); returns the
/// top's and the base's paths.
fn commit_images(dir: &Path, st: CommitSetup, seed: u64) -> (PathBuf, PathBuf) {
    let base = dir.join(format!("base.{}", st.base_fmt));
    let top = dir.join("top.qcow2");
    let cluster = "cluster_size=4096";
    let size = st.base_size.to_string();
    match st.base_fmt {
        "qcow2" => qemu_img(&["create", "-q", "-f", "qcow2", "-o", cluster, s(&base), &size]).ok(),
        _ => qemu_img(&["create", "-q", "-f", st.base_fmt, s(&base), &size]).ok(),
    };
    let base_writes = [(0x11, 0, 256 << 10), (0x22, 384 << 10, 64 << 10), (0x33, st.base_size - (96 << 10), 40 << 10)];
    let mut args = vec!["-f".to_string(), st.base_fmt.to_string()];
    for (byte, offset, len) in base_writes {
        args.extend(["-c".to_string(), format!("write -P {byte:#x} {offset} {len}")]);
    }
    args.push(s(&base).to_string());
    qemu_io(&args.iter().map(String::as_str).collect::<Vec<_>>()).ok();
    let top_size = st.top_size.to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", cluster, "-b", s(&base), "-F", st.base_fmt, s(&top), &top_size])
        .ok();
    let mut rng = XorShift::new(seed);
    // A whole-cluster zero write over the base's data (a zero cluster), a partial one, and a write
    // past the base's end; then scattered writes and zero writes of up to 24 sectors.
    let mut cmds = vec![
        format!("write -z {} {}", 64 << 10, 8 << 10),
        format!("write -z {} {}", (200 << 10) + 3 * SECTOR, 5 * SECTOR),
        format!("write -P 0x44 {} {}", st.top_size - (20 << 10), 9 * SECTOR),
    ];
    for i in 0..16u64 {
        let (offset, len) = random_range(&mut rng, st.top_size, 24);
        cmds.push(match rng.below(4) {
            0 => format!("write -z {offset} {len}"),
            _ => format!("write -P {:#x} {offset} {len}", 0x50 + i),
        });
    }
    let mut args = vec!["-f".to_string(), "qcow2".to_string()];
    for c in cmds {
        args.extend(["-c".to_string(), c]);
    }
    args.push(s(&top).to_string());
    qemu_io(&args.iter().map(String::as_str).collect::<Vec<_>>()).ok();
    (top, base)
}

/// Reads an image alone (no backing file) and, for qcow2, checks it as [`judge`] does.
fn judge_base(reg: &Registry, path: &Path, fmt: &str) -> Result<SectorModel, String> {
    if fmt == "qcow2" {
        return judge(reg, path, false, &[]);
    }
    let drv = vdisk_tests::open_image(reg, path, Some(fmt), &OpenOptions::default())
        .map_err(|e| format!("vdisk cannot open the base: {e}"))?;
    SectorModel::read(&*drv)
}

/// The base alone may hold, in each sector, its old content or the top's (past its old end:
/// zeros, before the top's data reaches it); its size is its old one or the top's.
fn base_ok(got: &SectorModel, old: &SectorModel, top: &SectorModel) -> Result<(), String> {
    if got.size != old.size && got.size != top.size {
        return Err(format!("base size {} (old {}, top {})", got.size, old.size, top.size));
    }
    for (i, &v) in got.sectors.iter().enumerate() {
        let was = old.sectors.get(i).copied().unwrap_or(0);
        if v != was && Some(&v) != top.sectors.get(i) {
            return Err(format!(
                "base sector at {} reads {v:#04x}: neither its old {was:#04x} nor the top's {:?}",
                i as u64 * SECTOR,
                top.sectors.get(i)
            ));
        }
    }
    Ok(())
}

/// The commit sequence as `qemu-img commit` runs it (cli/src/cmd/commit.rs), with the top and its
/// base recorded in one log: the top read-only over its chain, the base opened read-write,
/// `formats::commit::commit_into`, the base closed, then the top reopened read-write without its
/// backing file and emptied. Every crash image must (a) pass vdisk's and qemu-img's check (top
/// and qcow2 base), (b) read through the chain exactly as the top did before the commit, (c) have
/// a base holding per sector its old content or the top's, and (d) once the base's part was
/// durable, a base holding the top's content.
fn run_commit(name: &str, st: CommitSetup, seed: u64) {
    let d = tempdir();
    let reg = Registry::new();
    let (top, base) = commit_images(d.path(), st, seed);
    let open =
        |path: &Path, fmt: &str| vdisk_tests::open_image(&reg, path, Some(fmt), &OpenOptions::default()).unwrap();
    let top_content = SectorModel::read(&*open(&top, "qcow2")).unwrap();
    let base_content = SectorModel::read(&*open(&base, st.base_fmt)).unwrap();
    assert_ne!(
        top_content.sectors[..base_content.sectors.len()],
        base_content.sectors[..],
        "{name}: nothing to commit"
    );

    let (files, top_view) = crash::open_recording_chain(&reg, "qcow2", &top, &OpenOptions::default()).unwrap();
    assert_eq!(files.len(), 2, "{name}: the top and its base are recorded");
    let mut base_durable_at = 0;
    let recorded = crash::record_invariant(&files, top_content.clone(), || {
        let e = |e: blockdev::Error| e.to_string();
        let base_rw =
            crash::reopen_recording(&reg, st.base_fmt, &files, BASE, &OpenOptions::read_write()).map_err(e)?;
        formats::commit::commit_into(&*top_view, &*base_rw, 1, &|_, _| {}).map_err(|c| c.to_string())?;
        base_durable_at = files[TOP].position();
        base_rw.close().map_err(e)?;
        drop(top_view);
        let opts = OpenOptions { no_backing: true, ..OpenOptions::read_write() };
        let top_rw = crash::reopen_recording(&reg, "qcow2", &files, TOP, &opts).map_err(e)?;
        top_rw.backing_ops().expect("qcow2 has backing files").make_empty().map_err(e)?;
        top_rw.close().map_err(e)
    })
    .unwrap_or_else(|e| panic!("{name}: the commit failed: {e}"));
    assert!(base_durable_at > 0);

    // The commit itself left clean images: the base with the top's content, the top empty.
    std::fs::write(&top, files[TOP].current()).unwrap();
    std::fs::write(&base, files[BASE].current()).unwrap();
    for (path, fmt) in [(&top, "qcow2"), (&base, st.base_fmt)] {
        let q = qemu_img(&["check", "-f", fmt, s(path)]);
        assert!(fmt != "qcow2" || q.code == 0, "{name}: qemu-img check {}:\n{}{}", path.display(), q.stdout, q.stderr);
    }
    assert_eq!(SectorModel::read(&*open(&base, st.base_fmt)).unwrap(), top_content, "{name}: base after commit");
    assert_eq!(SectorModel::read(&*open(&top, "qcow2")).unwrap(), top_content, "{name}: chain after commit");
    let map = qemu_img(&["map", "--output=json", "-f", "qcow2", s(&top)]).ok();
    assert!(!map.stdout.contains("\"depth\": 0"), "{name}: the top still allocates:\n{}", map.stdout);

    // Crash images of the base replace it (the top's crash image names it as its backing file).
    let crash_top = d.path().join("crash-top.qcow2");
    let paths: Vec<&Path> = vec![&crash_top, &base];
    let stats = crash::verify_with(&recorded, &paths, reorder_samples(), |cut, paths| {
        let chain = judge(&reg, paths[TOP], false, &[])?;
        let alone = judge_base(&reg, paths[BASE], st.base_fmt)?;
        base_ok(&alone, &base_content, &top_content)?;
        if cut.applied_before(&recorded.events, BASE, base_durable_at) && alone != top_content {
            return Err("the base was flushed but does not hold the top's content".to_string());
        }
        Ok(chain)
    })
    .unwrap_or_else(|e| panic!("{name} ({st:?}): {e}"));
    assert!(stats.prefixes > 20, "{name}: too few cut points to mean anything: {stats:?}");
    eprintln!("crash {name}: {stats}");
}

#[test]
fn commit_into_qcow2_base_survives_every_crash() {
    // The base is smaller than the top: the commit grows it first.
    let st = CommitSetup { base_fmt: "qcow2", base_size: 1 << 20, top_size: (1 << 20) + (256 << 10) };
    for k in 0..seeds() {
        run_commit("commit into qcow2", st, 41 + 1000 * k);
    }
}

#[test]
fn commit_into_raw_base_survives_every_crash() {
    let st = CommitSetup { base_fmt: "raw", base_size: 1 << 20, top_size: 1 << 20 };
    for k in 0..seeds() {
        run_commit("commit into raw", st, 42 + 1000 * k);
    }
}

/// Persistent bitmap operations (`blockdev::bitmap`) with guest writes that rewrite the bytes
/// already there, so the guest content never changes while the bitmaps do: a batch that adds,
/// merges, clears and disables, the enabled bitmaps recording writes (marked in use on disk from
/// the first one), a removal, and the close that stores the recording. Every crash image must pass
/// both checks, read as before, open with every bitmap it lists, and give every consistent one
/// back without error (the directory and the tables it points at are whole at every cut).
#[test]
fn bitmap_operations_survive_every_crash() {
    use blockdev::bitmap::{BitmapChange, MergeSource};
    let d = tempdir();
    let reg = Registry::new();
    let img = d.path().join("bitmaps.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", s(&img), "1M"]).ok();
    qemu_io(&["-c", "write -P 7 0 256k", "-c", "write -P 9 512k 64k", s(&img)]).ok();
    qemu_img(&["bitmap", "--add", "-g", "4k", s(&img), "b0"]).ok();
    let content =
        SectorModel::read(&*vdisk_tests::open_image(&reg, &img, Some("qcow2"), &OpenOptions::default()).unwrap())
            .unwrap();

    let (files, drv) = crash::open_recording(&reg, "qcow2", &img, &OpenOptions::read_write()).unwrap();
    let recorded = crash::record_invariant(&files, content.clone(), || {
        let e = |e: blockdev::Error| e.to_string();
        let b = drv.bitmaps().expect("qcow2 has bitmaps");
        let rewrite = |off: u64, len: u64, byte: u8| drv.write_all_at(off, &vec![byte; len as usize]).map_err(e);
        rewrite(4096, 8192, 7)?;
        b.apply(&[
            BitmapChange::Add { name: "b1", granularity: Some(512), enabled: true },
            BitmapChange::Merge { name: "b1", from: MergeSource::Bitmap("b0") },
            BitmapChange::Clear("b0"),
            BitmapChange::SetEnabled("b0", false),
        ])
        .map_err(|(_, err)| err.to_string())?;
        rewrite(512 << 10, 4096, 9)?;
        drv.flush().map_err(e)?;
        b.add("b2", None, true).map_err(e)?;
        rewrite(0, 512, 7)?;
        b.remove("b0").map_err(e)?;
        rewrite(128 << 10, 64 << 10, 7)?;
        drv.close().map_err(e)
    })
    .unwrap_or_else(|e| panic!("the bitmap workload failed: {e}"));
    drop(drv);

    // The workload itself leaves b1 and b2, stored and consistent.
    let done = d.path().join("done.qcow2");
    std::fs::write(&done, files[0].current()).unwrap();
    let names = |p: &Path| qemu_img(&["info", "--output=json", "-U", s(p)]).ok().stdout;
    let listed = names(&done);
    assert!(listed.contains("\"b1\"") && listed.contains("\"b2\"") && !listed.contains("\"b0\""), "{listed}");
    assert!(!listed.contains("in-use"), "{listed}");
    qemu_img(&["check", s(&done)]).ok();

    let crash_img = d.path().join("crash-bitmaps.qcow2");
    let stats = crash::verify(&recorded, &[&crash_img], reorder_samples(), |path| {
        let got = judge(&reg, path, false, &[])?;
        let q = qemu_img(&["info", "-U", s(path)]);
        if q.code != 0 {
            return Err(format!("qemu-img info: {}", q.stderr));
        }
        let drv = vdisk_tests::open_image(&reg, path, Some("qcow2"), &OpenOptions::default())
            .map_err(|e| format!("open: {e}"))?;
        let b = drv.bitmaps().expect("qcow2 has bitmaps");
        for info in b.list().map_err(|e| e.to_string())? {
            if !info.in_use {
                b.read(&info.name).map_err(|e| format!("bitmap {}: {e}", info.name))?;
            }
        }
        Ok(got)
    })
    .unwrap_or_else(|e| panic!("bitmaps: {e}"));
    assert!(stats.prefixes > 20, "too few cut points to mean anything: {stats:?}");
    eprintln!("crash bitmaps: {stats}");
}
