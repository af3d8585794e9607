//! Persistent dirty bitmaps (the bitmaps header extension): the directory, bitmap tables and bit
//! data (`dir.rs`, `store.rs`), the operations `qemu-img bitmap` and a VMM use, and the recording
//! of guest writes into enabled bitmaps (`ops.rs`).
//!
//! Invariants:
//! - the bitmaps extension is written only with its autoclear bit set; an image whose extension
//!   lacks the bit was changed by a program that does not know bitmaps, so its bitmaps are dropped
//!   (the header loses the extension at the first write; their clusters leak until `check -r`);
//! - a bitmap marked in use on disk may be wrong: it is listed and can be removed, nothing else;
//! - while an image is open for writing, the guest ranges changed are recorded in memory (merged
//!   ranges, not bits: memory follows the writes, not the bitmaps' sizes); before the first guest
//!   write the enabled bitmaps are marked in use on disk, and a clean close (or any bitmap
//!   operation, or a recording grown past `MAX_RECORDED_RANGES`) stores them and clears the mark.
//!   A crash leaves them marked: inconsistent, never silently stale;
//! - a bitmap is in memory one at a time, and at most qemu's limit on a bitmap's data.
//!
//! Update order for every change (crash at any point: at worst leaked clusters):
//! 1. new bit data and a new bitmap table go to newly allocated clusters;
//! 2. refcounts and those clusters are made durable; the new directory is written to new clusters
//!    and synced;
//! 3. the header (with the extension) is switched to the new directory and synced;
//! 4. only then are the old directory, tables and data freed.

pub mod dir;
mod ops;
mod store;

pub use dir::{BitmapEntry, BitmapsExt};
pub(crate) use ops::RecordingSlot;
pub(crate) use store::{table_entry_is_valid, table_entry_offset};
