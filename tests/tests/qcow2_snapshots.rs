//! Internal snapshots through the library: random sequences of guest I/O mixed with snapshot
//! create / apply / delete (and VM state saves) must keep every snapshot's content and the
//! active disk equal to a model; afterwards QEMU must find the image clean and read every
//! snapshot (`qemu-img convert -l`) as the model says. Plus the VMM API (VM state) and the
//! read-only temporary load `convert -l` uses.

use std::sync::Arc;

use blockdev::{BlockDriver, OpenOptions, SnapshotParams};
use formats::Registry;
use proptest::prelude::*;
use vdisk_tests::model::{self, Op, Subject};
use vdisk_tests::{pseudo_random, qemu_img, s, tempdir};

const SIZE: u64 = 2 << 20;

/// One step of a sequence.
#[derive(Debug, Clone)]
enum Step {
    /// Guest I/O (or flush, growth, reopen).
    Io(Op),
    /// Takes a snapshot; with `state`, saves that many bytes of VM state with it.
    Create { state: Option<usize> },
    /// Reverts to the `k`-th live snapshot (modulo their number).
    Apply { k: usize },
    /// Deletes the `k`-th live snapshot.
    Delete { k: usize },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => model::ops(SIZE, 512, 192 << 10).prop_map(Step::Io),
        2 => proptest::option::weighted(0.3, 1usize..200_000).prop_map(|state| Step::Create { state }),
        1 => any::<usize>().prop_map(|k| Step::Apply { k }),
        1 => any::<usize>().prop_map(|k| Step::Delete { k }),
    ]
}

/// A live snapshot in the model: its id, the disk content, the VM state saved with it.
struct Snap {
    id: String,
    disk: Vec<u8>,
    state: Vec<u8>,
}

fn whole(drv: &Arc<dyn BlockDriver>) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; drv.size() as usize];
    drv.read_exact_at(0, &mut buf).map_err(|e| format!("read: {e}"))?;
    Ok(buf)
}

fn run(steps: &[Step], cluster: &str, extended: bool, backing: bool) -> Result<(), String> {
    let d = tempdir();
    let reg = Registry::new();
    let backing_len = SIZE / 2;
    let (img, mut disk) =
        vdisk_tests::model_qcow2(d.path(), &reg, SIZE, cluster, extended, backing.then_some(backing_len))
            .map_err(|e| e.to_string())?;
    let backing_bytes = vec![0x77u8; backing_len as usize];
    let open = || vdisk_tests::open_image(&reg, &img, Some("qcow2"), &OpenOptions::read_write());
    let subject = Subject { open: &open, backing: backing.then_some(&backing_bytes[..]) };
    let mut drv = open().map_err(|e| format!("open: {e}"))?;
    let mut snaps: Vec<Snap> = Vec::new();
    for (i, st) in steps.iter().enumerate() {
        let at = |e: String| format!("step {i} ({st:?}): {e}");
        match st {
            Step::Io(op) => {
                model::apply(&subject, &drv, &mut disk, op).map_err(at)?;
                if *op == Op::Reopen {
                    drv.close().map_err(|e| at(e.to_string()))?;
                    drop(drv);
                    drv = open().map_err(|e| at(e.to_string()))?;
                }
            }
            Step::Create { state } => {
                let state = state.map(|n| pseudo_random(n, i as u64)).unwrap_or_default();
                let params = SnapshotParams {
                    name: format!("s{i}"),
                    date_sec: 1_700_000_000 + i as i64,
                    vm_clock_nsec: 1_234_567_890 * i as u64,
                    ..SnapshotParams::default()
                };
                let sn = drv.snapshots().ok_or("no snapshots")?;
                sn.save(&params, &state).map_err(|e| at(e.to_string()))?;
                let listed = sn.list().map_err(|e| at(e.to_string()))?;
                let last = listed.last().ok_or_else(|| at("not listed".into()))?;
                if last.name != params.name || last.vm_state_size != state.len() as u64 {
                    return Err(at(format!("listed as {last:?}")));
                }
                snaps.push(Snap { id: last.id.clone(), disk: disk.clone(), state });
            }
            Step::Apply { k } if !snaps.is_empty() => {
                let snap = &snaps[k % snaps.len()];
                let sn = drv.snapshots().ok_or("no snapshots")?;
                sn.apply(&snap.id).map_err(|e| at(e.to_string()))?;
                disk = snap.disk.clone();
                let mut state = vec![0u8; snap.state.len()];
                sn.read_vm_state(0, &mut state).map_err(|e| at(e.to_string()))?;
                if state != snap.state {
                    return Err(at("the VM state reads back differently".into()));
                }
            }
            Step::Delete { k } if !snaps.is_empty() => {
                let snap = snaps.remove(k % snaps.len());
                let sn = drv.snapshots().ok_or("no snapshots")?;
                sn.delete(Some(&snap.id), None).map_err(|e| at(e.to_string()))?;
            }
            Step::Apply { .. } | Step::Delete { .. } => continue,
        }
        if !matches!(st, Step::Io(_)) && whole(&drv).map_err(at)? != disk {
            return Err(at("the disk differs from the model".into()));
        }
    }
    if whole(&drv)? != disk {
        return Err("the disk differs from the model at the end".into());
    }
    drv.close().map_err(|e| e.to_string())?;
    drop(drv);
    let c = qemu_img(&["check", s(&img)]);
    if c.code != 0 {
        return Err(format!("qemu-img check: {}{}", c.stdout, c.stderr));
    }
    let l = qemu_img(&["snapshot", "-l", s(&img)]);
    for snap in &snaps {
        if !l.stdout.lines().any(|line| line.split_whitespace().next() == Some(snap.id.as_str())) {
            return Err(format!("qemu-img snapshot -l does not list {}:\n{}", snap.id, l.stdout));
        }
        let out = d.path().join(format!("sn{}.raw", snap.id));
        let arg = format!("snapshot.id={}", snap.id);
        let r = qemu_img(&["convert", "-l", &arg, "-O", "raw", s(&img), s(&out)]);
        if r.code != 0 {
            return Err(format!("qemu-img convert -l {arg}: {}", r.stderr));
        }
        // QEMU reads a snapshot at the current disk size; past the snapshot's own size it shows
        // whatever the snapshot's tables map there (its VM state, say), so only the part within
        // both sizes is compared.
        let got = std::fs::read(&out).map_err(|e| e.to_string())?;
        let n = snap.disk.len().min(got.len());
        if got.len() != disk.len() || got[..n] != snap.disk[..n] {
            return Err(format!("snapshot {} reads differently through qemu-img", snap.id));
        }
    }
    let active = d.path().join("active.raw");
    qemu_img(&["convert", "-O", "raw", s(&img), s(&active)]).ok();
    if std::fs::read(&active).map_err(|e| e.to_string())? != disk {
        return Err("the active disk reads differently through qemu-img".into());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: model::cases(16), max_shrink_iters: 100, .. ProptestConfig::default() })]

    #[test]
    fn snapshots_keep_their_content_64k(steps in proptest::collection::vec(step(), 1..40)) {
        run(&steps, "65536", false, false).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn snapshots_keep_their_content_small_clusters_with_backing(steps in proptest::collection::vec(step(), 1..40)) {
        run(&steps, "4096", false, true).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn snapshots_keep_their_content_with_subclusters(steps in proptest::collection::vec(step(), 1..40)) {
        run(&steps, "65536", true, false).map_err(TestCaseError::fail)?;
    }
}

#[test]
fn vm_state_is_saved_listed_by_qemu_and_restored() {
    let d = tempdir();
    let img = d.path().join("vm.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "8M"]).ok();
    let reg = Registry::new();
    let drv = vdisk_tests::open_image(&reg, &img, Some("qcow2"), &OpenOptions::read_write()).unwrap();
    drv.write_all_at(0, &[1u8; 65536]).unwrap();
    let state = pseudo_random(3 << 20, 7);
    let params = SnapshotParams {
        name: "vm".into(),
        date_sec: 1_700_000_000,
        date_nsec: 5,
        vm_clock_nsec: 3_723_004_000_000,
        icount: Some(42),
    };
    drv.snapshots().unwrap().save(&params, &state).unwrap();
    drv.write_all_at(0, &[2u8; 65536]).unwrap();
    drv.close().unwrap();
    drop(drv);
    // QEMU sees the state's size, the guest clock (1:02:03.004) and the instruction count.
    let l = qemu_img(&["snapshot", "-l", s(&img)]).ok().stdout;
    let line = l.lines().find(|x| x.starts_with("1 ")).unwrap_or_else(|| panic!("{l}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cols[1], "vm", "{l}");
    assert_eq!(&cols[2..4], ["3", "MiB"], "{l}");
    assert_eq!(cols[6], "0001:02:03.004", "{l}");
    assert_eq!(cols[7], "42", "{l}");
    let c = qemu_img(&["check", s(&img)]);
    assert_eq!(c.code, 0, "{}{}", c.stdout, c.stderr);
    // The active disk does not keep the state: nothing beyond guest data is allocated (64 KiB).
    let info = qemu_img(&["map", "--output=json", s(&img)]).ok().stdout;
    assert_eq!(info.matches("\"data\": true").count(), 1, "{info}");

    let drv = vdisk_tests::open_image(&reg, &img, Some("qcow2"), &OpenOptions::read_write()).unwrap();
    let sn = drv.snapshots().unwrap();
    sn.apply("vm").unwrap();
    let mut back = vec![0u8; state.len()];
    sn.read_vm_state(0, &mut back).unwrap();
    assert!(back == state, "the VM state reads back differently");
    let mut b = [0u8; 512];
    drv.read_exact_at(0, &mut b).unwrap();
    assert_eq!(b, [1u8; 512]);
    drv.close().unwrap();
    drop(drv);
    let c = qemu_img(&["check", s(&img)]);
    assert_eq!(c.code, 0, "{}{}", c.stdout, c.stderr);
}

#[test]
fn a_snapshot_loads_read_only_in_place_of_the_disk() {
    let d = tempdir();
    let img = d.path().join("t.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "4M"]).ok();
    vdisk_tests::qemu_io_write(&img, "qcow2", 0x11, 0, 1 << 20);
    qemu_img(&["snapshot", "-c", "small", s(&img)]).ok();
    qemu_img(&["resize", "-q", s(&img), "6M"]).ok();
    vdisk_tests::qemu_io_write(&img, "qcow2", 0x22, 0, 1 << 20);
    let reg = Registry::new();
    let ro = vdisk_tests::open_image(&reg, &img, Some("qcow2"), &OpenOptions::default()).unwrap();
    assert_eq!(ro.size(), 6 << 20);
    let sn = ro.snapshots().unwrap();
    let e = sn.load_temporarily(Some("small"), None).unwrap_err();
    assert_eq!(e.errno(), Some(2), "ids are not names (ENOENT): {e}");
    sn.load_temporarily(None, Some("small")).unwrap();
    // As in qemu, the disk keeps its size; past the snapshot's end it reads zeros.
    assert_eq!(ro.size(), 6 << 20);
    let mut b = vec![0u8; 1 << 20];
    ro.read_exact_at(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0x11));
    ro.read_exact_at(5 << 20, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    drop(ro);
    // Read-write images refuse it.
    let rw = vdisk_tests::open_image(&reg, &img, Some("qcow2"), &OpenOptions::read_write()).unwrap();
    let e = rw.snapshots().unwrap().load_temporarily(Some("1"), None).unwrap_err();
    assert_eq!(e.message(), "Device is not readonly");
}

/// Found by the property tests: applying a smaller snapshot shrinks the disk, and the L2 table
/// past the new end still mapped the VM state of the snapshot applied before; dropping it must
/// drop those references too (qemu-img check found them leaked).
#[test]
fn shrinking_past_a_mapped_vm_state_leaks_nothing() {
    let steps = vec![
        Step::Io(Op::Write { off: 395264, len: 3584, seed: 1 }),
        Step::Create { state: None },
        Step::Create { state: None },
        Step::Create { state: Some(117080) },
        Step::Delete { k: 1 },
        Step::Apply { k: 1 },
        Step::Io(Op::Grow { by: 297984 }),
        Step::Apply { k: 0 },
    ];
    run(&steps, "65536", false, false).unwrap();
}
