//! Disk encryption: the sector ciphers LUKS names (AES-128/192/256 in XTS, CBC or ECB mode with
//! plain, plain64 or ESSIV IVs), LUKS1 headers and key slots (PBKDF2-HMAC, anti-forensic
//! splitting), and qcow2's legacy AES scheme.
//!
//! Invariants:
//! - keys, passphrases and everything derived from them live in [`zeroize::Zeroizing`] buffers
//!   or in cipher states that zeroize themselves when dropped;
//! - key digests are compared in constant time;
//! - a header is validated against the area it lives in before anything is read or allocated
//!   through it ([`luks::LuksHeader::parse`]), and PBKDF2 iteration counts from images are
//!   bounded ([`luks::MAX_ITERATIONS`]);
//! - the sector number a sector is encrypted under is the caller's: LUKS volumes count from the
//!   payload start, qcow2 LUKS uses the host offset / 512, legacy qcow2 AES the guest offset / 512.

pub mod af;
mod cipher;
mod hash;
pub mod keyslots;
pub mod luks;
mod random;
mod run;
pub mod volume;

pub use cipher::{CipherAlg, CipherMode, IvGen, SectorCipher, SECTOR_SIZE};
pub use hash::HashAlg;
pub use random::fill as fill_random;
pub use run::EncryptedRun;

use std::sync::Arc;

use zeroize::Zeroizing;

use crate::{Error, Result};

/// A passphrase or key given by the user (qemu's `secret` objects): cheap to clone, zeroized
/// when the last clone is dropped, never printed.
#[derive(Clone)]
pub struct Secret(Arc<Zeroizing<Vec<u8>>>);

impl Secret {
    /// Wraps `bytes`.
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(Arc::new(Zeroizing::new(bytes)))
    }

    /// The secret's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// The secret as a passphrase: itself if it is UTF-8 text, as qemu requires of passphrases,
    /// else qemu's error naming the secret `id`.
    pub fn passphrase(&self, id: &str) -> Result<Secret> {
        match std::str::from_utf8(self.bytes()) {
            Ok(_) => Ok(self.clone()),
            Err(_) => Err(Error::invalid_argument(format!("Data from secret {id} is not valid UTF-8"))),
        }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// qcow2's legacy AES encryption (`encrypt.format=aes`): AES-128-CBC with plain64 IVs of the
/// guest sector, keyed by the passphrase's first 16 bytes (zero-padded when shorter).
pub fn legacy_aes_cipher(passphrase: &[u8]) -> Result<SectorCipher> {
    if passphrase.is_empty() {
        return Err(Error::invalid_argument("the qcow AES key must not be empty"));
    }
    let mut key = Zeroizing::new([0u8; 16]);
    let n = passphrase.len().min(16);
    key[..n].copy_from_slice(&passphrase[..n]);
    SectorCipher::new(CipherAlg::Aes128, CipherMode::Cbc, IvGen::Plain64, &key[..])
}

#[cfg(test)]
mod tests;
