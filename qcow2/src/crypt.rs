//! Encrypted qcow2 images.
//!
//! - LUKS (`crypt_method` 2): a LUKS1 area inside the image file, located by the 0x0537BE77
//!   header extension (cluster-aligned offset, length); guest data sectors are encrypted under
//!   their **host** offset / 512.
//! - Legacy AES (`crypt_method` 1): AES-128-CBC keyed by the passphrase itself, IVs from the
//!   **guest** offset / 512. Read to get data out; created only on explicit request.
//!
//! Only guest data clusters are encrypted; metadata never is, and neither are compressed clusters
//! (qemu refuses to write them into encrypted images and reads them as stored). Decryption and
//! encryption work on whole 512-byte sectors in private buffers: the caller's memory never holds
//! ciphertext. A guest write that does not cover whole sectors is widened to them, reading the
//! rest of each sector first, under the mapping core's sector lock; the core reads and writes
//! the data file through [`blockdev::crypto::EncryptedRun`], plain bytes one run at a time.
//!
//! Without a key an encrypted image opens only with `no_io` (for `info`); opening it for data
//! fails with qemu's "Parameter 'encrypt.key-secret' is required for cipher".

use std::sync::{Arc, Mutex, MutexGuard};

use blockdev::crypto::keyslots::SlotEditor;
use blockdev::crypto::luks::LuksHeader;
use blockdev::crypto::{legacy_aes_cipher, volume, EncryptedRun, Secret, SectorCipher, SECTOR_SIZE};
use blockdev::options::CreateOptions;
use blockdev::qobject::{Dict, Value};
use blockdev::{Error, ErrorKind, OpenOptions, Result, Storage};

use crate::header::{Extensions, Header};

/// `crypt_method` values.
pub const CRYPT_NONE: u32 = 0;
/// Legacy AES.
pub const CRYPT_AES: u32 = 1;
/// LUKS.
pub const CRYPT_LUKS: u32 = 2;

/// How an open image is encrypted, for `info` and `amend`.
#[derive(Debug)]
pub(crate) enum Scheme {
    /// Legacy AES.
    Aes,
    /// LUKS.
    Luks(Box<LuksArea>),
}

/// The LUKS area of an open image.
#[derive(Debug)]
pub(crate) struct LuksArea {
    /// Its offset in the image file.
    base: u64,
    /// The header as on disk (`amend` changes its key slots).
    header: Mutex<LuksHeader>,
    /// The passphrase that unlocked the volume (adding a key slot needs the volume key again).
    opened_with: Option<Secret>,
}

impl LuksArea {
    fn header(&self) -> MutexGuard<'_, LuksHeader> {
        self.header.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `amend`'s `encrypt.*` key-slot options (see [`SlotEditor`]).
    pub(crate) fn amend_keyslots(&self, file: &dyn Storage, opts: &CreateOptions, force: bool) -> Result<()> {
        let editor = SlotEditor { storage: file, base: self.base, opened_with: self.opened_with.as_ref() };
        editor.amend(&mut self.header(), opts, "encrypt.", force)
    }
}

/// The key to an open image's data.
pub(crate) struct DataCipher {
    cipher: Arc<SectorCipher>,
    /// IVs from host offsets (LUKS) rather than guest offsets (legacy AES).
    physical: bool,
}

impl DataCipher {
    fn sector(&self, host: u64, guest: u64) -> u64 {
        (if self.physical { host } else { guest }) / SECTOR_SIZE as u64
    }

    /// Encrypts `buf` (whole sectors) to be written at host offset `host`, guest offset `guest`.
    pub(crate) fn encrypt(&self, host: u64, guest: u64, buf: &mut [u8]) -> Result<()> {
        self.cipher.encrypt(self.sector(host, guest), buf)
    }
}

/// The data file seen as plain bytes around host offset `host`, which holds guest offset `guest`
/// (sectors encrypted under the host or the guest offset, as the scheme says; without a key,
/// reads and writes fail with [`key_required`]'s message).
pub(crate) fn data_run(cipher: Option<&DataCipher>, data: Arc<dyn Storage>, host: u64, guest: u64) -> EncryptedRun {
    let iv = match cipher {
        Some(c) if !c.physical => guest,
        _ => host,
    };
    EncryptedRun::new(data, cipher.map(|c| c.cipher.clone()), "encrypt.key-secret", host, iv)
}

/// The message qemu gives when an encrypted image is opened for data without a key.
pub(crate) fn key_required() -> Error {
    Error::new(ErrorKind::NeedsKey, "Parameter 'encrypt.key-secret' is required for cipher")
}

/// Reads the image's encryption from its header: the scheme (for `info`) and, when a key is
/// given, the data cipher. Errors as qemu's for a missing LUKS area, a missing or wrong key.
pub(crate) fn open(
    h: &Header,
    exts: &Extensions,
    file: &dyn Storage,
    opts: &OpenOptions,
) -> Result<(Option<Scheme>, Option<DataCipher>)> {
    let secret = opts.key_secret.as_ref();
    match h.crypt_method {
        CRYPT_NONE => Ok((None, None)),
        CRYPT_AES => {
            let cipher = match secret {
                Some(s) => Some(DataCipher { cipher: Arc::new(legacy_aes_cipher(s.bytes())?), physical: false }),
                None if opts.no_io => None,
                None => return Err(key_required()),
            };
            Ok((Some(Scheme::Aes), cipher))
        }
        CRYPT_LUKS => {
            let (offset, length) = exts
                .crypto
                .ok_or_else(|| Error::invalid_image(format!("Missing CRYPTO header for crypt method {CRYPT_LUKS}")))?;
            let file_len = file.len()?;
            if offset.checked_add(length).is_none_or(|end| end > file_len) {
                return Err(Error::invalid_image("CRYPTO header extension points past the end of the file"));
            }
            let header = volume::read_header(file, offset, length)?;
            let cipher = match secret {
                Some(s) => Some(DataCipher {
                    cipher: Arc::new(volume::unlock(file, offset, &header, s.bytes())?),
                    physical: true,
                }),
                None if opts.no_io => None,
                None => return Err(key_required()),
            };
            let area = LuksArea { base: offset, header: Mutex::new(header), opened_with: secret.cloned() };
            Ok((Some(Scheme::Luks(Box::new(area))), cipher))
        }
        n => Err(Error::invalid_image(format!("Unsupported encryption method: {n}"))),
    }
}

/// The `encrypt` entry of qcow2's `info` block.
pub(crate) fn info(scheme: &Scheme) -> Value {
    match scheme {
        Scheme::Aes => {
            let mut d = Dict::new();
            d.insert("format", "aes".into());
            Value::Dict(d)
        }
        Scheme::Luks(area) => {
            let h = area.header();
            // The union's discriminator comes first, as qemu's visitor inserts it.
            let mut d = Dict::new();
            d.insert("format", "luks".into());
            d.0.extend(volume::luks_info(&h).0);
            Value::Dict(d)
        }
    }
}
