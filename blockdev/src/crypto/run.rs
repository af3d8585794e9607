//! [`EncryptedRun`]: encrypted sectors in a container seen as a [`Storage`] of plain bytes, so
//! that the mapping core ([`crate::mapped`]) reads and writes an encrypted format (luks, qcow2's
//! encrypted clusters) as it does a plain one.
//!
//! Invariants: the caller's buffers never hold ciphertext (sectors are decrypted and encrypted in
//! a private buffer of at most [`CHUNK`] bytes); a read may start and end anywhere (the sectors
//! around it are read whole); a write must cover whole [`SECTOR_SIZE`] sectors, which the core
//! guarantees through the format's sector [`Granularity`](crate::mapped::Granularity) and
//! sector-aligned fills. A run opened without a key fails reads and writes with the format's "key
//! required" error, so that block status and `info` still work.

use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

use super::{SectorCipher, SECTOR_SIZE};
use crate::error::{Error, ErrorKind, Result};
use crate::mapped::iov;
use crate::storage::{iov_len, iov_len_mut, Prealloc, Storage};

/// Largest private buffer one request decrypts or encrypts at a time.
const CHUNK: u64 = 1 << 20;

/// A run of encrypted sectors in a container, seen decrypted.
pub struct EncryptedRun {
    data: Arc<dyn Storage>,
    cipher: Option<Arc<SectorCipher>>,
    /// The option naming the key, for the "key required" error (`key-secret`,
    /// `encrypt.key-secret`).
    key_option: &'static str,
    /// What to add (wrapping) to a host offset to get the offset whose sector number the sector
    /// is encrypted under.
    iv_minus_host: u64,
}

impl EncryptedRun {
    /// Sectors of `data` encrypted with `cipher` (`None`: no key was given, named by
    /// `key_option`), the one at host offset `host` under the sector number `iv_offset / 512`.
    ///
    /// ```
    /// use std::io::{IoSlice, IoSliceMut};
    /// use std::sync::Arc;
    /// use blockdev::crypto::{legacy_aes_cipher, EncryptedRun};
    /// use blockdev::{MemStorage, Storage};
    ///
    /// let file: Arc<dyn Storage> = Arc::new(MemStorage::new("disk", vec![0u8; 4096]));
    /// let cipher = Arc::new(legacy_aes_cipher(b"secret").unwrap());
    /// // A payload starting at host 1024, encrypted under sector numbers counted from it.
    /// let run = EncryptedRun::new(file, Some(cipher), "key-secret", 1024, 0);
    /// run.write_at(1024, &[IoSlice::new(&[7u8; 512])]).unwrap();
    /// let mut back = [0u8; 10];
    /// run.read_at(1024 + 100, &mut [IoSliceMut::new(&mut back)]).unwrap();
    /// assert_eq!(back, [7u8; 10]);
    /// ```
    pub fn new(
        data: Arc<dyn Storage>,
        cipher: Option<Arc<SectorCipher>>,
        key_option: &'static str,
        host: u64,
        iv_offset: u64,
    ) -> EncryptedRun {
        EncryptedRun { data, cipher, key_option, iv_minus_host: iv_offset.wrapping_sub(host) }
    }

    fn cipher(&self) -> Result<&SectorCipher> {
        self.cipher.as_deref().ok_or_else(|| {
            Error::new(ErrorKind::NeedsKey, format!("Parameter '{}' is required for cipher", self.key_option))
        })
    }

    /// The sector number the sector at host offset `host` is encrypted under.
    fn sector(&self, host: u64) -> u64 {
        host.wrapping_add(self.iv_minus_host) / SECTOR_SIZE as u64
    }
}

impl std::fmt::Debug for EncryptedRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptedRun").field("data", &self.data.name()).field("key", &self.cipher.is_some()).finish()
    }
}

impl Storage for EncryptedRun {
    fn len(&self) -> Result<u64> {
        self.data.len()
    }

    fn read_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let cipher = self.cipher()?;
        let len = iov_len_mut(bufs);
        let ss = SECTOR_SIZE as u64;
        let end = crate::storage::checked_end(offset, len)?;
        let mut chunk = Vec::new();
        let mut at = offset;
        while at < end {
            let start = at / ss * ss;
            let stop = end.div_ceil(ss).saturating_mul(ss).min(start + CHUNK);
            chunk.resize((stop - start) as usize, 0);
            crate::storage::read_exact_at(self.data.as_ref(), start, &mut chunk)?;
            cipher.decrypt(self.sector(start), &mut chunk)?;
            let upto = end.min(stop);
            iov::copy_into(bufs, at - offset, &chunk[(at - start) as usize..(upto - start) as usize]);
            at = upto;
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        let cipher = self.cipher()?;
        let len = iov_len(bufs);
        let ss = SECTOR_SIZE as u64;
        if offset % ss != 0 || len % ss != 0 {
            return Err(Error::invalid_argument(format!(
                "{}: an encrypted write must cover whole sectors ({len} bytes at {offset})",
                self.data.name()
            )));
        }
        let mut chunk = Vec::with_capacity(len.min(CHUNK) as usize);
        let mut part = Vec::with_capacity(bufs.len());
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            part.clear();
            iov::push_range(bufs, done, n, &mut part);
            // Copied once into the private buffer (no zero fill first).
            chunk.clear();
            part.iter().for_each(|p| chunk.extend_from_slice(p));
            cipher.encrypt(self.sector(offset + done), &mut chunk)?;
            self.data.write_at(offset + done, &[IoSlice::new(&chunk)])?;
            done += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.data.flush()
    }

    fn set_len(&self, _len: u64, _prealloc: Prealloc) -> Result<()> {
        Err(Error::unsupported("an encrypted run cannot be resized"))
    }

    fn reserve(&self, offset: u64, len: u64) {
        self.data.reserve(offset, len);
    }

    /// Never: zeros of an encrypted image are not zero bytes in the container.
    fn zero_without_writing(&self, _offset: u64, _len: u64) -> bool {
        false
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> Result<()> {
        Err(Error::unsupported("zeros of an encrypted image are written as encrypted data"))
    }

    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(Error::unsupported("an encrypted run is not discarded through its plain view"))
    }

    fn data_status(&self, offset: u64, max_len: u64) -> Result<(bool, u64)> {
        self.data.data_status(offset, max_len)
    }

    fn is_read_only(&self) -> bool {
        self.data.is_read_only()
    }

    fn name(&self) -> &str {
        self.data.name()
    }

    fn protocol(&self) -> &'static str {
        self.data.protocol()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::legacy_aes_cipher;
    use crate::MemStorage;

    fn cipher() -> Option<Arc<SectorCipher>> {
        Some(Arc::new(legacy_aes_cipher(b"vdisk").unwrap()))
    }

    #[test]
    fn unaligned_reads_across_chunks_see_plain_bytes_and_the_file_holds_none() {
        let size = 3 * CHUNK as usize;
        let file: Arc<dyn Storage> = Arc::new(MemStorage::new("data", vec![0u8; size + 8192]));
        // Host 4096 is encrypted under guest 65536's sector number.
        let run = EncryptedRun::new(file.clone(), cipher(), "key-secret", 4096, 65536);
        let plain: Vec<u8> = (0..size as u32).map(|i| (i % 251) as u8 + 1).collect();
        let (a, b) = plain.split_at(1000 * 512);
        run.write_at(4096, &[IoSlice::new(a), IoSlice::new(b)]).unwrap();
        let mut stored = vec![0u8; 1024];
        crate::read_exact_at(file.as_ref(), 4096, &mut stored).unwrap();
        assert_ne!(stored, plain[..1024], "the file holds ciphertext");
        let mut back = vec![0u8; size - 700];
        let (x, y) = back.split_at_mut(300);
        run.read_at(4096 + 100, &mut [IoSliceMut::new(x), IoSliceMut::new(y)]).unwrap();
        assert!(back == plain[100..size - 600], "bytes read back differ");
        // The same bytes seen under another sector number decrypt to something else.
        let elsewhere = EncryptedRun::new(file, cipher(), "key-secret", 4096, 0);
        let mut other = vec![0u8; 512];
        elsewhere.read_at(4096, &mut [IoSliceMut::new(&mut other)]).unwrap();
        assert_ne!(other, plain[..512]);
    }

    #[test]
    fn partial_sector_writes_are_refused_and_no_key_means_no_data() {
        let file: Arc<dyn Storage> = Arc::new(MemStorage::new("data", vec![0u8; 4096]));
        let run = EncryptedRun::new(file.clone(), cipher(), "key-secret", 0, 0);
        assert!(run.write_at(100, &[IoSlice::new(&[1u8; 512])]).is_err());
        assert!(run.write_at(0, &[IoSlice::new(&[1u8; 100])]).is_err());
        assert!(!run.zero_without_writing(0, 4096));
        let locked = EncryptedRun::new(file, None, "encrypt.key-secret", 0, 0);
        let e = locked.read_at(0, &mut [IoSliceMut::new(&mut [0u8; 512])]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NeedsKey);
        assert_eq!(e.message(), "Parameter 'encrypt.key-secret' is required for cipher");
        assert!(locked.write_at(0, &[IoSlice::new(&[0u8; 512])]).is_err());
        assert_eq!(locked.data_status(0, 4096).unwrap().1, 4096);
    }
}
