//! Shared helpers for vdisk's integration tests: running vdisk and the QEMU tools side by side.
//!
//! qemu-img, qemu-io and qemu-nbd are the oracle. Tests that need them fail (never skip) when they
//! are missing, so a CI machine without QEMU turns red instead of passing vacuously.

pub mod bitmaps;
pub mod crash;
pub mod model;
pub mod nginx;
pub mod servers;
pub mod workloads;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Runs a command to completion with no input.
pub fn output(cmd: &mut Command) -> std::io::Result<Output> {
    cmd.stdin(Stdio::null()).output()
}

/// Opens an image through the registry.
pub fn open_image(
    reg: &formats::Registry,
    path: &Path,
    fmt: Option<&str>,
    opts: &blockdev::OpenOptions,
) -> blockdev::Result<std::sync::Arc<dyn blockdev::BlockDriver>> {
    reg.open(s(path), fmt, opts).map(|o| o.driver)
}

/// The result of running a command.
#[derive(Debug, Clone)]
pub struct Run {
    /// Exit code (-1 if killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Run {
    /// Panics with the whole output unless the exit code is 0.
    pub fn ok(self) -> Run {
        assert_eq!(self.code, 0, "command failed:\nstdout: {}\nstderr: {}", self.stdout, self.stderr);
        self
    }
}

/// Path of a QEMU tool; panics if it is not installed (tests must fail, not skip, without it).
pub fn qemu_tool(name: &str) -> PathBuf {
    let var = format!("{}_PROG", name.to_uppercase().replace('-', "_"));
    if let Some(p) = std::env::var_os(&var) {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} is required for this test but is not installed (install qemu-utils 10.0.2 from bookworm-backports)");
}

/// Runs `program` with `args` in `dir` (or the current directory).
pub fn run_in(dir: Option<&Path>, program: &Path, args: &[&str]) -> Run {
    let mut c = Command::new(program);
    c.args(args);
    if let Some(d) = dir {
        c.current_dir(d);
    }
    c.env("LC_ALL", "C");
    output(&mut c).unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display())).into()
}

/// Runs qemu-img.
pub fn qemu_img(args: &[&str]) -> Run {
    run_in(None, &qemu_tool("qemu-img"), args)
}

/// Runs qemu-io.
pub fn qemu_io(args: &[&str]) -> Run {
    run_in(None, &qemu_tool("qemu-io"), args)
}

/// Runs `vdisk` (the binary at `bin`) under the name `qemu-img`, so messages carry qemu-img's
/// prefix and can be compared byte for byte.
pub fn vdisk_as_qemu_img(bin: &Path, args: &[&str]) -> Run {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(bin);
    c.arg0("qemu-img").args(args).env("LC_ALL", "C");
    output(&mut c).unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display())).into()
}

/// Writes two patterns into the qcow2 `overlay` with qemu-io (128 KiB of 0x44 at 1 MiB, 64 KiB of
/// 0x55 at 7 MiB) and returns what the overlay then holds when its backing content is `base`.
pub fn write_into_overlay(overlay: &Path, base: &Path) -> Vec<u8> {
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x44 1M 128k", "-c", "write -P 0x55 7M 64k", s(overlay)]).ok();
    let mut want = std::fs::read(base).unwrap();
    want[1 << 20..(1 << 20) + (128 << 10)].fill(0x44);
    want[7 << 20..(7 << 20) + (64 << 10)].fill(0x55);
    want
}

/// Writes `pattern` bytes at `offset..offset+len` of `image` (format `fmt`) with qemu-io.
pub fn qemu_io_write(image: &Path, fmt: &str, pattern: u8, offset: u64, len: u64) {
    let cmd = format!("write -P {pattern:#x} {offset} {len}");
    qemu_io(&["-f", fmt, "-c", &cmd, image.to_str().expect("utf-8 path")]).ok();
}

/// A deterministic pseudo-random generator (xorshift64), so tests need no RNG crate.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator started from `seed`.
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed | 1)
    }

    /// The next value.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value in `[0, n)` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A deterministic pseudo-random buffer.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = XorShift::new(seed);
    (0..len).map(|_| x.next() as u8).collect()
}

/// The temporary directory type of [`tempdir`].
pub use tempfile::TempDir;

/// A fresh temporary directory.
pub fn tempdir() -> TempDir {
    tempfile::tempdir().expect("temporary directory")
}

/// `path` as `&str`.
pub fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// A qcow2 image for model-based tests, made by vdisk: `size` bytes, `cluster_size`, optionally
/// extended L2 entries and a raw backing file of `backing` bytes filled with `0x77` (made by
/// qemu-img and qemu-io). Returns the image's path and the model of its initial content.
pub fn model_qcow2(
    dir: &Path,
    reg: &formats::Registry,
    size: u64,
    cluster_size: &str,
    extended: bool,
    backing: Option<u64>,
) -> blockdev::Result<(PathBuf, Vec<u8>)> {
    let img = dir.join("model.qcow2");
    let mut model = vec![0u8; size as usize];
    let mut o = blockdev::options::CreateOptions::new();
    o.set("size", &size.to_string());
    o.set("cluster_size", cluster_size);
    if extended {
        o.set("extended_l2", "on");
    }
    if let Some(len) = backing {
        let base = dir.join("backing.raw");
        qemu_img(&["create", "-f", "raw", s(&base), &len.to_string()]).ok();
        qemu_io(&["-f", "raw", "-c", &format!("write -P 0x77 0 {len}"), s(&base)]).ok();
        model[..len as usize].fill(0x77);
        o.set("backing_file", s(&base));
        o.set("backing_fmt", "raw");
    }
    reg.create("qcow2", s(&img), &o)?;
    Ok((img, model))
}
