//! The `luks` format: a LUKS1 volume in a file (qemu-img's `-f luks`).
//!
//! The header and the key slots' material take the first `payload_offset` sectors; the guest disk
//! is the rest of the file, each 512-byte sector encrypted with the volume key under its number
//! counted from the payload start. Without a passphrase the image opens for metadata only (`info`,
//! with [`OpenOptions::no_io`]); opening for data needs `key_secret`.
//!
//! The driver runs on the mapping core (`blockdev::mapped`): the payload is one identity mapping
//! seen through [`EncryptedRun`], which decrypts and encrypts private copies (data never leaves
//! in the clear and the caller's buffers are never encrypted in place). The core widens a request
//! that does not cover whole sectors to them (reading, patching and re-encrypting the sectors it
//! touches) under its sector lock, so two such writes into one sector cannot lose each other's
//! bytes.

use std::sync::Arc;

use blockdev::crypto::keyslots::SlotEditor;
use blockdev::crypto::luks::{LuksHeader, HEADER_LEN};
use blockdev::crypto::volume::{header_area_len, luks_create_options, luks_info, read_header, unlock};
use blockdev::crypto::{EncryptedRun, Secret, SECTOR_SIZE};
use blockdev::info::ImageInfo;
use blockdev::mapped::{DataWritten, Granularity, Holes, Mapped, MappedImage, Mapping, WritePlan};
use blockdev::options::{CreateOptions, OptionKind, OptionSpec};
use blockdev::{
    check_request, delete_on_error, Amend, Chain, Error, ErrorKind, Extent, Format, Measure, OpenOptions, Opener,
    Prealloc, ResizeOptions, Result, Storage,
};

use crate::storage_info;

/// The `luks` format's registry entry.
#[derive(Debug, Default)]
pub struct LuksFormat;

/// qemu-img's `-o` options for `create -f luks`, in its order.
const CREATE_OPTIONS: &[OptionSpec] = &[
    OptionSpec::new("size", OptionKind::Size, "Virtual disk size"),
    OptionSpec::new("key-secret", OptionKind::Str, "ID of the secret that provides the keyslot passphrase"),
    OptionSpec::new("cipher-alg", OptionKind::Str, "Name of encryption cipher algorithm"),
    OptionSpec::new("cipher-mode", OptionKind::Str, "Name of encryption cipher mode"),
    OptionSpec::new("ivgen-alg", OptionKind::Str, "Name of IV generator algorithm"),
    OptionSpec::new("ivgen-hash-alg", OptionKind::Str, "Name of IV generator hash algorithm"),
    OptionSpec::new("hash-alg", OptionKind::Str, "Name of encryption hash algorithm"),
    OptionSpec::new("iter-time", OptionKind::Number, "Time to spend in PBKDF in milliseconds"),
    OptionSpec::new("detached-header", OptionKind::Bool, "Create a detached LUKS header"),
];

/// qemu-img's `-o` options for `amend -f luks`, in its order.
const AMEND_OPTIONS: &[OptionSpec] = &[
    OptionSpec::new("state", OptionKind::Str, "Select new state of affected keyslots (active/inactive)"),
    OptionSpec::new("keyslot", OptionKind::Number, "Select a single keyslot to modify explicitly"),
    OptionSpec::new("old-secret", OptionKind::Str, "Select all keyslots that match this password"),
    OptionSpec::new("new-secret", OptionKind::Str, "New secret to set in the matching keyslots. Empty string to erase"),
    OptionSpec::new("iter-time", OptionKind::Number, "Time to spend in PBKDF in milliseconds"),
];

impl Format for LuksFormat {
    fn name(&self) -> &'static str {
        "luks"
    }

    fn amend_options(&self) -> Option<&'static [OptionSpec]> {
        Some(AMEND_OPTIONS)
    }

    fn probe(&self, head: &[u8], _filename: &str) -> u32 {
        if head.len() >= 8 && head[..6] == *b"LUKS\xba\xbe" && head[6..8] == [0, 1] {
            100
        } else {
            0
        }
    }

    fn open(
        &self,
        storage: Arc<dyn Storage>,
        opts: &OpenOptions,
        _chain: &Chain,
        _opener: &dyn Opener,
    ) -> Result<Arc<dyn blockdev::BlockDriver>> {
        Ok(Arc::new(LuksDriver::open(storage, opts)?))
    }

    fn create_options(&self) -> &'static [OptionSpec] {
        CREATE_OPTIONS
    }

    /// As qemu: the file is created first, and removed again if the volume cannot be made in it
    /// (no key, a key that is not UTF-8, unsupported parameters).
    fn create(&self, filename: &str, opts: &CreateOptions, opener: &dyn Opener) -> Result<()> {
        if opts.get_bool("detached-header")?.unwrap_or(false) {
            return Err(Error::unsupported("Detached LUKS headers are not supported by this version of vdisk"));
        }
        let size = opts.get_size("size")?.unwrap_or(0);
        let mut file_opts = opts.clone();
        file_opts.set("size", "0");
        let storage = opener.create_storage(filename, &file_opts)?;
        delete_on_error(opener, filename, || {
            let secret = opts.secret("key-secret")?.ok_or_else(key_required)?;
            let volume = luks_create_options(opts, "")?.create(secret.bytes())?;
            blockdev::write_all_at(storage.as_ref(), 0, &volume.area)?;
            let total = (volume.area.len() as u64)
                .checked_add(size.next_multiple_of(SECTOR_SIZE as u64))
                .ok_or_else(|| Error::out_of_range("Image size too large"))?;
            storage.set_len(total, Prealloc::Off)?;
            storage.flush()
        })
    }

    fn measure(&self, size: u64, source: Option<&dyn blockdev::BlockDriver>, opts: &CreateOptions) -> Result<Measure> {
        // qemu measures with the volume it would create, which needs the passphrase.
        if opts.secret("key-secret")?.is_none() {
            return Err(key_required());
        }
        let spec = luks_create_options(opts, "")?.spec;
        let size = source.map(|s| s.size()).unwrap_or(size).next_multiple_of(SECTOR_SIZE as u64);
        let required = header_area_len(&spec) + size;
        Ok(Measure { required, fully_allocated: required, bitmaps: None })
    }
}

/// qemu's error for data access without the passphrase.
fn key_required() -> Error {
    Error::new(ErrorKind::NeedsKey, "Parameter 'key-secret' is required for cipher")
}

/// An open `luks` image.
pub struct LuksDriver {
    storage: Arc<dyn Storage>,
    /// The header as on disk (`amend` changes its key slots).
    header: std::sync::Mutex<LuksHeader>,
    /// The payload as plain bytes (reads and writes fail without a key: metadata only).
    payload_run: Arc<dyn Storage>,
    /// Whether a key unlocked the volume.
    unlocked: bool,
    /// The passphrase that unlocked the volume (adding a key slot needs the volume key again).
    opened_with: Option<Secret>,
    payload: u64,
    size: std::sync::atomic::AtomicU64,
    read_only: bool,
    /// Writes cover whole sectors (the core's read-modify-write and sector lock).
    sectors: Granularity,
}

impl std::fmt::Debug for LuksDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LuksDriver").field("storage", &self.storage.name()).field("payload", &self.payload).finish()
    }
}

impl LuksDriver {
    /// Opens the LUKS volume in `storage`: unlocked with `opts.key_secret`, or for metadata only
    /// when `opts.no_io` is set and no key is given.
    pub fn open(storage: Arc<dyn Storage>, opts: &OpenOptions) -> Result<LuksDriver> {
        let file_len = storage.len()?;
        let header = read_header(storage.as_ref(), 0, file_len)?;
        let payload = header.payload_offset as u64 * SECTOR_SIZE as u64;
        if payload < HEADER_LEN as u64 || payload > file_len {
            return Err(Error::invalid_image(format!(
                "LUKS payload offset {payload} is outside the file of {file_len} bytes"
            )));
        }
        for i in 0..header.slots.len() {
            if header.material_range(i).end > payload {
                return Err(Error::invalid_image(format!("Keyslot {i} is overlapping with the encrypted payload")));
            }
        }
        let cipher = match &opts.key_secret {
            Some(secret) => Some(unlock(storage.as_ref(), 0, &header, secret.bytes())?),
            None if opts.no_io => None,
            None => return Err(key_required()),
        };
        let size = (file_len - payload) / SECTOR_SIZE as u64 * SECTOR_SIZE as u64;
        let unlocked = cipher.is_some();
        // Sectors are encrypted under their number counted from the payload start.
        let payload_run = Arc::new(EncryptedRun::new(storage.clone(), cipher.map(Arc::new), "key-secret", payload, 0));
        Ok(LuksDriver {
            read_only: opts.read_only || storage.is_read_only(),
            storage,
            header: std::sync::Mutex::new(header),
            payload_run,
            unlocked,
            opened_with: opts.key_secret.clone(),
            payload,
            size: std::sync::atomic::AtomicU64::new(size),
            sectors: Granularity::new(SECTOR_SIZE as u64),
        })
    }

    /// The header as it is on disk now.
    pub fn header(&self) -> LuksHeader {
        self.header.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only().with_path(self.storage.name()));
        }
        Ok(())
    }
}

impl MappedImage for LuksDriver {
    type Pending<'a> = ();

    fn map(&self, offset: u64, max_len: u64) -> Result<Mapped> {
        let storage = self.payload_run.clone();
        Ok(Mapped::new(max_len, Mapping::Data { storage, offset: self.payload + offset, holes: Holes::Ignored }))
    }

    fn prepare_write(&self, offset: u64, len: u64) -> Result<WritePlan<()>> {
        let storage = self.payload_run.clone();
        Ok(WritePlan { len, storage, host: self.payload + offset, fill: None, pending: () })
    }

    fn commit_write(&self, _pending: (), _written: DataWritten) -> Result<()> {
        Ok(())
    }

    fn before_write(&self) -> Result<()> {
        if !self.unlocked {
            return Err(key_required());
        }
        Ok(())
    }

    fn granularity(&self) -> Option<&Granularity> {
        Some(&self.sectors)
    }
}

impl blockdev::BlockDriver for LuksDriver {
    fn format(&self) -> &'static str {
        "luks"
    }

    fn size(&self) -> u64 {
        self.size.load(std::sync::atomic::Ordering::Acquire)
    }

    fn filename(&self) -> &str {
        self.storage.name()
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    // Zeros are written encrypted (a hole would read back as garbage): the core's fallback.
    blockdev::mapped_io!(read_at, write_at, write_zeroes);

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        check_request(offset, len, self.size())?;
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.storage.flush()
    }

    fn block_status(&self, offset: u64, max_len: u64) -> Result<Extent> {
        // All data; ciphertext has no plain bytes in the file to point at (qemu gives no offsets).
        let extent = blockdev::mapped::block_status(self, offset, max_len)?;
        Ok(Extent { host: None, ..extent })
    }

    fn resize(&self, new_size: u64, opts: &ResizeOptions) -> Result<()> {
        self.writable()?;
        if opts.prealloc != Prealloc::Off {
            return Err(Error::unsupported("Unsupported preallocation mode for luks images"));
        }
        let new_size = new_size.next_multiple_of(SECTOR_SIZE as u64);
        self.storage.set_len(self.payload + new_size, Prealloc::Off)?;
        self.size.store(new_size, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    fn info(&self) -> Result<ImageInfo> {
        let file = storage_info(self.storage.as_ref())?;
        Ok(ImageInfo {
            filename: self.storage.name().to_string(),
            format: "luks".into(),
            dirty_flag: Some(false),
            actual_size: file.actual_size,
            virtual_size: self.size(),
            encrypted: Some(true),
            format_specific: Some(("luks".into(), luks_info(&self.header()))),
            children: vec![("file".into(), file)],
            ..ImageInfo::default()
        })
    }

    fn storage(&self) -> Option<Arc<dyn Storage>> {
        Some(self.storage.clone())
    }

    fn has_zero_init(&self) -> bool {
        false
    }

    fn amend(&self) -> Option<&dyn Amend> {
        Some(self)
    }
}

impl Amend for LuksDriver {
    fn amend_options(&self) -> &'static [OptionSpec] {
        AMEND_OPTIONS
    }

    /// Key-slot management (the only thing `amend` changes in a LUKS volume).
    fn amend(&self, opts: &CreateOptions, force: bool, _progress: &mut dyn FnMut(f32)) -> Result<()> {
        self.writable()?;
        let editor = SlotEditor { storage: self.storage.as_ref(), base: 0, opened_with: self.opened_with.as_ref() };
        let mut header = self.header.lock().unwrap_or_else(|p| p.into_inner());
        editor.amend(&mut header, opts, "", force)
    }
}
