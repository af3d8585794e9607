//! Image locking that QEMU understands.
//!
//! QEMU advertises, per open image, which *permissions* it holds and which it refuses to *share*, as
//! shared OFD byte-range locks on single bytes of the image file: byte `100 + i` while it holds
//! permission bit `i`, byte `200 + i` while it does not share permission bit `i`. The bits are
//! consistent-read (0), write (1), write-unchanged (2) and resize (3).
//!
//! Before taking a permission `i` a process tests (as if for an exclusive lock) byte `200 + i`: a lock
//! there means another process does not share it. Before refusing to share `i` it tests byte
//! `100 + i`: a lock there means another process holds it. vdisk takes its locks first and tests
//! second, as QEMU does, so two processes racing both see each other. OFD locks belong to the open
//! file description, so vdisk's own locks never conflict with themselves and vanish when the file is
//! closed, even if the process dies.
//!
//! Two opens of one image in the same process are two open file descriptions, so their locks
//! conflict as another process's would, but the kernel does not say who holds a lock. Every open
//! file of the process records what it holds in a process-wide table (by device and inode), so a
//! conflict with an open of this process is reported as such ([`ErrorKind::LockedInProcess`],
//! also named in the error's alternate display), one with another process as
//! [`ErrorKind::Locked`].

use std::fmt;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::sys;
use crate::error::{Error, ErrorKind, Result};

const PERM_BASE: u64 = 100;
const SHARED_BASE: u64 = 200;

/// A set of QEMU block permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Perms(pub u8);

impl Perms {
    /// No permissions.
    pub const NONE: Perms = Perms(0);
    /// Reading with the guarantee that the content is consistent.
    pub const CONSISTENT_READ: Perms = Perms(0x01);
    /// Changing the content.
    pub const WRITE: Perms = Perms(0x02);
    /// Writing data that does not change what a reader sees.
    pub const WRITE_UNCHANGED: Perms = Perms(0x04);
    /// Changing the size.
    pub const RESIZE: Perms = Perms(0x08);
    /// Every permission.
    pub const ALL: Perms = Perms(0x0f);

    /// Whether every bit of `other` is in `self`.
    pub fn contains(self, other: Perms) -> bool {
        self.0 & other.0 == other.0
    }

    /// The union of two sets.
    pub fn union(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }

    /// The bits of `self` not in `other`.
    pub fn minus(self, other: Perms) -> Perms {
        Perms(self.0 & !other.0)
    }

    fn has_bit(self, bit: u32) -> bool {
        self.0 & (1 << bit) != 0
    }
}

fn perm_name(bit: u32) -> &'static str {
    match bit {
        0 => "consistent read",
        1 => "write",
        2 => "write unchanged",
        _ => "resize",
    }
}

/// What one open file of this process holds on an image file.
struct HeldHere {
    /// Device and inode of the file.
    file: (u64, u64),
    /// The [`LockState`] holding them.
    owner: u64,
    perm: Perms,
    unshared: Perms,
}

/// The locks every open file of this process holds (see the module docs).
static HELD_HERE: Mutex<Vec<HeldHere>> = Mutex::new(Vec::new());

/// Numbers the lock states of this process.
static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

/// The locks one open file currently holds.
pub(crate) struct LockState {
    held_perm: Perms,
    held_unshared: Perms,
    /// This state's entry in [`HELD_HERE`].
    owner: u64,
}

impl Default for LockState {
    fn default() -> LockState {
        LockState {
            held_perm: Perms::NONE,
            held_unshared: Perms::NONE,
            owner: NEXT_OWNER.fetch_add(1, Ordering::Relaxed),
        }
    }
}

fn held_here() -> std::sync::MutexGuard<'static, Vec<HeldHere>> {
    HELD_HERE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Device and inode of the file open as `fd`.
fn file_id(fd: RawFd) -> Result<(u64, u64)> {
    let st = sys::fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

impl fmt::Debug for LockState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "perm={:#x} unshared={:#x}", self.held_perm.0, self.held_unshared.0)
    }
}

impl LockState {
    /// Moves the locks on `fd` to (`perm`, everything but `shared`) after checking nobody conflicts.
    /// On a conflict the previous locks are restored and the error names the permission as QEMU does.
    pub(crate) fn apply(&mut self, fd: RawFd, path: &str, perm: Perms, shared: Perms) -> Result<()> {
        let unshared = Perms::ALL.minus(shared);
        let file = file_id(fd)?;
        let old = (self.held_perm, self.held_unshared);
        let result =
            self.set_bytes(fd, perm, unshared).and_then(|()| check(fd, path, perm, unshared, file, self.owner));
        if result.is_err() {
            // Best effort: put back what we had; the original error is what the user needs to see.
            let _ = self.set_bytes(fd, old.0, old.1);
            return result;
        }
        let mut here = held_here();
        here.retain(|h| h.owner != self.owner);
        here.push(HeldHere { file, owner: self.owner, perm, unshared });
        Ok(())
    }

    /// Drops every lock this file holds. Called before the descriptor is closed: a child process
    /// forked meanwhile may still hold a duplicate of the descriptor for a moment (until its exec
    /// closes it), and locks belong to the open file description, so closing alone could leave the
    /// image looking locked after vdisk is done with it.
    pub(crate) fn release(&mut self, fd: RawFd) {
        let _ = self.set_bytes(fd, Perms::NONE, Perms::NONE);
        held_here().retain(|h| h.owner != self.owner);
    }

    fn set_bytes(&mut self, fd: RawFd, perm: Perms, unshared: Perms) -> Result<()> {
        for bit in 0..4 {
            set_one(fd, PERM_BASE + bit as u64, perm.has_bit(bit), self.held_perm.has_bit(bit))?;
            self.held_perm = toggle(self.held_perm, bit, perm.has_bit(bit));
            set_one(fd, SHARED_BASE + bit as u64, unshared.has_bit(bit), self.held_unshared.has_bit(bit))?;
            self.held_unshared = toggle(self.held_unshared, bit, unshared.has_bit(bit));
        }
        Ok(())
    }
}

fn toggle(p: Perms, bit: u32, on: bool) -> Perms {
    if on {
        Perms(p.0 | (1 << bit))
    } else {
        Perms(p.0 & !(1 << bit))
    }
}

fn set_one(fd: RawFd, byte: u64, want: bool, have: bool) -> Result<()> {
    if want == have {
        return Ok(());
    }
    let kind = if want { libc::F_RDLCK } else { libc::F_UNLCK } as libc::c_short;
    sys::ofd_lock(fd, libc::F_OFD_SETLK, byte, kind).map(|_| ()).map_err(|e| {
        Error::from_errno("lock", e).prefixed(format!("Failed to lock byte {byte}")).with_kind(ErrorKind::Locked)
    })
}

fn check(fd: RawFd, path: &str, perm: Perms, unshared: Perms, file: (u64, u64), owner: u64) -> Result<()> {
    // Whether another open of this process holds what conflicts: `unshared` bit `bit` when
    // `theirs_unshared`, else permission bit `bit`.
    let here = |bit: u32, theirs_unshared: bool| {
        held_here().iter().any(|h| {
            h.file == file
                && h.owner != owner
                && if theirs_unshared { h.unshared.has_bit(bit) } else { h.perm.has_bit(bit) }
        })
    };
    for bit in 0..4 {
        if perm.has_bit(bit) && held_by_other(fd, SHARED_BASE + bit as u64)? {
            return Err(conflict(path, format!("Failed to get \"{}\" lock", perm_name(bit)), here(bit, true)));
        }
    }
    for bit in 0..4 {
        if unshared.has_bit(bit) && held_by_other(fd, PERM_BASE + bit as u64)? {
            return Err(conflict(path, format!("Failed to get shared \"{}\" lock", perm_name(bit)), here(bit, false)));
        }
    }
    Ok(())
}

fn held_by_other(fd: RawFd, byte: u64) -> Result<bool> {
    match sys::ofd_lock(fd, libc::F_OFD_GETLK, byte, libc::F_WRLCK as libc::c_short) {
        Ok(kind) => Ok(kind != libc::F_UNLCK as libc::c_short),
        Err(e) => Err(Error::from_errno("lock", e).prefixed(format!("Failed to test byte {byte}"))),
    }
}

/// The error for a lock `what` that a holder refuses: another open of this process
/// (`in_process`, [`ErrorKind::LockedInProcess`]) or another process ([`ErrorKind::Locked`]). The
/// message is qemu's in both cases (qemu-img words its own double opens so too); the kind tells
/// them apart.
fn conflict(path: &str, what: String, in_process: bool) -> Error {
    let kind = if in_process { ErrorKind::LockedInProcess } else { ErrorKind::Locked };
    Error::new(kind, format!("{what}\nIs another process using the image [{path}]?")).with_path(path)
}
