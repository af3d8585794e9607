//! Guest discards and zero writes through the library give freed clusters back to the file
//! system as qemu does: the same requests sent by qemu-io to a copy of the same image, under the
//! same discard options (`discard=unmap|ignore`, `pass-discard-request`), leave the same
//! allocated size (`st_blocks`) and the same mapping (`qemu-img map`), and both images stay clean
//! (`qemu-img check`) with the intended content (`qemu-img compare`).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use blockdev::{DiscardOptions, OpenOptions, ZeroFlags};
use formats::Registry;
use vdisk_tests::{qemu_img, qemu_io, s, tempdir};

const MIB: u64 = 1 << 20;

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// 64 MiB qcow2 with pattern 1 in its first 32 MiB, written by qemu-io.
fn image(path: &Path) {
    qemu_img(&["create", "-q", "-f", "qcow2", s(path), "64M"]).ok();
    qemu_io(&["-f", "qcow2", "-c", "write -P 1 0 32M", s(path)]).ok();
}

/// The requests: a discard, a zero write that may unmap, a zero write that may not.
const DISCARD: (u64, u64) = (0, 8 * MIB);
const ZERO_UNMAP: (u64, u64) = (8 * MIB, 8 * MIB);
const ZERO_KEEP: (u64, u64) = (16 * MIB, 4 * MIB);

fn qemu_io_commands() -> Vec<String> {
    vec![
        format!("discard {} {}", DISCARD.0, DISCARD.1),
        format!("write -z -u {} {}", ZERO_UNMAP.0, ZERO_UNMAP.1),
        format!("write -z {} {}", ZERO_KEEP.0, ZERO_KEEP.1),
    ]
}

fn map(img: &Path) -> String {
    qemu_img(&["map", "--output=json", "-f", "qcow2", s(img)]).ok().stdout
}

#[test]
fn guest_discard_and_zero_writes_give_space_back_as_qemu_does() {
    let d = tempdir();
    let reg = Registry::new();
    // What both images must read afterwards: data from 20 MiB to 32 MiB only (a discard
    // without unmap leaves the data: qemu drops the request).
    let content = |discarded: bool| {
        let mut bytes = vec![1u8; 32 * MIB as usize];
        if discarded {
            bytes[..DISCARD.1 as usize].fill(0);
        }
        bytes[ZERO_UNMAP.0 as usize..(ZERO_KEEP.0 + ZERO_KEEP.1) as usize].fill(0);
        bytes.resize(64 * MIB as usize, 0);
        bytes
    };
    // (vdisk's options, qemu-io's options, discard carried out, freed space given back)
    let unmap = DiscardOptions::default();
    let cases: Vec<(DiscardOptions, Vec<String>, bool, bool)> = vec![
        (unmap, vec!["-f".into(), "qcow2".into(), "{img}".into()], true, true),
        (
            DiscardOptions::ignore(),
            vec!["-d".into(), "ignore".into(), "-f".into(), "qcow2".into(), "{img}".into()],
            false,
            false,
        ),
        (
            DiscardOptions { pass_request: Some(false), ..unmap },
            vec!["--image-opts".into(), "driver=qcow2,file.filename={img},pass-discard-request=off".into()],
            true,
            false,
        ),
        (
            DiscardOptions { pass_request: Some(true), ..DiscardOptions::ignore() },
            vec![
                "-d".into(),
                "ignore".into(),
                "--image-opts".into(),
                "driver=qcow2,file.filename={img},pass-discard-request=on".into(),
            ],
            false,
            false,
        ),
    ];
    for (i, (opts, qemu_args, discarded, gives_back)) in cases.into_iter().enumerate() {
        let ours = d.path().join(format!("vdisk{i}.qcow2"));
        let theirs = d.path().join(format!("qemu{i}.qcow2"));
        image(&ours);
        image(&theirs);
        let drv = vdisk_tests::open_image(
            &reg,
            &ours,
            Some("qcow2"),
            &OpenOptions { discard: opts, ..OpenOptions::read_write() },
        )
        .unwrap();
        drv.discard(DISCARD.0, DISCARD.1).unwrap();
        drv.write_zeroes(ZERO_UNMAP.0, ZERO_UNMAP.1, ZeroFlags { may_unmap: true, no_fallback: false }).unwrap();
        drv.write_zeroes(ZERO_KEEP.0, ZERO_KEEP.1, ZeroFlags::default()).unwrap();
        drv.close().unwrap();
        drop(drv);
        let mut args: Vec<String> = Vec::new();
        for c in qemu_io_commands() {
            args.extend(["-c".to_string(), c]);
        }
        args.extend(qemu_args.iter().map(|a| a.replace("{img}", s(&theirs))));
        qemu_io(&args.iter().map(String::as_str).collect::<Vec<_>>()).ok();

        let (a, b) = (allocated(&ours), allocated(&theirs));
        assert!(a.abs_diff(b) <= 64 << 10, "case {i}: vdisk leaves {a} bytes allocated, qemu {b}");
        // 32 MiB of data; freed space given back: the discarded and unmapped 16 MiB.
        let want = if gives_back { 16 * MIB } else { 32 * MIB };
        assert!((want..want + 2 * MIB).contains(&b), "case {i}: qemu leaves {b} bytes, expected about {want}");
        assert_eq!(map(&ours), map(&theirs), "case {i}: mappings differ");
        let flat = d.path().join(format!("want{i}.raw"));
        std::fs::write(&flat, content(discarded)).unwrap();
        for img in [&ours, &theirs] {
            let c = qemu_img(&["check", s(img)]);
            assert_eq!(c.code, 0, "case {i}: qemu-img check {}: {}{}", img.display(), c.stdout, c.stderr);
            let c = qemu_img(&["compare", s(&flat), s(img)]);
            assert_eq!(c.code, 0, "case {i}: content of {}: {}{}", img.display(), c.stdout, c.stderr);
        }
    }
}
