//! `amend`: changing compat level, refcount width, lazy refcounts, size and data-file options of an
//! existing image, in qemu's order (upgrade first, downgrade last) and with qemu's messages.
//!
//! Downgrading to version 2 turns zero clusters into something version 2 can express (unallocated
//! where no backing file would show through, allocated zeroed clusters otherwise) before the
//! header changes version. Changing the refcount width rewrites the whole refcount structure
//! (`rebuild.rs`) with the same counts.
//!
//! `encrypt.*` options manage the key slots of a LUKS-encrypted image (after any upgrade, before
//! the other changes, as qemu orders them); see `blockdev::crypto::keyslots`.

use blockdev::options::{CreateOptions, OptionKind, OptionSpec};
use blockdev::{Amend, Error, ResizeOptions, Result};

use crate::crypt::Scheme;
use crate::driver::Qcow2;
use crate::entry::{COPIED, OFFSET_MASK, ZERO};
use crate::header::{autoclear, compat, incompat};

/// qcow2's amend options, in qemu's order.
pub const AMEND_OPTIONS: &[OptionSpec] = &[
    OptionSpec::new("encrypt.state", OptionKind::Str, "Select new state of affected keyslots (active/inactive)"),
    OptionSpec::new("encrypt.keyslot", OptionKind::Number, "Select a single keyslot to modify explicitly"),
    OptionSpec::new("encrypt.old-secret", OptionKind::Str, "Select all keyslots that match this password"),
    OptionSpec::new(
        "encrypt.new-secret",
        OptionKind::Str,
        "New secret to set in the matching keyslots. Empty string to erase",
    ),
    OptionSpec::new("encrypt.iter-time", OptionKind::Number, "Time to spend in PBKDF in milliseconds"),
    OptionSpec::new("size", OptionKind::Size, "Virtual disk size"),
    OptionSpec::new("compat", OptionKind::Str, "Compatibility level (v2 [0.10] or v3 [1.1])"),
    OptionSpec::new("backing_file", OptionKind::Str, "File name of a base image"),
    OptionSpec::new("backing_fmt", OptionKind::Str, "Image format of the base image"),
    OptionSpec::new("data_file", OptionKind::Str, "File name of an external data file"),
    OptionSpec::new("data_file_raw", OptionKind::Bool, "The external data file must stay valid as a raw image"),
    OptionSpec::with_default("lazy_refcounts", OptionKind::Bool, "Postpone refcount updates", "off"),
    OptionSpec::with_default("refcount_bits", OptionKind::Number, "Width of a reference count entry in bits", "16"),
];

impl Amend for Qcow2 {
    fn amend_options(&self) -> &'static [OptionSpec] {
        AMEND_OPTIONS
    }

    fn amend(&self, opts: &CreateOptions, force: bool, progress: &mut dyn FnMut(f32)) -> Result<()> {
        self.check_writable()?;
        let bad = |m: &str| Error::invalid_argument(m.to_string());
        let (old_version, old_order, lazy_now, raw_now, has_data_file) = {
            let m = self.lock();
            (
                m.h.version,
                m.h.refcount_order,
                m.h.compatible & compat::LAZY_REFCOUNTS != 0,
                m.h.autoclear & autoclear::DATA_FILE_RAW != 0,
                m.h.incompatible & incompat::DATA_FILE != 0,
            )
        };
        let mut new_version = old_version;
        if let Some(c) = opts.get("compat") {
            new_version = match c {
                "0.10" | "v2" => 2,
                "1.1" | "v3" => 3,
                _ => return Err(bad(&format!("Unknown compatibility level {c}"))),
            };
        }
        let luks = match &self.crypt_scheme {
            _ if !opts.entries().iter().any(|(k, _)| k.starts_with("encrypt.")) => None,
            None => return Err(bad("Can't amend encryption options - encryption not present")),
            Some(Scheme::Aes) => return Err(Error::unsupported("Only LUKS encryption options can be amended")),
            Some(Scheme::Luks(area)) => Some(area),
        };
        let lazy = opts.get_bool("lazy_refcounts")?.unwrap_or(lazy_now);
        let mut order = old_order;
        if let Some(bits) = opts.get_number("refcount_bits")? {
            if bits == 0 || bits > 64 || !bits.is_power_of_two() {
                return Err(bad("Refcount width must be a power of two and may not exceed 64 bits"));
            }
            order = bits.trailing_zeros();
        }
        let data_file = opts.get("data_file");
        if data_file.is_some() && !has_data_file {
            return Err(bad("data-file can only be set for images that use an external data file"));
        }
        let data_file_raw = opts.get_bool("data_file_raw")?.unwrap_or(raw_now);
        if data_file_raw && !raw_now {
            return Err(bad("data-file-raw cannot be set on existing images"));
        }
        if new_version > old_version {
            self.upgrade()?;
        }
        if let Some(area) = luks {
            area.amend_keyslots(self.file.as_ref(), opts, force)?;
        }
        if order != old_order {
            if new_version < 3 && order != 4 {
                return Err(bad("Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)"));
            }
            self.change_refcount_order(order)?;
        }
        {
            let mut m = self.lock();
            let io = self.file.as_ref();
            if data_file_raw {
                m.h.autoclear |= autoclear::DATA_FILE_RAW;
            } else {
                m.h.autoclear &= !autoclear::DATA_FILE_RAW;
            }
            if let Some(d) = data_file {
                m.exts.data_file = if d.is_empty() { None } else { Some(d.to_string()) };
            }
            m.write_header(io, true)?;
            io.flush()?;
            let bf = opts.get("backing_file");
            let bfmt = opts.get("backing_fmt");
            if (bf.is_some() || bfmt.is_some())
                && (bf != m.exts.backing_file.as_deref() || bfmt != m.exts.backing_format.as_deref())
            {
                return Err(bad("Cannot amend the backing file\nYou can use 'qemu-img rebase' instead."));
            }
        }
        if lazy != lazy_now {
            if lazy && new_version < 3 {
                return Err(bad(
                    "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
                ));
            }
            self.set_lazy_refcounts(lazy)?;
        }
        if let Some(size) = opts.get_size("size")? {
            if size != 0 && size != blockdev::BlockDriver::size(self) {
                self.resize_image(size, &ResizeOptions { allow_shrink: true, ..ResizeOptions::default() })?;
            }
        }
        if new_version < old_version {
            self.downgrade(progress)?;
        }
        Ok(())
    }
}

impl Qcow2 {
    fn upgrade(&self) -> Result<()> {
        let mut m = self.lock();
        let io = self.file.as_ref();
        // Version 3 entries must record the VM state and disk sizes: rewrite the table (every
        // entry is written with the full known extra data) before the header says version 3.
        let min = crate::snapshot::V3_MIN_EXTRA_SIZE;
        if m.snapshots.iter().any(|sn| sn.extra_data_size < min) {
            let entries = m.snapshots.clone();
            m.write_snapshot_table(io, entries).map_err(|e| e.prefixed("Failed to update the snapshot table"))?;
            m.flush(io)?;
        }
        m.h.version = 3;
        m.write_header(self.file.as_ref(), true)?;
        self.file.flush()
    }

    fn change_refcount_order(&self, order: u32) -> Result<()> {
        let mut m = self.lock();
        let io = self.file.as_ref();
        m.flush(io)?;
        let end = m.rc.end_of_used(io)?;
        let mut counts = Vec::with_capacity(end as usize);
        for c in 0..end {
            counts.push(m.rc.get(io, c)?);
        }
        // The old structure's clusters stop being metadata once the new one is in force.
        let old: Vec<u64> = m.rc.table.iter().map(|e| e & OFFSET_MASK).filter(|o| *o != 0).collect();
        let old_table = (m.rc.table_offset, m.rc.table_clusters);
        let cs = m.cluster_size();
        for o in old.iter().copied().chain((0..old_table.1).map(|i| old_table.0 + i * cs)) {
            if let Some(c) = counts.get_mut((o / cs) as usize) {
                *c = c.saturating_sub(1);
            }
        }
        m.install_refcounts(io, counts, order)
    }

    fn set_lazy_refcounts(&self, on: bool) -> Result<()> {
        let mut m = self.lock();
        let io = self.file.as_ref();
        if on {
            m.h.compatible |= compat::LAZY_REFCOUNTS;
            m.lazy = true;
        } else {
            // Make the image clean first.
            m.flush(io)?;
            m.flush(io)?;
            m.h.incompatible &= !incompat::DIRTY;
            m.dirty_on_disk = false;
            m.h.compatible &= !compat::LAZY_REFCOUNTS;
            m.lazy = false;
        }
        m.write_header(io, false)?;
        io.flush()
    }

    fn downgrade(&self, progress: &mut dyn FnMut(f32)) -> Result<()> {
        {
            let m = self.lock();
            let bad = |msg: &str| Err(Error::unsupported(msg.to_string()));
            if m.h.refcount_order != 4 {
                return bad("compat=0.10 requires refcount_bits=16");
            }
            if m.h.incompatible & incompat::DATA_FILE != 0 {
                return bad("Cannot downgrade an image with a data file");
            }
            // Version 2 readers would not know a snapshot's own disk size or a VM state over
            // 32 bits.
            let size = blockdev::BlockDriver::size(self);
            if m.snapshots.iter().any(|sn| sn.vm_state_size > u32::MAX as u64 || sn.disk_size != size) {
                return bad("Internal snapshots prevent downgrade of image");
            }
        }
        {
            let mut m = self.lock();
            let io = self.file.as_ref();
            if m.h.incompatible & incompat::DIRTY != 0 {
                m.flush(io)?;
                m.h.incompatible &= !incompat::DIRTY;
                m.dirty_on_disk = false;
                m.write_header(io, false)?;
                io.flush()?;
            }
            let other = m.h.incompatible & !incompat::COMPRESSION;
            if other != 0 {
                return Err(Error::unsupported(format!(
                    "Cannot downgrade an image with incompatible features {other:#x} set"
                )));
            }
            // Version 2 has no autoclear bits to vouch for bitmaps: they go, clusters and all.
            self.drop_bitmaps(&mut m)?;
            m.h.compatible = 0;
            m.h.autoclear = 0;
            m.lazy = false;
        }
        self.expand_zero_clusters(progress).map_err(|e| e.prefixed("Failed to turn zero into data clusters"))?;
        let mut m = self.lock();
        let io = self.file.as_ref();
        if m.h.incompatible & incompat::COMPRESSION != 0 {
            if self.has_compressed_clusters(&mut m)? {
                return Err(Error::unsupported(
                    "Cannot downgrade an image with zstd compression type and existing compressed clusters",
                ));
            }
            m.h.incompatible &= !incompat::COMPRESSION;
            m.h.compression_type = 0;
        }
        m.flush(io)?;
        m.h.version = 2;
        m.h.unknown_fields.clear();
        m.write_header(io, true)?;
        io.flush()
    }

    /// Replaces zero clusters (which version 2 cannot express) in the active L1 table and in
    /// every snapshot's. L2 tables are changed in place, shared ones too: every table that
    /// refers to them sees the same change, a zero-filled cluster in place of a zero flag (a new
    /// cluster gets one reference per table referring to the L2 table).
    fn expand_zero_clusters(&self, progress: &mut dyn FnMut(f32)) -> Result<()> {
        let (active, snapshots) = {
            let m = self.lock();
            (m.l1.clone(), m.snapshots.clone())
        };
        let cs = self.cluster_size();
        let mut tables = vec![active];
        for sn in &snapshots {
            tables.push(crate::snapshot::read_l1(self.file.as_ref(), sn, cs, 0)?);
        }
        let total: usize = tables.iter().map(Vec::len).sum();
        let mut done = 0usize;
        for l1 in &tables {
            for (index, &l1_entry) in l1.iter().enumerate() {
                // Reported as each L1 entry is entered, after the first: the caller has printed
                // 0% and prints 100% at the end, as qemu-img does.
                if done > 0 {
                    progress(done as f32 / total as f32);
                }
                done += 1;
                let l2_off = l1_entry & OFFSET_MASK;
                if l2_off != 0 {
                    self.expand_zero_clusters_in(l2_off, index as u64 * self.geo.l2_coverage())?;
                }
            }
        }
        self.lock().flush(self.file.as_ref())?;
        progress(1.0);
        Ok(())
    }

    /// Expands the zero clusters of the L2 table at `l2_off`, which maps guest offsets from
    /// `first_guest` on.
    fn expand_zero_clusters_in(&self, l2_off: u64, first_guest: u64) -> Result<()> {
        let cs = self.cluster_size();
        let mut m = self.lock();
        let io = self.file.as_ref();
        if l2_off % cs != 0 {
            return Err(m.corruption(io, true, format!("L2 table offset {l2_off:#x} unaligned")));
        }
        let l2_refs = m.rc.get(io, l2_off / cs)?;
        m.load_l2(io, l2_off)?;
        let table = m.l2.peek(l2_off).map(<[u8]>::to_vec).unwrap_or_default();
        for j in 0..self.geo.l2_entries() as usize {
            let e = crate::cache::get_u64(&table, j);
            if e & ZERO == 0 || e & crate::entry::COMPRESSED != 0 {
                continue;
            }
            let host = e & OFFSET_MASK;
            let new = if host == 0 && self.backing.is_none() {
                0
            } else {
                let host = if host == 0 {
                    let h = m.alloc(io, 1)?;
                    if l2_refs > 1 {
                        m.rc.update(io, h / cs, l2_refs as i64 - 1)?;
                    }
                    h
                } else {
                    host
                };
                if let Some(what) = m.overlaps_metadata(host, cs) {
                    let msg = format!("Preventing invalid write on metadata (overlaps with {what})");
                    return Err(m.corruption(io, true, msg));
                }
                match &self.cipher {
                    // Zeros of an encrypted image are stored encrypted.
                    Some(c) => {
                        let mut zeros = vec![0u8; cs as usize];
                        c.encrypt(host, first_guest + j as u64 * cs, &mut zeros)?;
                        blockdev::write_all_at(self.data.as_ref(), host, &zeros)?;
                    }
                    None => self.data.write_zeroes(host, cs, false)?,
                }
                if m.rc.get(io, host / cs)? == 1 {
                    host | COPIED
                } else {
                    host
                }
            };
            if let Some(t) = m.l2.get_mut(l2_off) {
                crate::cache::set_u64(t, j, new);
            }
        }
        Ok(())
    }

    fn has_compressed_clusters(&self, m: &mut crate::meta::Meta) -> Result<bool> {
        let io = self.file.as_ref();
        let entries = self.geo.l2_entries();
        for i in 0..m.l1.len() {
            if m.l1[i] & OFFSET_MASK == 0 {
                continue;
            }
            for j in 0..entries {
                let (e, _) = m.entry(io, i as u64 * entries + j)?;
                if e & crate::entry::COMPRESSED != 0 {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
}
