//! The `file` protocol ([`FileProtocol`]): local files, opened with qemu's locks and created
//! with qemu's protocol-level options.
//!
//! Every image format writes into a container; for local files the container has its own `-o`
//! options (`preallocation`, `nocow`, `extent_size_hint`), which qemu-img lists after the format's
//! own and prints in the "Formatting" line. Creation follows qemu's file driver: truncate to the
//! size, reserve space as asked, and write the first block (512 bytes, or 4 KiB for sizes of at
//! least 4 KiB) so later alignment probing and `disk size` match qemu's.

use std::sync::Arc;

use blockdev::options::{CreateOptions, OptionKind, OptionSpec};
use blockdev::{
    write_all_at, CacheMode, Error, HostFile, HostOpenOptions, OpenOptions, Perms, Prealloc, Protocol, Result, Storage,
};

/// The `file` protocol's create options, in qemu's order.
pub const FILE_CREATE_OPTIONS: &[OptionSpec] = &[
    OptionSpec::new("size", OptionKind::Size, "Virtual disk size"),
    OptionSpec::new("nocow", OptionKind::Bool, "Turn off copy-on-write (valid only on btrfs)"),
    OptionSpec::new("preallocation", OptionKind::Str, "Preallocation mode (allowed values: off, falloc, full)"),
    OptionSpec::new("extent_size_hint", OptionKind::Size, "Extent size hint for the image file, 0 to disable"),
];

/// Local files: the registry's fallback protocol, for every name no other protocol claims (a
/// `file:` prefix is dropped; see [`local_path`]).
#[derive(Debug, Default)]
pub struct FileProtocol;

impl Protocol for FileProtocol {
    fn drivers(&self) -> &'static [&'static str] {
        &["file"]
    }

    fn claims(&self, _filename: &str) -> bool {
        true
    }

    fn open(&self, filename: &str, opts: &OpenOptions) -> Result<Arc<dyn Storage>> {
        Ok(Arc::new(HostFile::open(&local_path(filename), &host_options(opts))?))
    }

    fn create(&self, filename: &str, size: u64, prealloc: Prealloc) -> Result<Arc<dyn Storage>> {
        Ok(create_file(&local_path(filename), size, prealloc)?)
    }

    /// Removes the file a failed create left (a regular file only, never a device or a link).
    fn delete(&self, filename: &str) {
        let path = local_path(filename);
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_file()) {
            let _ = std::fs::remove_file(&path);
        }
    }

    fn is_remote(&self) -> bool {
        false
    }
}

/// The local path a file name refers to: a `file:` prefix is dropped, and a name whose first
/// colon comes before any slash (which qemu would read as a protocol prefix) gets `./` in front,
/// the way qemu spells such names in messages and `info`.
pub fn local_path(name: &str) -> String {
    let rest = name.strip_prefix("file:").unwrap_or(name);
    let colon = rest.find(':');
    let slash = rest.find('/');
    match (colon, slash) {
        (Some(_), None) => format!("./{rest}"),
        (Some(c), Some(s)) if c < s => format!("./{rest}"),
        _ => rest.to_string(),
    }
}

/// The options for opening an existing local file of an image opened with `opts`.
fn host_options(opts: &OpenOptions) -> HostOpenOptions {
    HostOpenOptions {
        read_only: opts.read_only,
        cache: opts.cache,
        create: false,
        no_locking: opts.no_locking,
        eager_writeback: opts.eager_writeback,
    }
}

/// Parses a file-level `preallocation` value (`metadata` is a format-level mode, not the file's).
pub fn file_prealloc(opts: &CreateOptions) -> Result<Prealloc> {
    match opts.get("preallocation") {
        None => Ok(Prealloc::Off),
        Some(v) => match Prealloc::parse(v) {
            Some(p @ (Prealloc::Off | Prealloc::Falloc | Prealloc::Full)) => Ok(p),
            _ => Err(Error::invalid_argument(format!("invalid parameter value: {v}"))),
        },
    }
}

/// Creates (truncating) the local file `name`, sized `size` rounded up to 512 bytes as qemu's file
/// driver does, with `prealloc`, and returns it open read-write with exclusive QEMU locks.
pub fn create_file(name: &str, size: u64, prealloc: Prealloc) -> Result<Arc<HostFile>> {
    let size = size.checked_next_multiple_of(512).ok_or_else(|| Error::out_of_range("Image size too large"))?;
    let f = HostFile::open(
        name,
        &HostOpenOptions {
            read_only: false,
            cache: CacheMode::Writeback,
            create: false,
            no_locking: false,
            eager_writeback: false,
        },
    )
    .or_else(|e| {
        if e.kind() == blockdev::ErrorKind::NotFound {
            HostFile::open(name, &HostOpenOptions { create: true, ..Default::default() })
        } else {
            Err(e)
        }
    })
    .map_err(|e| {
        let msg = format!("Could not create '{name}': {}", strip_open_prefix(e.message(), name));
        e.with_message(msg)
    })?;
    // Creating an image that a running QEMU uses must fail, as it does for qemu-img; qemu's file
    // driver takes write and resize and shares everything but resize, so a process that merely
    // reads or writes a raw image (qemu-io, a raw disk of a VM) does not stop it.
    f.set_permissions(Perms::WRITE.union(Perms::RESIZE), Perms::ALL.minus(Perms::RESIZE))?;
    f.set_len(0, Prealloc::Off)?;
    grow_new_file(&f, size, prealloc)?;
    Ok(Arc::new(f))
}

/// Grows a just-truncated file to `size`, as qemu's file driver does on create.
fn grow_new_file(f: &HostFile, size: u64, prealloc: Prealloc) -> Result<()> {
    match prealloc {
        Prealloc::Off | Prealloc::Metadata => {
            f.set_len(size, Prealloc::Off)?;
            allocate_first_block(f, size)
        }
        Prealloc::Falloc => {
            f.set_len(size, Prealloc::Falloc)?;
            allocate_first_block(f, size)
        }
        Prealloc::Full => {
            f.set_len(size, Prealloc::Full)?;
            f.flush()
        }
    }
}

/// Writes zeros to the first block of a new file (512 bytes below 4 KiB, else 4 KiB); the size is
/// a multiple of 512, so the length never changes.
fn allocate_first_block(f: &HostFile, size: u64) -> Result<()> {
    if size == 0 {
        return Ok(());
    }
    let n = if size < 4096 { 512 } else { 4096 };
    write_all_at(f, 0, &vec![0u8; n])
}

fn strip_open_prefix<'a>(msg: &'a str, name: &str) -> &'a str {
    msg.strip_prefix(&format!("Could not open '{name}': ")).unwrap_or(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_files_like_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        let name = p.to_str().unwrap();
        let f = create_file(name, 1 << 20, Prealloc::Off).unwrap();
        assert_eq!(f.len().unwrap(), 1 << 20);
        assert_eq!(f.allocated_size().unwrap(), Some(4096));
        drop(f);
        let f = create_file(name, 100, Prealloc::Off).unwrap();
        assert_eq!(f.len().unwrap(), 512, "sizes are rounded up to sectors");
        drop(f);
        let f = create_file(name, 1 << 20, Prealloc::Full).unwrap();
        assert!(f.allocated_size().unwrap().unwrap() >= 1 << 20);
        let mut o = CreateOptions::new();
        o.set("preallocation", "metadata");
        assert_eq!(file_prealloc(&o).unwrap_err().message(), "invalid parameter value: metadata");
    }

    #[test]
    fn create_in_missing_directory_fails_with_qemu_text() {
        let e = create_file("/nonexistent-dir/x.img", 1, Prealloc::Off).unwrap_err();
        assert_eq!(e.message(), "Could not create '/nonexistent-dir/x.img': No such file or directory");
    }
}
