//! Reading persistent dirty bitmaps with QEMU, the independent reader: qemu-nbd exports the image
//! with the bitmaps, and QEMU's qemu-img maps the export with `x-dirty-bitmap`, which reports the
//! set bits as holes.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{qemu_img, qemu_tool, s};

/// The dirty ranges `(offset, len)` of each named bitmap of the qcow2 image `img`, as QEMU reads
/// them (ranges cover whole granules, clipped to the disk).
pub fn dirty_ranges_via_qemu(img: &Path, names: &[&str]) -> Vec<Vec<(u64, u64)>> {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let mut cmd = Command::new(qemu_tool("qemu-nbd"));
    cmd.args(["-r", "-t", "-f", "qcow2", "-k", s(&sock)]);
    for n in names {
        cmd.args(["-B", n]);
    }
    cmd.arg(s(img)).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("qemu-nbd runs");
    let start = Instant::now();
    while !sock.exists() {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("qemu-nbd exited ({st}) before listening: {err}");
        }
        assert!(start.elapsed() < Duration::from_secs(20), "qemu-nbd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = names
        .iter()
        .map(|n| {
            let opts =
                format!("driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{n}", s(&sock));
            let r = qemu_img(&["map", "--output=json", "--image-opts", &opts]).ok();
            let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("map JSON");
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            for e in v.as_array().unwrap() {
                if e["data"] == false {
                    let (o, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
                    match ranges.last_mut() {
                        Some(last) if last.0 + last.1 == o => last.1 += l,
                        _ => ranges.push((o, l)),
                    }
                }
            }
            ranges
        })
        .collect();
    let _ = child.kill();
    let _ = child.wait();
    out
}
