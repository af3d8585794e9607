//! `commit [--object objectdef] [--image-opts] [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit]
//! [-d] [-p] filename`
//!
//! Everything the image (and any image between it and the base) allocates is copied into the base,
//! which grows if it is smaller, and the base is flushed ([`formats::commit::commit_into`]); only
//! then is the image emptied so that it shows the base through, unless `-d` (or `-b`, which
//! implies it) keeps it.
//!
//! Without `-t` the base is written with `O_DIRECT` where its file allows it
//! ([`crate::common::bulk_write_cache`]); the top, which only loses metadata, keeps `writeback`.

use std::sync::Arc;

use blockdev::{BlockDriver, CacheMode, OpenOptions};
use formats::commit::CommitStep;

use crate::args::{flag, opt, parse, Opt};
use crate::cmd::{cvtnum, registry};
use crate::common::{
    bulk_write_cache, cache_mode, image_keys, img_open, img_reopen, parse_image_opts, same_file, Objects, OpenRequest,
};
use crate::progress::Progress;
use crate::report::{CliError, CmdResult};

const OPTS: &[Opt] = &[
    opt("f", Some('f'), None),
    opt("t", Some('t'), None),
    opt("b", Some('b'), None),
    flag("d", Some('d'), None),
    flag("p", Some('p'), None),
    flag("q", Some('q'), None),
    opt("r", Some('r'), None),
    opt("object", None, Some("object")),
    flag("image-opts", None, Some("image-opts")),
];

/// Runs `commit`.
pub fn run(args: &[String]) -> CmdResult {
    let p = parse(args, OPTS)?;
    if p.has("help") {
        return crate::cmd::help();
    }
    if let Some(r) = p.value("r") {
        cvtnum("rate limit", r)?;
    }
    Objects::parse(p.values("object"))?;
    let quiet = p.has("q");
    if p.positional.len() != 1 {
        return Err(CliError::usage("Expecting one image file name"));
    }
    let name = &p.positional[0];
    // The top is only emptied (metadata and hole punching); the base gets the data.
    let cache = cache_mode(p.value("t"), CacheMode::Writeback, "cache")?;
    let drop_top = p.has("d") || p.has("b");
    let reg = registry();
    // qemu opens the image read-write with its backing chain first: a lock another process holds
    // on the image (or a write lock on a backing file) fails that open, and a probed raw image
    // gets its warning. That open only checks; its locks are released before the work starts,
    // since this process then opens the base for writing.
    let first =
        OpenRequest { name, fmt: p.value("f"), image_opts: p.has("image-opts"), opts: OpenOptions::read_write() };
    drop(img_open(&reg, &first)?);
    // Read through the whole chain without taking write permission on any of it.
    let view = OpenOptions { force_share: true, ..OpenOptions::default() };
    let top = img_reopen(&reg, &OpenRequest { name, fmt: p.value("f"), image_opts: p.has("image-opts"), opts: view })?;
    let progress = Progress::new(p.has("p") && !quiet, 1.0);
    progress.set(0.0);
    // The base is reopened for writing with its key (`backing.encrypt.key-secret`, ...).
    let backing_keys = match p.has("image-opts") {
        true => image_keys(&parse_image_opts(name)?, false).map_err(CliError::new)?.1,
        false => Vec::new(),
    };
    let result = commit(&reg, &top, p.value("b"), name, p.value("t"), &backing_keys, &progress);
    let result = result.and_then(|()| {
        if drop_top {
            return Ok(());
        }
        let fmt = top.format();
        drop(top);
        let opts = OpenOptions { read_only: false, cache, no_backing: true, ..OpenOptions::default() };
        let image_opts = p.has("image-opts");
        let fmt = (!image_opts).then_some(fmt);
        let rw = img_reopen(&reg, &OpenRequest { name, fmt, image_opts, opts })?;
        if let Some(ops) = rw.backing_ops() {
            ops.make_empty()?;
        }
        rw.close()?;
        Ok(())
    });
    if result.is_ok() {
        progress.set(100.0);
    }
    progress.end();
    result?;
    if !quiet {
        println!("Image committed.");
    }
    Ok(0)
}

fn commit(
    reg: &formats::Registry,
    top: &Arc<dyn BlockDriver>,
    base_name: Option<&str>,
    name: &str,
    cache: Option<&str>,
    backing_keys: &[Option<blockdev::crypto::Secret>],
    progress: &Progress,
) -> Result<(), CliError> {
    // Find the base and how deep it is in the chain.
    let mut depth = 0u32;
    let mut cur = top.clone();
    let base = loop {
        let Some(b) = cur.backing() else {
            return Err(match base_name {
                Some(bn) => CliError::new(format!("Did not find '{bn}' in the backing chain of '{name}'")),
                None => CliError::new("Image does not have a backing file"),
            });
        };
        depth += 1;
        match base_name {
            None => break b,
            Some(bn) if same_file(bn, b.filename()) => break b,
            Some(_) => cur = b,
        }
    };
    let cache = bulk_write_cache(cache, base.filename())?;
    let key_secret = backing_keys.get(depth as usize - 1).cloned().flatten();
    let backing_keys = backing_keys.iter().skip(depth as usize).cloned().collect();
    let opts = OpenOptions { read_only: false, cache, key_secret, backing_keys, ..OpenOptions::default() };
    let base_rw = reg
        .open(base.filename(), Some(base.format()), &opts)
        .map_err(|e| match e.kind() {
            // qemu reopens the base read-write inside the commit job: a lock conflict is reported
            // as is, not as a failed open.
            blockdev::ErrorKind::Locked | blockdev::ErrorKind::LockedInProcess => CliError::new(e.message()),
            _ => CliError::new(format!("Could not open '{}': {}", base.filename(), e.message())),
        })?
        .driver;
    let on_progress = |done: u64, total: u64| {
        if total > 0 {
            progress.set((done as f64 * 100.0 / total as f64) as f32);
        }
    };
    // Returns once the base is durable; the caller empties the top only after that.
    formats::commit::commit_into(top.as_ref(), base_rw.as_ref(), depth, &on_progress).map_err(|e| match e.step {
        CommitStep::Copy => CliError::new(format!("Block job failed: {}", e.error.message())),
        _ => CliError::from(e.error),
    })?;
    base_rw.close()?;
    Ok(())
}
