//! `dd` against qemu-img: the same output images byte for byte and block for block, the same
//! messages and exit codes.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use vdisk_tests::{qemu_img, qemu_io, qemu_io_write, s, tempdir, vdisk_as_qemu_img, Run};

fn vdisk(args: &[&str]) -> Run {
    vdisk_as_qemu_img(Path::new(env!("CARGO_BIN_EXE_vdisk")), args)
}

/// A 1 MiB raw image with patterns at odd places: the start, across a 64 KiB boundary, a lone
/// sector, and the last bytes; the rest is a hole.
fn patterned_input(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("in.raw");
    qemu_img(&["create", "-f", "raw", s(&img), "1M"]).ok();
    qemu_io_write(&img, "raw", 0x0a, 0, 4096);
    qemu_io_write(&img, "raw", 0x5c, 24, 1000);
    qemu_io_write(&img, "raw", 0xa5, 65536 - 700, 3000);
    qemu_io_write(&img, "raw", 0x33, 300 * 1024, 512);
    qemu_io_write(&img, "raw", 0xee, (1 << 20) - 1999, 1999);
    img
}

/// Runs dd with both tools into separate outputs and checks that everything observable is equal.
fn assert_same_dd(input: &Path, dir: &Path, extra: &[&str]) {
    let q_out = dir.join("q.out");
    let v_out = dir.join("v.out");
    let run = |tool: &dyn Fn(&[&str]) -> Run, out: &Path| {
        let if_arg = format!("if={}", s(input));
        let of_arg = format!("of={}", s(out));
        let mut args = vec!["dd", if_arg.as_str(), of_arg.as_str()];
        args.extend_from_slice(extra);
        tool(&args)
    };
    let q = run(&qemu_img, &q_out);
    let v = run(&vdisk, &v_out);
    assert_eq!((q.code, q.stdout.as_str()), (v.code, v.stdout.as_str()), "{extra:?}");
    assert_eq!(q.stderr.replace(s(&q_out), "OUT"), v.stderr.replace(s(&v_out), "OUT"), "{extra:?}");
    let (qb, vb) = (std::fs::read(&q_out).unwrap(), std::fs::read(&v_out).unwrap());
    assert_eq!(qb.len(), vb.len(), "output size for {extra:?}");
    assert!(qb == vb, "output bytes differ for {extra:?}");
    let (qm, vm) = (std::fs::metadata(&q_out).unwrap(), std::fs::metadata(&v_out).unwrap());
    assert_eq!(qm.blocks(), vm.blocks(), "allocation for {extra:?}");
    let cmp = qemu_img(&["compare", "-f", "raw", "-F", "raw", s(&q_out), s(&v_out)]);
    assert_eq!(cmp.code, 0, "qemu-img compare for {extra:?}: {}", cmp.stdout);
}

#[test]
fn dd_block_sizes_counts_and_skips_match_qemu_img() {
    let d = tempdir();
    let input = patterned_input(d.path());
    let combos: &[&[&str]] = &[
        &[],
        &["-f", "raw", "-O", "raw"],
        &["bs=13", "count=5000", "skip=7"],
        &["bs=1999"],
        &["bs=64k"],
        &["bs=1M"],
        &["bs=3M"],
        &["bs=64k", "count=3"],
        &["bs=1000", "count=3", "skip=1"],
        &["skip=1"],
        &["skip=30"],
        &["bs=4k", "skip=17", "count=100"],
        &["bs=1k", "count=0"],
        &["bs=512", "count=2", "skip=2"],
        &["bs=4k", "skip=256"],
        &["bs=4k", "skip=257"],
        &["bs=2147483647", "skip=9223372036854775807"],
        &["count=9223372036854775807", "bs=64k"],
    ];
    for extra in combos {
        assert_same_dd(&input, d.path(), extra);
    }
}

#[test]
fn dd_reads_the_padded_tail_of_an_odd_sized_input() {
    let d = tempdir();
    let input = d.path().join("odd.raw");
    std::fs::write(&input, vdisk_tests::pseudo_random(1000, 7)).unwrap();
    for extra in [&[][..], &["bs=5"], &["bs=300"], &["bs=300", "skip=3"], &["bs=7", "count=200", "skip=100"]] {
        assert_same_dd(&input, d.path(), extra);
    }
}

#[test]
fn dd_output_reads_back_through_qemu_io() {
    let d = tempdir();
    let input = patterned_input(d.path());
    let out = d.path().join("o.raw");
    let if_arg = format!("if={}", s(&input));
    let of_arg = format!("of={}", s(&out));
    vdisk(&["dd", "-f", "raw", &if_arg, &of_arg, "bs=4k", "skip=16", "count=32"]).ok();
    // Input bytes 65536..131072 land at output offset 0: the 0xa5 run starts 700 bytes before 64k.
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 65536);
    let r = qemu_io(&["-f", "raw", "-c", "read -P 0xa5 0 2300", "-c", "read -P 0 2300 63236", s(&out)]).ok();
    assert!(!r.stdout.contains("Pattern verification failed"), "{}", r.stdout);
}

#[test]
fn dd_errors_match_qemu_img() {
    let d = tempdir();
    let input = patterned_input(d.path());
    let out = d.path().join("x");
    let if_arg = format!("if={}", s(&input));
    let of_arg = format!("of={}", s(&out));
    let missing = format!("if={}", s(&d.path().join("missing")));
    let bad_dir = format!("of={}", s(&d.path().join("no/such/dir")));
    let cases: Vec<Vec<&str>> = vec![
        vec![],
        vec!["foo"],
        vec!["foo=bar", &if_arg, &of_arg],
        vec!["bs=0", &if_arg, &of_arg],
        vec!["bs=3G", &if_arg, &of_arg],
        vec!["count=-1", &if_arg, &of_arg],
        vec![&if_arg],
        vec![&of_arg],
        vec![&missing, &of_arg],
        vec!["-O", "foo", &if_arg, &of_arg],
        vec!["-f", "foo", &if_arg, &of_arg],
        vec![&if_arg, &bad_dir],
    ];
    for args in cases {
        let mut full = vec!["dd"];
        full.extend(args.iter());
        let q = qemu_img(&full);
        let v = vdisk(&full);
        assert_eq!((q.code, &q.stdout, &q.stderr), (v.code, &v.stdout, &v.stderr), "{full:?}");
        assert_ne!(v.code, 0, "{full:?}");
    }
}

#[test]
fn dd_errors_in_upstream_words() {
    // Debian's qemu-img rewords these; vdisk speaks as upstream QEMU 10.0.2's qemu-img.c.
    let d = tempdir();
    let input = patterned_input(d.path());
    let if_arg = format!("if={}", s(&input));
    let of_arg = format!("of={}", s(&d.path().join("x")));
    let suffixes = "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.";
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["bs=x", &if_arg, &of_arg],
            format!(
                "qemu-img: Invalid bs specified. You may use k, M, G, T, P or E suffixes for\nqemu-img: {suffixes}\n"
            ),
        ),
        (
            vec!["skip=9E", &if_arg, &of_arg],
            "qemu-img: Invalid skip specified. Must be between 0 and 9223372036854775807.\n".into(),
        ),
        (
            vec!["--bogus", &if_arg, &of_arg],
            "qemu-img: unrecognized option '--bogus'\nTry 'qemu-img --help' for more information\n".into(),
        ),
        (
            vec![&if_arg, &of_arg, "-f"],
            "qemu-img: missing argument for option '-f'\nTry 'qemu-img --help' for more information\n".into(),
        ),
    ];
    for (args, want) in cases {
        let mut full = vec!["dd"];
        full.extend(args.iter());
        let v = vdisk(&full);
        assert_eq!((v.code, v.stderr.as_str()), (1, want.as_str()), "{full:?}");
    }
}

#[test]
fn dd_skip_past_the_end_warns_and_creates_an_empty_output() {
    // Upstream accepts suffixes in skip= (Debian's qemu-img refuses "30K"); iotest 160 relies on it.
    let d = tempdir();
    let input = patterned_input(d.path());
    let out = d.path().join("e.raw");
    let if_arg = format!("if={}", s(&input));
    let of_arg = format!("of={}", s(&out));
    let v = vdisk(&["dd", &if_arg, &of_arg, "skip=30K"]);
    assert_eq!(v.code, 0);
    assert_eq!(v.stderr, format!("qemu-img: {}: cannot skip to specified offset\n", s(&input)));
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 0);
}
