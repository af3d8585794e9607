//! `bench` against qemu-img: the same lines (the timing aside), messages and exit codes, and write
//! runs that leave exactly the pattern qemu-img's would.

use std::path::{Path, PathBuf};

use vdisk_tests::{qemu_img, qemu_io, s, tempdir, vdisk_as_qemu_img, Run};

fn vdisk(args: &[&str]) -> Run {
    vdisk_as_qemu_img(Path::new(env!("CARGO_BIN_EXE_vdisk")), args)
}

/// Output with the run time masked (it is the only thing that may differ).
fn masked(text: &str) -> String {
    text.lines()
        .map(|l| {
            if l.starts_with("Run completed in ") && l.ends_with(" seconds.") {
                "Run completed in X seconds."
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn image(dir: &Path, name: &str, size: &str) -> PathBuf {
    let img = dir.join(name);
    qemu_img(&["create", "-f", "raw", s(&img), size]).ok();
    img
}

#[test]
fn bench_lines_and_failures_match_qemu_img() {
    let d = tempdir();
    let img = image(d.path(), "a.raw", "1M");
    let missing = d.path().join("missing");
    let cases: Vec<Vec<&str>> = vec![
        vec!["-c", "10", "-f", "raw"],
        vec!["-c", "10", "-d", "1", "-q", "-f", "raw"],
        vec!["-c", "100", "-d", "3", "-s", "512", "-S", "1k", "-o", "4096", "-f", "raw"],
        vec!["-c", "100", "-w", "-f", "raw", "--flush-interval", "64"],
        vec!["-c", "100", "-w", "-f", "raw", "--flush-interval=10", "-d", "10", "--no-drain"],
        vec!["-c", "20", "-w", "-f", "raw", "-t", "none", "-n", "--pattern=0x5a"],
        vec!["-c", "20", "-f", "raw", "-t", "directsync", "-i", "native"],
        vec!["-c", "20", "-f", "raw", "-i", "io_uring", "-i", "threads", "-t", "writethrough"],
        vec!["-c", "20", "-w"],
        // Requests past the end fail with EIO after the header, which comes last in a pipe.
        vec!["-c", "3", "-o", "1M", "-f", "raw"],
        vec!["-c", "1000", "-s", "512", "-S", "3000", "-d", "7", "-f", "raw"],
        vec!["-c", "10", "-n", "-f", "raw"],
        vec!["-c", "10", "-i", "native", "-f", "raw"],
        vec!["-c", "10", "-i", "posix", "-f", "raw"],
        vec!["-c", "10", "-t", "fast", "-f", "raw"],
        vec!["-c", "10", "-o", "-1", "-f", "raw"],
        vec!["--flush-interval=100", "-f", "raw"],
        vec!["-w", "--flush-interval=10", "-f", "raw"],
        vec!["-c", "5", "-w", "-U", "-f", "raw"],
        vec!["-c", "5", "-f", "nosuchfmt"],
        vec!["-c", "5", s(&missing)],
    ];
    for args in cases {
        let mut full = vec!["bench"];
        full.extend(args.iter());
        if !args.iter().any(|a| *a == s(&missing)) {
            full.push(s(&img));
        }
        let q = qemu_img(&full);
        let v = vdisk(&full);
        assert_eq!((q.code, masked(&q.stdout), &q.stderr), (v.code, masked(&v.stdout), &v.stderr), "{full:?}");
    }
}

#[test]
fn bench_in_upstream_words() {
    // Debian's qemu-img rewords or tightens these; vdisk follows upstream QEMU 10.0.2's qemu-img.c.
    let d = tempdir();
    let img = image(d.path(), "a.raw", "1M");
    let usage = "Try 'qemu-img --help' for more information\n";
    let cases: Vec<(Vec<&str>, i32, &str, String)> = vec![
        (
            vec!["-c", "0"],
            0,
            "Sending 0 read requests, 4096 bytes each, 64 in parallel (starting at offset 0, step size 4096)\n\
             Run completed in X seconds.",
            String::new(),
        ),
        (
            vec!["-c", "5", "-s", "0", "-d", "2"],
            0,
            "Sending 5 read requests, 0 bytes each, 2 in parallel (starting at offset 0, step size 0)\n\
             Run completed in X seconds.",
            String::new(),
        ),
        (vec!["-c", "x"], 1, "", "qemu-img: Invalid request count specified\n".into()),
        (vec!["-c", "-1"], 1, "", "qemu-img: Invalid request count specified\n".into()),
        (vec!["-d", "x"], 1, "", "qemu-img: Invalid queue depth specified\n".into()),
        (vec!["-S", "3G"], 1, "", "qemu-img: Invalid step_size specified. Must be between 0 and 2147483647.\n".into()),
        (vec!["--pattern=300"], 1, "", "qemu-img: Invalid pattern byte specified\n".into()),
        (vec!["--flush-interval=-1"], 1, "", "qemu-img: Invalid flush interval specified\n".into()),
        (vec!["--bogus"], 1, "", format!("qemu-img: unrecognized option '--bogus'\n{usage}")),
        (vec![s(&img), "-c"], 1, "", format!("qemu-img: missing argument for option '-c'\n{usage}")),
        (vec![s(&img), s(&img)], 1, "", format!("qemu-img: Expecting one image file name\n{usage}")),
        (
            vec!["-s", "3G"],
            1,
            "",
            "qemu-img: Invalid buffer size specified. Must be between 0 and 2147483647.\n".into(),
        ),
        // qemu-img would wait forever for requests it never issues; vdisk refuses depth 0.
        (vec!["-d", "0"], 1, "", "qemu-img: Invalid queue depth specified\n".into()),
    ];
    for (args, code, stdout, stderr) in cases {
        let mut full = vec!["bench", "-f", "raw"];
        full.extend(args.iter());
        if !args.contains(&s(&img)) {
            full.push(s(&img));
        }
        let v = vdisk(&full);
        assert_eq!(
            (v.code, masked(&v.stdout).as_str(), v.stderr.as_str()),
            (code, stdout, stderr.as_str()),
            "{full:?}"
        );
    }
}

/// Reads `ranges` of `img` with qemu-io, each expected to hold its pattern byte.
fn assert_patterns(img: &Path, ranges: &[(u8, u64, u64)]) {
    let cmds: Vec<String> = ranges.iter().map(|(p, off, len)| format!("read -P {p:#x} {off} {len}")).collect();
    let mut args = vec!["-f", "raw"];
    for c in &cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(s(img));
    let r = qemu_io(&args).ok();
    assert!(!r.stdout.contains("verification failed"), "{ranges:?}:\n{}", r.stdout);
    assert_eq!(r.stdout.matches("read ").count(), ranges.len(), "{}", r.stdout);
}

#[test]
fn bench_writes_the_pattern_where_qemu_img_does() {
    let d = tempdir();
    for extra in
        [&[][..], &["-d", "1"], &["--flush-interval=8", "-d", "4"], &["--flush-interval=4", "--no-drain", "-d", "4"]]
    {
        let v = image(d.path(), "v.raw", "64k");
        let q = image(d.path(), "q.raw", "64k");
        // 4 KiB writes 8 KiB apart from 4 KiB on: 4k, 12k, ..., 60k, then wrapping to 4k again.
        for (img, tool) in [(&v, &vdisk as &dyn Fn(&[&str]) -> Run), (&q, &qemu_img)] {
            let mut args =
                vec!["bench", "-w", "-f", "raw", "-c", "12", "-s", "4k", "-S", "8k", "-o", "4k", "--pattern=0xab"];
            args.extend_from_slice(extra);
            args.push(s(img));
            tool(&args).ok();
        }
        let mut ranges = Vec::new();
        for i in 0..8u64 {
            ranges.push((0, i * 8192, 4096));
            ranges.push((0xab, i * 8192 + 4096, 4096));
        }
        assert_patterns(&v, &ranges);
        assert_eq!(std::fs::read(&v).unwrap(), std::fs::read(&q).unwrap(), "{extra:?}");
    }
}

#[test]
fn bench_direct_io_write_with_unaligned_requests() {
    // O_DIRECT with 512-byte requests at odd 512-byte steps: the buffer stays aligned, and the data
    // lands as qemu-img's does.
    let d = tempdir();
    let v = image(d.path(), "v.raw", "1M");
    vdisk(&[
        "bench",
        "-w",
        "-f",
        "raw",
        "-t",
        "none",
        "-n",
        "-c",
        "64",
        "-s",
        "512",
        "-S",
        "1536",
        "--pattern=7",
        s(&v),
    ])
    .ok();
    let mut ranges = Vec::new();
    for i in 0..64u64 {
        ranges.push((7, i * 1536, 512));
        ranges.push((0, i * 1536 + 512, 1024));
    }
    assert_patterns(&v, &ranges);
}

#[test]
fn bench_reads_do_not_change_the_image() {
    let d = tempdir();
    let img = image(d.path(), "r.raw", "256k");
    vdisk_tests::qemu_io_write(&img, "raw", 0x11, 0, 256 * 1024);
    vdisk(&["bench", "-f", "raw", "-c", "1000", "-d", "16", "--pattern=0x22", s(&img)]).ok();
    assert_patterns(&img, &[(0x11, 0, 256 * 1024)]);
}
