//! The malformed-image corpus: every vdisk command on every image of
//! `scripts/malformed-corpus.py`'s output must finish within 5 seconds and 256 MiB, never panic
//! or die of a signal, and explain every failure on stderr.
//!
//! The script derives a few hundred broken qcow2 images from the reference images (header fields,
//! truncation, oversized and overlapping tables, loops, entries past the end of the file,
//! unaligned offsets, compressed descriptors, random bit flips) and classifies each one with
//! qemu-img in the same run (`manifest.json`):
//!
//! - `open`: qemu-img cannot open it; every vdisk command must fail with a message;
//! - `inside`: it opens, qemu-img check reports errors; vdisk check must fail too (exit 1, 2 or 3);
//! - `read`: it opens and checks clean, but qemu-img map or convert fails.
//!
//! For `info`, `check`, `map` and `convert -O raw`, vdisk's exit status must agree with qemu-img's
//! on zero versus non-zero, except for the documented [`EXCEPTIONS`]. The other commands (compare,
//! measure, dd, bench, repair, resize, amend, commit, rebase; the writing ones on copies) only have
//! to succeed or fail cleanly. Needs python3 and qemu-img and fails (never skips) without them.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use vdisk_tests::{qemu_tool, tempdir};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/malformed-corpus.py");
/// Wall-time limit of one vdisk run.
const TIME_LIMIT: Duration = Duration::from_secs(5);
/// Peak resident memory limit of one vdisk run, in KiB.
const RSS_LIMIT_KIB: i64 = 256 * 1024;

/// A known difference from qemu-img on a corpus image, with the reason it is kept.
struct Exception {
    /// Base image of the mutation (`None`: any).
    base: Option<&'static str>,
    /// Mutation name prefix (`""`: any).
    mutation: &'static str,
    /// Commands concerned: `info`, `check`, `map`, `convert` (agreement with qemu-img), or
    /// `open:JOB` (the requirement that job JOB fails on an `open` image; `open:*` for all jobs).
    commands: &'static [&'static str],
    /// Text vdisk's stderr must contain for the exception to apply (`""`: anything).
    stderr: &'static str,
    why: &'static str,
}

const EXCEPTIONS: &[Exception] = &[
    Exception {
        base: None,
        mutation: "",
        commands: &["info", "map", "convert"],
        stderr: "has reserved bits set",
        why: "vdisk checks every L1 entry when it opens an image and refuses one with reserved bits set \
              (the qcow2 spec requires them to be zero); qemu opens it and only complains where the \
              entry is used (check reports it, reads of that range fail or see zeros)",
    },
    Exception {
        base: None,
        mutation: "crypt_method=0x1",
        commands: &["info"],
        stderr: "Encrypted qcow2 images are not supported",
        why: "encryption is issue-tracked; qemu-img info shows a legacy AES image without its key",
    },
    Exception {
        base: None,
        mutation: "",
        commands: &["map", "convert"],
        stderr: "Refblock offset",
        why: "vdisk's read path validates the refcount table entry it meets (an unaligned refcount \
              block offset is fatal); qemu only logs the corruption event and reads on",
    },
    Exception {
        base: Some("snapshot.qcow2"),
        mutation: "",
        commands: &["open:*", "info", "check", "map", "convert"],
        stderr: "",
        why: "internal snapshots are issue 5: vdisk does not read the snapshot table yet, so damage \
              confined to it (or to clusters only a snapshot references) goes unnoticed",
    },
    Exception {
        base: None,
        mutation: "snapshots_offset-unaligned",
        commands: &["open:repair"],
        stderr: "",
        why: "vdisk does not read the snapshot table yet (issue 5): check -r all does not see that its \
              offset is invalid, repairs the refcount of the cluster it points into and exits 0; \
              qemu-img fails to open the image, before and after",
    },
    Exception {
        base: None,
        mutation: "inside-l1",
        commands: &["check"],
        stderr: "",
        why: "an L1 table cut by the end of the file: vdisk reads the missing entries as zero \
              (unallocated), qemu-img check counts the short read as errors",
    },
    Exception {
        base: Some("v2.qcow2"),
        mutation: "l1-on-refcount-table",
        commands: &["map", "convert"],
        stderr: "",
        why: "the refcount table read as an L1 table names the refcount block as an L2 table; vdisk \
              reads it through, qemu's overlap check fails the read (check reports it in both)",
    },
];

/// One manifest entry.
struct Entry {
    file: String,
    category: String,
    mutation: String,
    base: String,
    format: Option<String>,
    class: String,
    companions: Vec<String>,
    /// qemu-img's exit status per command (`None`: timed out or not run).
    qemu: Vec<(String, Option<i64>, f64, i64)>,
}

impl Entry {
    fn qemu_exit(&self, cmd: &str) -> Option<i64> {
        self.qemu.iter().find(|q| q.0 == cmd).and_then(|q| q.1)
    }

    fn exception(&self, cmd: &str, stderr: &str) -> Option<&'static Exception> {
        EXCEPTIONS.iter().find(|e| {
            e.base.is_none_or(|b| b == self.base)
                && self.mutation.starts_with(e.mutation)
                && (e.commands.contains(&cmd) || (cmd.starts_with("open:") && e.commands.contains(&"open:*")))
                && stderr.contains(e.stderr)
        })
    }
}

/// The outcome of one vdisk run.
struct Outcome {
    /// Exit status (`None`: killed by a signal, or by us after the time limit).
    code: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
    secs: f64,
    maxrss_kib: i64,
    stderr: String,
}

/// Runs `vdisk args` in `dir`, stdout discarded, stderr to `errfile`; kills it at the time limit
/// and reports its peak RSS from wait4's rusage.
fn run_vdisk(dir: &Path, args: &[String], errfile: &Path) -> Outcome {
    let err = fs::File::create(errfile).expect("stderr file");
    let start = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_vdisk"))
        .arg0("qemu-img")
        .args(args)
        .current_dir(dir)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .expect("spawn vdisk");
    let pid = child.id() as libc::pid_t;
    let mut timed_out = false;
    let (status, rusage) = loop {
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value; wait4 fills it in.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: pid is our own child, not yet reaped; the pointers are valid for the call.
        let r = unsafe { libc::wait4(pid, &mut status, if timed_out { 0 } else { libc::WNOHANG }, &mut ru) };
        if r == pid {
            break (status, ru);
        }
        assert!(r == 0, "wait4: {}", std::io::Error::last_os_error());
        if start.elapsed() > TIME_LIMIT {
            // SAFETY: kill on our own unreaped child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            timed_out = true;
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    drop(child); // already reaped by wait4; dropping a Child neither waits nor kills
    let secs = start.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&fs::read(errfile).unwrap_or_default()).into_owned();
    let (code, signal) = if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else {
        (None, Some(libc::WTERMSIG(status)))
    };
    Outcome { code, signal, timed_out, secs, maxrss_kib: rusage.ru_maxrss, stderr }
}

fn find_in_path(name: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} is required for this test but is not installed");
}

fn load_manifest(dir: &Path) -> Vec<Entry> {
    let text = fs::read_to_string(dir.join("manifest.json")).expect("manifest.json");
    let v: Value = serde_json::from_str(&text).expect("manifest.json is JSON");
    let str_of = |e: &Value, k: &str| e[k].as_str().unwrap_or_else(|| panic!("manifest: {k} in {e}")).to_string();
    v["images"]
        .as_array()
        .expect("images")
        .iter()
        .map(|e| Entry {
            file: str_of(e, "file"),
            category: str_of(e, "category"),
            mutation: str_of(e, "mutation"),
            base: str_of(e, "base"),
            format: e["format"].as_str().map(str::to_string),
            class: str_of(e, "class"),
            companions: e["companions"]
                .as_array()
                .expect("companions")
                .iter()
                .map(|c| c.as_str().expect("companion").to_string())
                .collect(),
            qemu: e["qemu_img"]
                .as_object()
                .expect("qemu_img")
                .iter()
                .map(|(k, r)| {
                    (
                        k.clone(),
                        r["exit"].as_i64(),
                        r["secs"].as_f64().unwrap_or(0.0),
                        r["maxrss_kib"].as_i64().unwrap_or(0),
                    )
                })
                .collect(),
        })
        .collect()
}

/// A vdisk invocation: the command's name (for expectations and exceptions) and its arguments.
struct Job {
    name: &'static str,
    args: Vec<String>,
    /// Runs on a fresh copy of the image (and its companions) in the scratch directory.
    on_copy: bool,
}

fn jobs(e: &Entry, scratch: &Path) -> Vec<Job> {
    let f = |v: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = vec![v[0].to_string()];
        if let Some(fmt) = &e.format {
            a.push("-f".into());
            a.push(fmt.clone());
        }
        a.extend(v[1..].iter().map(|s| s.to_string()));
        a
    };
    let out = |n: &str| scratch.join(n).to_str().expect("utf-8 path").to_string();
    let img = e.file.as_str();
    let job = |name, args: Vec<String>| Job { name, args, on_copy: false };
    let copy = |name, args: Vec<String>| Job { name, args, on_copy: true };
    let (raw_out, qcow2_out, dd_out, reference) = (out("out.raw"), out("out.qcow2"), out("dd.raw"), out("ref.raw"));
    let mut dd = f(&["dd", "-O", "raw", "bs=64k", "count=16"]);
    dd.push(format!("if={img}"));
    dd.push(format!("of={dd_out}"));
    vec![
        job("info", f(&["info", img])),
        job("info", f(&["info", "--output=json", img])),
        job("info-chain", f(&["info", "--backing-chain", img])),
        job("check", f(&["check", img])),
        job("check-json", f(&["check", "--output=json", img])),
        job("map", f(&["map", img])),
        // compared with qemu-img's human map only: that one fails on compressed clusters
        job("map-json", f(&["map", "--output=json", img])),
        job("convert", f(&["convert", "-O", "raw", img, &raw_out])),
        job("convert-qcow2", f(&["convert", "-O", "qcow2", img, &qcow2_out])),
        job("compare", f(&["compare", "-F", "raw", img, &reference])),
        job("measure", f(&["measure", "-O", "qcow2", img])),
        job("dd", dd),
        job("bench", f(&["bench", "-c", "16", "-s", "4k", img])),
        copy("repair", f(&["check", "-r", "all", img])),
        copy("resize", f(&["resize", img, "+1M"])),
        copy("amend", f(&["amend", "-o", "lazy_refcounts=on", img])),
        copy("commit", f(&["commit", img])),
        copy("rebase", f(&["rebase", "-u", "-b", "", img])),
    ]
}

/// What one worker observed.
#[derive(Default)]
struct Stats {
    runs: usize,
    slowest: (f64, String),
    largest: (i64, String),
    failures: Vec<String>,
    exceptions: Vec<String>,
    check_code_differs: Vec<String>,
}

/// Whether qemu-img check -r all succeeds on a copy of `e` (in a directory of its own).
fn qemu_repairs(corpus: &Path, e: &Entry) -> bool {
    let tmp = tempdir();
    for f in std::iter::once(&e.file).chain(&e.companions) {
        fs::copy(corpus.join(f), tmp.path().join(f)).expect("copy image");
    }
    let mut args = vec!["check", "-r", "all"];
    if let Some(fmt) = &e.format {
        args.extend(["-f", fmt.as_str()]);
    }
    args.push(&e.file);
    vdisk_tests::run_in(Some(tmp.path()), &qemu_tool("qemu-img"), &args).code == 0
}

fn judge(dir: &Path, e: &Entry, job: &Job, o: &Outcome, st: &mut Stats) {
    let what = format!(
        "{} ({}/{} of {}, class {}): vdisk {}",
        e.file,
        e.category,
        e.mutation,
        e.base,
        e.class,
        job.args.join(" ")
    );
    st.runs += 1;
    if o.secs > st.slowest.0 {
        st.slowest = (o.secs, what.clone());
    }
    if o.maxrss_kib > st.largest.0 {
        st.largest = (o.maxrss_kib, what.clone());
    }
    let mut fail = |msg: String| st.failures.push(format!("{what}: {msg}\n    stderr: {}", o.stderr.trim_end()));
    if o.timed_out {
        return fail(format!("still running after {TIME_LIMIT:?} (killed)"));
    }
    if let Some(sig) = o.signal {
        return fail(format!("killed by signal {sig}"));
    }
    if o.maxrss_kib > RSS_LIMIT_KIB {
        fail(format!("peak RSS {} MiB", o.maxrss_kib / 1024));
    }
    let code = o.code.expect("exited");
    if code == 101 || o.stderr.contains("panicked") {
        return fail(format!("panicked (exit {code})"));
    }
    // compare's exit 1 means "the images differ", reported on stdout
    if code != 0 && !(job.name == "compare" && code == 1) && o.stderr.trim().is_empty() {
        fail(format!("exit {code} with nothing on stderr"));
    }
    // regression: a qcow2 header whose version reads 1 was probed as raw (qemu's qcow driver claims it)
    if e.mutation == "version=0x1" && !o.stderr.contains("qcow (version 1) format") {
        st.failures
            .push(format!("{what}: not refused as a qcow (version 1) image\n    stderr: {}", o.stderr.trim_end()));
    }
    let excused = |cmd: &str, st: &mut Stats| -> bool {
        match e.exception(cmd, &o.stderr) {
            Some(x) => {
                st.exceptions.push(format!("{what}: exit {code} ({cmd}: {})", x.why));
                true
            }
            None => false,
        }
    };
    if e.class == "open" && code == 0 && !excused(&format!("open:{}", job.name), st) {
        if job.name == "repair" && qemu_repairs(dir, e) {
            // qemu-img check -r all opens what info cannot (a refcount table of 0 clusters) and
            // repairs it: vdisk may too
            st.exceptions.push(format!("{what}: exit 0 (qemu-img check -r all repairs it too)"));
        } else {
            st.failures.push(format!("{what}: qemu-img cannot open this image, vdisk exits 0"));
        }
    }
    if e.class == "inside" && job.name == "check" && !(1..=3).contains(&code) && !excused("check", st) {
        st.failures.push(format!("{what}: qemu-img check finds errors, vdisk check exits {code}"));
    }
    if matches!(job.name, "info" | "check" | "map" | "convert") {
        let q = e.qemu_exit(job.name);
        if (code == 0) != (q == Some(0)) && !excused(job.name, st) {
            st.failures.push(format!(
                "{what}: exit {code}, qemu-img {} exits {}\n    stderr: {}",
                job.name,
                q.map_or("(timed out / not run)".to_string(), |q| q.to_string()),
                o.stderr.trim_end()
            ));
        } else if job.name == "check" && q.is_some_and(|q| q != i64::from(code)) && code != 0 {
            st.check_code_differs.push(format!("{what}: exit {code}, qemu-img check {}", q.expect("some")));
        }
    }
}

#[test]
fn malformed_corpus() {
    let python = find_in_path("python3");
    let qemu_img = qemu_tool("qemu-img");
    let corpus = tempdir();
    let dir = corpus.path();
    let t0 = Instant::now();
    let gen = Command::new(&python)
        .arg(SCRIPT)
        .arg(dir)
        .env("QEMU_IMG", &qemu_img)
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/malformed-corpus.py");
    assert!(gen.status.success(), "malformed-corpus.py failed:\n{}", String::from_utf8_lossy(&gen.stderr));
    eprintln!("{} ({:.1} s)", String::from_utf8_lossy(&gen.stdout).trim(), t0.elapsed().as_secs_f64());
    let entries = load_manifest(dir);
    assert!(entries.len() >= 100, "only {} images in the corpus", entries.len());

    let next = AtomicUsize::new(0);
    let all = Mutex::new(Stats::default());
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).max(2);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                let scratch = tempdir();
                let sdir = scratch.path();
                fs::write(sdir.join("ref.raw"), vec![0u8; 1 << 20]).expect("ref.raw");
                let errfile = sdir.join("stderr.txt");
                let copies = sdir.join("copies");
                let mut st = Stats::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(e) = entries.get(i) else { break };
                    for job in jobs(e, sdir) {
                        let cwd = if job.on_copy {
                            let _ = fs::remove_dir_all(&copies);
                            fs::create_dir(&copies).expect("copies dir");
                            for f in std::iter::once(&e.file).chain(&e.companions) {
                                fs::copy(dir.join(f), copies.join(f)).expect("copy image");
                            }
                            copies.clone()
                        } else {
                            dir.to_path_buf()
                        };
                        let o = run_vdisk(&cwd, &job.args, &errfile);
                        judge(dir, e, &job, &o, &mut st);
                        for out in ["out.raw", "out.qcow2", "dd.raw"] {
                            let _ = fs::remove_file(sdir.join(out));
                        }
                    }
                }
                let mut all = all.lock().expect("stats");
                all.runs += st.runs;
                if st.slowest.0 > all.slowest.0 {
                    all.slowest = st.slowest;
                }
                if st.largest.0 > all.largest.0 {
                    all.largest = st.largest;
                }
                all.failures.extend(st.failures);
                all.exceptions.extend(st.exceptions);
                all.check_code_differs.extend(st.check_code_differs);
            });
        }
    });
    let st = all.into_inner().expect("stats");

    // qemu-img's figures on the same corpus, from the manifest (measured by the script).
    let mut q_slow = (0.0, String::new());
    let mut q_big = (0, String::new());
    for e in &entries {
        for (cmd, code, secs, rss) in &e.qemu {
            let what = format!("{} ({}/{}) qemu-img {cmd}: exit {code:?}", e.file, e.category, e.mutation);
            if *secs > q_slow.0 {
                q_slow = (*secs, what.clone());
            }
            if *rss > q_big.0 {
                q_big = (*rss, what);
            }
        }
    }
    let mut classes = std::collections::BTreeMap::<String, usize>::new();
    for e in &entries {
        *classes.entry(format!("{}/{}", e.category, e.class)).or_default() += 1;
    }
    eprintln!("images per category/class: {classes:?}");
    eprintln!("{} vdisk runs on {} images in {:.1} s", st.runs, entries.len(), t0.elapsed().as_secs_f64());
    eprintln!("vdisk slowest: {:.3} s, {}", st.slowest.0, st.slowest.1);
    eprintln!("vdisk largest peak RSS: {} KiB, {}", st.largest.0, st.largest.1);
    eprintln!("qemu-img slowest: {:.3} s, {}", q_slow.0, q_slow.1);
    eprintln!("qemu-img largest peak RSS: {} KiB, {}", q_big.0, q_big.1);
    eprintln!("{} documented exceptions applied:", st.exceptions.len());
    for x in &st.exceptions {
        eprintln!("  {x}");
    }
    eprintln!("{} images where check's non-zero exit differs from qemu-img's:", st.check_code_differs.len());
    for x in &st.check_code_differs {
        eprintln!("  {x}");
    }
    assert!(st.failures.is_empty(), "{} failures:\n{}", st.failures.len(), st.failures.join("\n"));
}
