//! LUKS1 volume headers: parsing and validating them, unlocking a key slot with a passphrase,
//! creating a volume key with its first slot, and adding or erasing slots.
//!
//! On disk (big-endian, 592 bytes): magic `LUKS\xBA\xBE`, version 1, cipher name, cipher mode
//! (`xts-plain64`, `cbc-essiv:sha256`, ...), hash, payload offset (sectors), key bytes, volume key
//! digest (PBKDF2 of the key, 20 bytes) with its salt and iterations, UUID, then 8 key slots of
//! 48 bytes: state, iterations, salt, key material offset (sectors from the header) and stripes.
//! A slot's material is the volume key split into 4000 anti-forensic stripes ([`super::af`]) and
//! encrypted with the volume cipher under the slot key (PBKDF2 of the passphrase), its sectors
//! numbered from 0.
//!
//! Layout vdisk writes, as qemu does: slot material areas start on 4 KiB boundaries from 4 KiB,
//! one after the other, each rounded up to 4 KiB; the payload starts after the eighth.
//!
//! Validation: every field is checked against the area the header lives in before anything is
//! read or allocated through it: key sizes must be the cipher's, stripes 4000, material areas
//! inside the area, after the header and apart from each other, iteration counts between 1 and
//! [`MAX_ITERATIONS`] (so that a hostile image cannot make unlocking run for hours).

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::{af, random, CipherAlg, CipherMode, HashAlg, IvGen, SectorCipher, SECTOR_SIZE};
use crate::{Error, ErrorKind, Result};

/// Length of the LUKS1 header.
pub const HEADER_LEN: usize = 592;
/// Key slots in a LUKS1 header.
pub const KEY_SLOTS: usize = 8;
/// Anti-forensic stripes per key slot.
pub const STRIPES: u32 = 4000;
/// Largest PBKDF2 iteration count accepted from an image (about a minute of SHA-256 here).
pub const MAX_ITERATIONS: u32 = 1 << 28;
/// Fewest iterations given to a new slot, whatever `iter-time` says (qemu's floor).
pub const MIN_SLOT_ITERATIONS: u32 = 1000;
/// Fewest iterations given to a new volume key digest (qemu's floor).
pub const MIN_DIGEST_ITERATIONS: u32 = 1000;

const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
const SLOT_ACTIVE: u32 = 0x00AC_71F3;
const SLOT_INACTIVE: u32 = 0x0000_DEAD;
const DIGEST_LEN: usize = 20;
const SALT_LEN: usize = 32;
const MATERIAL_ALIGN: u64 = 4096;
/// Largest volume key (AES-256 in XTS mode).
const MAX_KEY_BYTES: u32 = 64;

/// One key slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySlot {
    /// Whether the slot holds the volume key.
    pub active: bool,
    /// PBKDF2 iterations for the slot key.
    pub iterations: u32,
    /// PBKDF2 salt for the slot key.
    pub salt: [u8; SALT_LEN],
    /// Where the slot's key material starts, in 512-byte sectors from the header.
    pub key_offset: u32,
    /// Anti-forensic stripes.
    pub stripes: u32,
}

/// The cipher, IV generator and hash a header names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CipherSpec {
    /// Block cipher and key size.
    pub alg: CipherAlg,
    /// Block cipher mode.
    pub mode: CipherMode,
    /// IV generator.
    pub ivgen: IvGen,
    /// Hash for PBKDF2 and the anti-forensic split.
    pub hash: HashAlg,
}

impl CipherSpec {
    /// Bytes of volume key the spec needs.
    pub fn key_bytes(&self) -> usize {
        self.alg.key_len() * if self.mode == CipherMode::Xts { 2 } else { 1 }
    }

    /// The header's cipher mode string (`xts-plain64`, `cbc-essiv:sha256`).
    pub fn mode_string(&self) -> String {
        match self.ivgen {
            IvGen::Essiv(h) => format!("{}-essiv:{}", self.mode.name(), h.name()),
            g => format!("{}-{}", self.mode.name(), g.name()),
        }
    }

    /// The volume cipher keyed with `key`.
    pub fn cipher(&self, key: &[u8]) -> Result<SectorCipher> {
        SectorCipher::new(self.alg, self.mode, self.ivgen, key)
    }
}

/// A parsed LUKS1 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksHeader {
    /// Cipher name (`aes`).
    pub cipher_name: String,
    /// Cipher mode with IV generator (`xts-plain64`).
    pub cipher_mode: String,
    /// Hash name (`sha256`).
    pub hash_spec: String,
    /// Where the payload starts, in 512-byte sectors.
    pub payload_offset: u32,
    /// Volume key length.
    pub key_bytes: u32,
    /// PBKDF2 of the volume key (20 bytes).
    pub mk_digest: [u8; DIGEST_LEN],
    /// Salt of that digest.
    pub mk_digest_salt: [u8; SALT_LEN],
    /// Iterations of that digest.
    pub mk_digest_iterations: u32,
    /// Volume UUID.
    pub uuid: String,
    /// The key slots.
    pub slots: [KeySlot; KEY_SLOTS],
    /// What the strings name.
    pub spec: CipherSpec,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn text(b: &[u8], what: &str) -> Result<String> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    std::str::from_utf8(&b[..end])
        .map(str::to_string)
        .map_err(|_| Error::invalid_image(format!("LUKS header {what} is not text")))
}

/// Writes `s` into a fixed field, NUL-padded; a string that fills the field (as read from an
/// image without a terminator) is written without one, so that headers round-trip.
fn put_text(out: &mut [u8], s: &str) {
    let n = s.len().min(out.len());
    out[..n].copy_from_slice(&s.as_bytes()[..n]);
}

/// Parses the header's cipher name, mode string and hash into what vdisk implements.
pub fn parse_spec(cipher_name: &str, cipher_mode: &str, hash: &str, key_bytes: u32) -> Result<CipherSpec> {
    let unsupported = |what: String| Error::unsupported(what);
    let (mode_name, ivgen_name) = cipher_mode.split_once('-').unwrap_or((cipher_mode, "plain64"));
    let mode = CipherMode::parse(mode_name)
        .ok_or_else(|| unsupported(format!("Unsupported cipher mode '{mode_name}' in LUKS header")))?;
    let key_bits_source = if mode == CipherMode::Xts { key_bytes / 2 } else { key_bytes };
    if cipher_name != "aes" {
        return Err(unsupported(format!("Unsupported cipher '{cipher_name}' in LUKS header")));
    }
    let alg = CipherAlg::from_key_len(key_bits_source as usize)
        .filter(|_| mode != CipherMode::Xts || key_bytes % 2 == 0)
        .ok_or_else(|| {
            Error::invalid_image(format!("Invalid key size {key_bytes} for cipher {cipher_name}-{mode_name}"))
        })?;
    let ivgen = match ivgen_name.split_once(':') {
        None if ivgen_name == "plain" => IvGen::Plain,
        None if ivgen_name == "plain64" => IvGen::Plain64,
        Some(("essiv", h)) => IvGen::Essiv(
            HashAlg::parse(h).ok_or_else(|| unsupported(format!("Unsupported ESSIV hash '{h}' in LUKS header")))?,
        ),
        _ => return Err(unsupported(format!("Unsupported IV generator '{ivgen_name}' in LUKS header"))),
    };
    let hash = HashAlg::parse(hash).ok_or_else(|| unsupported(format!("Unsupported hash '{hash}' in LUKS header")))?;
    Ok(CipherSpec { alg, mode, ivgen, hash })
}

impl LuksHeader {
    /// Parses and validates the header at the start of `bytes`; `area_len` is how many bytes the
    /// LUKS area holds (the file for a raw LUKS volume, the header extension's length in qcow2),
    /// which every key material area must lie in.
    pub fn parse(bytes: &[u8], area_len: u64) -> Result<LuksHeader> {
        if bytes.len() < HEADER_LEN || (area_len as usize) < HEADER_LEN {
            return Err(Error::invalid_image("LUKS header is truncated"));
        }
        let b = &bytes[..HEADER_LEN];
        if b[..6] != MAGIC {
            return Err(Error::invalid_image("Volume is not in LUKS format"));
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(Error::invalid_image(format!("LUKS version {version} is not supported")));
        }
        let cipher_name = text(&b[8..40], "cipher name")?;
        let cipher_mode = text(&b[40..72], "cipher mode")?;
        let hash_spec = text(&b[72..104], "hash")?;
        let payload_offset = be32(b, 104);
        let key_bytes = be32(b, 108);
        if key_bytes == 0 || key_bytes > MAX_KEY_BYTES {
            return Err(Error::invalid_image(format!("LUKS key size {key_bytes} is out of range")));
        }
        let spec = parse_spec(&cipher_name, &cipher_mode, &hash_spec, key_bytes)?;
        if spec.key_bytes() != key_bytes as usize {
            return Err(Error::invalid_image(format!("LUKS key size {key_bytes} does not fit {cipher_mode}")));
        }
        let mut mk_digest = [0u8; DIGEST_LEN];
        mk_digest.copy_from_slice(&b[112..132]);
        let mut mk_digest_salt = [0u8; SALT_LEN];
        mk_digest_salt.copy_from_slice(&b[132..164]);
        let mk_digest_iterations = be32(b, 164);
        check_iterations(mk_digest_iterations, "volume key digest")?;
        let uuid = text(&b[168..208], "UUID")?;
        let material_len = (key_bytes as u64 * STRIPES as u64).next_multiple_of(SECTOR_SIZE as u64);
        let mut slots: [KeySlot; KEY_SLOTS] = std::array::from_fn(|_| KeySlot::inactive(0));
        for (i, slot) in slots.iter_mut().enumerate() {
            let s = &b[208 + 48 * i..208 + 48 * (i + 1)];
            let state = be32(s, 0);
            let active = match state {
                SLOT_ACTIVE => true,
                SLOT_INACTIVE => false,
                _ => return Err(Error::invalid_image(format!("Keyslot {i} state {state:#x} is invalid"))),
            };
            let mut salt = [0u8; SALT_LEN];
            salt.copy_from_slice(&s[8..40]);
            *slot = KeySlot { active, iterations: be32(s, 4), salt, key_offset: be32(s, 40), stripes: be32(s, 44) };
            if slot.stripes != STRIPES {
                return Err(Error::invalid_image(format!(
                    "Keyslot {i} is corrupted (stripes {} != {STRIPES})",
                    slot.stripes
                )));
            }
            if active {
                check_iterations(slot.iterations, "key slot")?;
            }
            let start = slot.key_offset as u64 * SECTOR_SIZE as u64;
            if start < HEADER_LEN as u64 || start + material_len > area_len {
                return Err(Error::invalid_image(format!(
                    "Keyslot {i} is overlapping with the LUKS header or lies outside it"
                )));
            }
        }
        for i in 0..KEY_SLOTS {
            for j in i + 1..KEY_SLOTS {
                let (a, b) = (slots[i].key_offset as u64 * 512, slots[j].key_offset as u64 * 512);
                if a < b + material_len && b < a + material_len {
                    return Err(Error::invalid_image(format!("Keyslots {i} and {j} are overlapping in the header")));
                }
            }
        }
        Ok(LuksHeader {
            cipher_name,
            cipher_mode,
            hash_spec,
            payload_offset,
            key_bytes,
            mk_digest,
            mk_digest_salt,
            mk_digest_iterations,
            uuid,
            slots,
            spec,
        })
    }

    /// The 592 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..6].copy_from_slice(&MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        put_text(&mut b[8..40], &self.cipher_name);
        put_text(&mut b[40..72], &self.cipher_mode);
        put_text(&mut b[72..104], &self.hash_spec);
        b[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_digest_salt);
        b[164..168].copy_from_slice(&self.mk_digest_iterations.to_be_bytes());
        put_text(&mut b[168..208], &self.uuid);
        for (i, slot) in self.slots.iter().enumerate() {
            let s = &mut b[208 + 48 * i..208 + 48 * (i + 1)];
            s[..4].copy_from_slice(&(if slot.active { SLOT_ACTIVE } else { SLOT_INACTIVE }).to_be_bytes());
            s[4..8].copy_from_slice(&slot.iterations.to_be_bytes());
            s[8..40].copy_from_slice(&slot.salt);
            s[40..44].copy_from_slice(&slot.key_offset.to_be_bytes());
            s[44..48].copy_from_slice(&slot.stripes.to_be_bytes());
        }
        b
    }

    /// Bytes of key material per slot: the stripes, rounded up to whole sectors (the material
    /// is encrypted sector by sector; the padding of keys whose stripes do not fill the last
    /// sector, AES-192 outside XTS, is encrypted with it, as cryptsetup does).
    pub fn material_len(&self) -> usize {
        (self.key_bytes as usize * STRIPES as usize).next_multiple_of(SECTOR_SIZE)
    }

    /// Byte range of slot `i`'s material within the LUKS area.
    pub fn material_range(&self, i: usize) -> std::ops::Range<u64> {
        let start = self.slots[i].key_offset as u64 * SECTOR_SIZE as u64;
        start..start + self.material_len() as u64
    }

    /// Whether `key` is the volume key (its digest matches, compared in constant time).
    pub fn verify_key(&self, key: &[u8]) -> Result<bool> {
        let mut digest = Zeroizing::new([0u8; DIGEST_LEN]);
        self.spec.hash.pbkdf2(key, &self.mk_digest_salt, self.mk_digest_iterations, &mut digest[..])?;
        Ok(bool::from(digest.ct_eq(&self.mk_digest)))
    }

    /// Tries `passphrase` on slot `i` whose material is `material`: the volume key, if it opens.
    pub fn open_slot(&self, i: usize, material: &[u8], passphrase: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>> {
        let slot = &self.slots[i];
        if !slot.active || material.len() != self.material_len() {
            return Ok(None);
        }
        let key_len = self.key_bytes as usize;
        let mut slot_key = Zeroizing::new(vec![0u8; key_len]);
        self.spec.hash.pbkdf2(passphrase, &slot.salt, slot.iterations, &mut slot_key)?;
        let mut split = Zeroizing::new(material.to_vec());
        self.spec.cipher(&slot_key)?.decrypt(0, &mut split)?;
        let key = af::merge(self.spec.hash, &split[..key_len * slot.stripes as usize], key_len, slot.stripes)?;
        Ok(if self.verify_key(&key)? { Some(key) } else { None })
    }

    /// Finds the slot `passphrase` opens, reading each active slot's material through `read`
    /// (offset within the LUKS area, buffer): `(slot, volume key)`.
    pub fn unlock(
        &self,
        passphrase: &[u8],
        read: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
    ) -> Result<(usize, Zeroizing<Vec<u8>>)> {
        let mut material = Zeroizing::new(vec![0u8; self.material_len()]);
        for i in 0..KEY_SLOTS {
            if !self.slots[i].active {
                continue;
            }
            read(self.material_range(i).start, &mut material)?;
            if let Some(key) = self.open_slot(i, &material, passphrase)? {
                return Ok((i, key));
            }
        }
        Err(Error::new(ErrorKind::BadKey, "Invalid password, cannot unlock any keyslot"))
    }

    /// Puts `key` (the volume key) into slot `i` under `passphrase`, with iterations for
    /// `iter_time_ms`: the new slot entry and the key material to store at its range.
    pub fn make_slot(&self, i: usize, key: &[u8], passphrase: &[u8], iter_time_ms: u64) -> Result<(KeySlot, Vec<u8>)> {
        let hash = self.spec.hash;
        let key_len = self.key_bytes as usize;
        let mut salt = [0u8; SALT_LEN];
        random::fill(&mut salt)?;
        let iterations = iterations_for(hash, passphrase.len(), key_len, iter_time_ms, MIN_SLOT_ITERATIONS)?;
        let mut slot_key = Zeroizing::new(vec![0u8; key_len]);
        hash.pbkdf2(passphrase, &salt, iterations, &mut slot_key)?;
        let mut material = vec![0u8; self.material_len()];
        af::split(hash, key, STRIPES, &mut material[..key_len * STRIPES as usize])?;
        self.spec.cipher(&slot_key)?.encrypt(0, &mut material)?;
        let slot = KeySlot { active: true, iterations, salt, key_offset: self.slots[i].key_offset, stripes: STRIPES };
        Ok((slot, material))
    }
}

impl KeySlot {
    /// An inactive slot whose material would start at `key_offset`.
    pub fn inactive(key_offset: u32) -> KeySlot {
        KeySlot { active: false, iterations: 0, salt: [0; SALT_LEN], key_offset, stripes: STRIPES }
    }
}

fn check_iterations(n: u32, what: &str) -> Result<()> {
    if n == 0 || n > MAX_ITERATIONS {
        return Err(Error::invalid_image(format!("LUKS {what} iteration count {n} is out of range")));
    }
    Ok(())
}

/// PBKDF2 iterations that take `iter_time_ms` on this machine for these input and output sizes,
/// at least `floor`.
fn iterations_for(hash: HashAlg, password_len: usize, out_len: usize, iter_time_ms: u64, floor: u32) -> Result<u32> {
    let per_second = hash.pbkdf2_iterations_per_second(password_len, out_len)?;
    let n = per_second.saturating_mul(iter_time_ms) / 1000;
    Ok(n.clamp(floor as u64, MAX_ITERATIONS as u64) as u32)
}

/// What a new LUKS volume uses; defaults are qemu's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LuksCreateOptions {
    /// Cipher, mode, IV generator and hash.
    pub spec: CipherSpec,
    /// Milliseconds of PBKDF2 per unlock (qemu's `iter-time`, 2000 by default).
    pub iter_time_ms: u64,
}

impl Default for LuksCreateOptions {
    fn default() -> LuksCreateOptions {
        LuksCreateOptions {
            spec: CipherSpec {
                alg: CipherAlg::Aes256,
                mode: CipherMode::Xts,
                ivgen: IvGen::Plain64,
                hash: HashAlg::Sha256,
            },
            iter_time_ms: 2000,
        }
    }
}

/// A new LUKS volume: its header, the whole LUKS area (header and slot 0's material; payload
/// excluded) and the volume key.
pub struct NewVolume {
    /// The header.
    pub header: LuksHeader,
    /// `header.payload_offset` sectors: what goes at the start of the LUKS area.
    pub area: Vec<u8>,
    /// The volume key.
    pub key: Zeroizing<Vec<u8>>,
}

impl LuksCreateOptions {
    /// Creates a volume key and a header with slot 0 opened by `passphrase`.
    pub fn create(&self, passphrase: &[u8]) -> Result<NewVolume> {
        let spec = self.spec;
        spec.cipher(&vec![0u8; spec.key_bytes()])?; // the combination must be usable
        let key_len = spec.key_bytes();
        let mut key = Zeroizing::new(vec![0u8; key_len]);
        random::fill(&mut key)?;
        let mut mk_digest_salt = [0u8; SALT_LEN];
        random::fill(&mut mk_digest_salt)?;
        // qemu (like cryptsetup) spends an eighth of iter-time on the volume key digest.
        let digest_iters = iterations_for(spec.hash, key_len, DIGEST_LEN, self.iter_time_ms, 0)? / 8;
        let mk_digest_iterations = digest_iters.max(MIN_DIGEST_ITERATIONS);
        let mut mk_digest = [0u8; DIGEST_LEN];
        spec.hash.pbkdf2(&key, &mk_digest_salt, mk_digest_iterations, &mut mk_digest)?;
        let material_sectors = (key_len as u64 * STRIPES as u64).div_ceil(MATERIAL_ALIGN) * MATERIAL_ALIGN / 512;
        let first = MATERIAL_ALIGN / 512;
        let slots = std::array::from_fn(|i| KeySlot::inactive((first + i as u64 * material_sectors) as u32));
        let payload_offset = (first + KEY_SLOTS as u64 * material_sectors) as u32;
        let mut header = LuksHeader {
            cipher_name: "aes".to_string(),
            cipher_mode: spec.mode_string(),
            hash_spec: spec.hash.name().to_string(),
            payload_offset,
            key_bytes: key_len as u32,
            mk_digest,
            mk_digest_salt,
            mk_digest_iterations,
            uuid: uuid::Uuid::new_v4().to_string(),
            slots,
            spec,
        };
        let (slot, material) = header.make_slot(0, &key, passphrase, self.iter_time_ms)?;
        header.slots[0] = slot;
        let mut area = vec![0u8; payload_offset as usize * SECTOR_SIZE];
        area[..HEADER_LEN].copy_from_slice(&header.encode());
        let r = header.material_range(0);
        area[r.start as usize..r.end as usize].copy_from_slice(&material);
        Ok(NewVolume { header, area, key })
    }
}
