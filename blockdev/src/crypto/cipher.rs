//! Sector ciphers: AES-128/192/256 in XTS, CBC or ECB mode, with plain, plain64 or ESSIV
//! initialisation vectors, applied to 512-byte sectors numbered by the caller.
//!
//! IVs are 16 bytes: `plain` is the sector number's low 32 bits, `plain64` all 64 bits (both
//! little-endian, zero-padded); ESSIV encrypts the plain64 IV with AES keyed by the hash of the
//! volume key (the AES size is the digest's length: sha256 gives AES-256). XTS uses the IV as its
//! tweak; CBC chains each sector from its IV; ECB has none.

use aes::cipher::{
    array::Array, BlockCipherDecrypt, BlockCipherEncrypt, BlockModeDecrypt, BlockModeEncrypt, InnerIvInit, KeyInit,
};
use aes::{Aes128, Aes192, Aes256};

use super::HashAlg;
use crate::{Error, Result};

/// Bytes per encryption sector.
pub const SECTOR_SIZE: usize = 512;

/// The block cipher and its key size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherAlg {
    /// `aes-128`.
    Aes128,
    /// `aes-192`.
    Aes192,
    /// `aes-256`, qemu's default.
    Aes256,
}

impl CipherAlg {
    /// Parses qemu's name (`aes-256`).
    pub fn parse(name: &str) -> Option<CipherAlg> {
        [CipherAlg::Aes128, CipherAlg::Aes192, CipherAlg::Aes256].into_iter().find(|a| a.name() == name)
    }

    /// qemu's name.
    pub fn name(self) -> &'static str {
        match self {
            CipherAlg::Aes128 => "aes-128",
            CipherAlg::Aes192 => "aes-192",
            CipherAlg::Aes256 => "aes-256",
        }
    }

    /// Key length in bytes.
    pub fn key_len(self) -> usize {
        match self {
            CipherAlg::Aes128 => 16,
            CipherAlg::Aes192 => 24,
            CipherAlg::Aes256 => 32,
        }
    }

    /// The AES variant with keys of `n` bytes.
    pub fn from_key_len(n: usize) -> Option<CipherAlg> {
        match n {
            16 => Some(CipherAlg::Aes128),
            24 => Some(CipherAlg::Aes192),
            32 => Some(CipherAlg::Aes256),
            _ => None,
        }
    }
}

/// The block cipher mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherMode {
    /// `ecb`: every block on its own (no IV).
    Ecb,
    /// `cbc`: blocks chained from the sector's IV.
    Cbc,
    /// `xts`: the IV is the tweak; the key is two cipher keys.
    Xts,
}

impl CipherMode {
    /// Parses qemu's name (`xts`).
    pub fn parse(name: &str) -> Option<CipherMode> {
        [CipherMode::Ecb, CipherMode::Cbc, CipherMode::Xts].into_iter().find(|m| m.name() == name)
    }

    /// qemu's name.
    pub fn name(self) -> &'static str {
        match self {
            CipherMode::Ecb => "ecb",
            CipherMode::Cbc => "cbc",
            CipherMode::Xts => "xts",
        }
    }
}

/// How a sector's IV is made from its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IvGen {
    /// `plain`: the low 32 bits, little-endian.
    Plain,
    /// `plain64`: all 64 bits, little-endian (qemu's default).
    Plain64,
    /// `essiv`: plain64 encrypted with a key hashed from the volume key.
    Essiv(HashAlg),
}

impl IvGen {
    /// qemu's name of the generator (`essiv`, without its hash).
    pub fn name(self) -> &'static str {
        match self {
            IvGen::Plain => "plain",
            IvGen::Plain64 => "plain64",
            IvGen::Essiv(_) => "essiv",
        }
    }
}

/// AES with one of its key sizes.
#[derive(Clone)]
enum Aes {
    A128(Aes128),
    A192(Aes192),
    A256(Aes256),
}

macro_rules! each_aes {
    ($aes:expr, $c:ident => $body:expr) => {
        match $aes {
            Aes::A128($c) => $body,
            Aes::A192($c) => $body,
            Aes::A256($c) => $body,
        }
    };
}

impl Aes {
    fn new(key: &[u8]) -> Result<Aes> {
        let bad = |_| Error::invalid_argument("AES key of the wrong length");
        Ok(match key.len() {
            16 => Aes::A128(Aes128::new_from_slice(key).map_err(bad)?),
            24 => Aes::A192(Aes192::new_from_slice(key).map_err(bad)?),
            32 => Aes::A256(Aes256::new_from_slice(key).map_err(bad)?),
            n => return Err(Error::invalid_argument(format!("AES key of {n} bytes"))),
        })
    }

    fn encrypt_block(&self, block: &mut [u8; 16]) {
        let mut b = Array::from(*block);
        each_aes!(self, c => c.encrypt_block(&mut b));
        block.copy_from_slice(&b);
    }

    fn ecb(&self, data: &mut [u8], encrypt: bool) {
        let (blocks, _) = Array::slice_as_chunks_mut(data);
        if encrypt {
            each_aes!(self, c => c.encrypt_blocks(blocks))
        } else {
            each_aes!(self, c => c.decrypt_blocks(blocks))
        }
    }

    fn cbc(&self, iv: &[u8; 16], data: &mut [u8], encrypt: bool) {
        let (blocks, _) = Array::slice_as_chunks_mut(data);
        let iv = Array::from(*iv);
        if encrypt {
            each_aes!(self, c => cbc::Encryptor::inner_iv_init(c.clone(), &iv).encrypt_blocks(blocks))
        } else {
            each_aes!(self, c => cbc::Decryptor::inner_iv_init(c.clone(), &iv).decrypt_blocks(blocks))
        }
    }
}

/// XTS over AES (IEEE 1619) for whole 512-byte sectors: the tweak is the IV encrypted with the
/// second key half, multiplied by x in GF(2^128) from block to block; each block is XORed with its
/// tweak before and after the block cipher. The 32 blocks of a sector go through the cipher as one
/// batch, so AES-NI works on several at once (the xts-mode crate, block by block, was 2-3x slower
/// here; its output is what the tests hold this to).
struct Xts {
    data: Aes,
    tweak: Aes,
}

impl Xts {
    fn new(key: &[u8]) -> Result<Xts> {
        let (k1, k2) = key.split_at(key.len() / 2);
        Ok(Xts { data: Aes::new(k1)?, tweak: Aes::new(k2)? })
    }

    fn apply(&self, iv: &[u8; 16], sector: &mut [u8], encrypt: bool) {
        const BLOCKS: usize = SECTOR_SIZE / 16;
        let mut t = *iv;
        self.tweak.encrypt_block(&mut t);
        let mut tweak = u128::from_le_bytes(t);
        let mut tweaks = [0u128; BLOCKS];
        for (block, slot) in sector.chunks_exact_mut(16).zip(tweaks.iter_mut()) {
            *slot = tweak;
            xor_block(block, tweak);
            // Multiplication by x: shift left, reduce by x^128 = x^7 + x^2 + x + 1.
            tweak = (tweak << 1) ^ if tweak >> 127 == 1 { 0x87 } else { 0 };
        }
        self.data.ecb(sector, encrypt);
        for (block, &t) in sector.chunks_exact_mut(16).zip(tweaks.iter()) {
            xor_block(block, t);
        }
    }
}

fn xor_block(block: &mut [u8], tweak: u128) {
    let mut b = [0u8; 16];
    b.copy_from_slice(block);
    block.copy_from_slice(&(u128::from_le_bytes(b) ^ tweak).to_le_bytes());
}

enum Mode {
    Ecb(Aes),
    Cbc(Aes),
    Xts(Box<Xts>),
}

/// A keyed sector cipher. Cheap to share between threads (`&self` methods only); the key
/// schedules are zeroized when it is dropped.
pub struct SectorCipher {
    mode: Mode,
    ivgen: IvGen,
    /// ESSIV's IV cipher.
    essiv: Option<Aes>,
}

impl SectorCipher {
    /// Keys `alg` in `mode` with `ivgen`; `key` is the volume key (twice the cipher's key length
    /// for XTS).
    pub fn new(alg: CipherAlg, mode: CipherMode, ivgen: IvGen, key: &[u8]) -> Result<SectorCipher> {
        let want = if mode == CipherMode::Xts { 2 * alg.key_len() } else { alg.key_len() };
        if key.len() != want {
            return Err(Error::invalid_argument(format!(
                "{} in {} mode needs a {want}-byte key, not {} bytes",
                alg.name(),
                mode.name(),
                key.len()
            )));
        }
        let essiv = match ivgen {
            IvGen::Essiv(hash) => {
                let h = hash.digest(&[key]);
                if CipherAlg::from_key_len(h.len()).is_none() {
                    return Err(Error::unsupported(format!(
                        "ESSIV with hash {} gives a {}-byte key, which AES does not take",
                        hash.name(),
                        h.len()
                    )));
                }
                Some(Aes::new(&h)?)
            }
            _ => None,
        };
        let mode = match mode {
            CipherMode::Ecb => Mode::Ecb(Aes::new(key)?),
            CipherMode::Cbc => Mode::Cbc(Aes::new(key)?),
            CipherMode::Xts => Mode::Xts(Box::new(Xts::new(key)?)),
        };
        Ok(SectorCipher { mode, ivgen, essiv })
    }

    /// Encrypts `buf` (whole sectors) in place; its first sector is number `first_sector`.
    pub fn encrypt(&self, first_sector: u64, buf: &mut [u8]) -> Result<()> {
        self.apply(first_sector, buf, true)
    }

    /// Decrypts `buf` (whole sectors) in place; its first sector is number `first_sector`.
    pub fn decrypt(&self, first_sector: u64, buf: &mut [u8]) -> Result<()> {
        self.apply(first_sector, buf, false)
    }

    fn iv(&self, sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match self.ivgen {
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 | IvGen::Essiv(_) => iv[..8].copy_from_slice(&sector.to_le_bytes()),
        }
        if let Some(e) = &self.essiv {
            e.encrypt_block(&mut iv);
        }
        iv
    }

    fn apply(&self, first_sector: u64, buf: &mut [u8], encrypt: bool) -> Result<()> {
        if buf.len() % SECTOR_SIZE != 0 {
            return Err(Error::invalid_argument(format!(
                "encryption works on whole {SECTOR_SIZE}-byte sectors, not {} bytes",
                buf.len()
            )));
        }
        match &self.mode {
            Mode::Ecb(aes) => aes.ecb(buf, encrypt),
            Mode::Cbc(aes) => numbered(buf, first_sector).for_each(|(s, n)| aes.cbc(&self.iv(n), s, encrypt)),
            Mode::Xts(x) => numbered(buf, first_sector).for_each(|(s, n)| x.apply(&self.iv(n), s, encrypt)),
        }
        Ok(())
    }
}

/// The sectors of `buf` with their numbers from `first` on.
fn numbered(buf: &mut [u8], first: u64) -> impl Iterator<Item = (&mut [u8], u64)> {
    buf.chunks_exact_mut(SECTOR_SIZE).zip((0u64..).map(move |i| first.wrapping_add(i)))
}
