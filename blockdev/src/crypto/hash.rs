//! The hash functions LUKS names (`hash-alg`, ESSIV's hash): digests and PBKDF2-HMAC.

use sha1::Sha1;
use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};
use zeroize::Zeroizing;

use crate::{Error, Result};

/// A hash function by its LUKS / qemu name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlg {
    /// `sha1` (20-byte digests).
    Sha1,
    /// `sha224`.
    Sha224,
    /// `sha256`, qemu's default.
    Sha256,
    /// `sha384`.
    Sha384,
    /// `sha512`.
    Sha512,
}

impl HashAlg {
    /// Every hash vdisk implements.
    pub const ALL: [HashAlg; 5] = [HashAlg::Sha1, HashAlg::Sha224, HashAlg::Sha256, HashAlg::Sha384, HashAlg::Sha512];

    /// Parses qemu's name (`sha256`); md5 and ripemd160, which qemu also knows, are refused by
    /// the caller as unsupported.
    pub fn parse(name: &str) -> Option<HashAlg> {
        HashAlg::ALL.into_iter().find(|h| h.name() == name)
    }

    /// qemu's (and the LUKS header's) name.
    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha224 => "sha224",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
            HashAlg::Sha512 => "sha512",
        }
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashAlg::Sha1 => 20,
            HashAlg::Sha224 => 28,
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// The digest of the concatenation of `parts`.
    pub fn digest(self, parts: &[&[u8]]) -> Zeroizing<Vec<u8>> {
        fn run<D: Digest>(parts: &[&[u8]]) -> Zeroizing<Vec<u8>> {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            Zeroizing::new(d.finalize().to_vec())
        }
        match self {
            HashAlg::Sha1 => run::<Sha1>(parts),
            HashAlg::Sha224 => run::<Sha224>(parts),
            HashAlg::Sha256 => run::<Sha256>(parts),
            HashAlg::Sha384 => run::<Sha384>(parts),
            HashAlg::Sha512 => run::<Sha512>(parts),
        }
    }

    /// PBKDF2 with HMAC over this hash: fills `out` from `password`, `salt` and `iterations`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) -> Result<()> {
        if iterations == 0 {
            return Err(Error::invalid_argument("PBKDF2 needs at least one iteration"));
        }
        match self {
            HashAlg::Sha1 => pbkdf2::pbkdf2_hmac::<Sha1>(password, salt, iterations, out),
            HashAlg::Sha224 => pbkdf2::pbkdf2_hmac::<Sha224>(password, salt, iterations, out),
            HashAlg::Sha256 => pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, out),
            HashAlg::Sha384 => pbkdf2::pbkdf2_hmac::<Sha384>(password, salt, iterations, out),
            HashAlg::Sha512 => pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, iterations, out),
        }
        Ok(())
    }

    /// PBKDF2 iterations this machine runs per second of thread CPU time for a password of
    /// `password_len` bytes and `out_len` bytes of output, measured as qemu measures it (on
    /// throwaway inputs, doubling the count until a run takes long enough to time).
    pub fn pbkdf2_iterations_per_second(self, password_len: usize, out_len: usize) -> Result<u64> {
        let password = vec![0x5au8; password_len];
        let salt = [0xa5u8; 32];
        let mut out = vec![0u8; out_len.max(1)];
        let mut iterations: u32 = 1 << 12;
        loop {
            let start = thread_cpu_time();
            self.pbkdf2(&password, &salt, iterations, &mut out)?;
            let spent = thread_cpu_time().saturating_sub(start);
            if spent >= CALIBRATION_NS || iterations >= 1 << 30 {
                return Ok((iterations as u64 * 1_000_000_000 / spent.max(1)).max(1));
            }
            iterations *= 2;
        }
    }
}

/// How long one calibration run must take (thread CPU time, nanoseconds).
const CALIBRATION_NS: u64 = 60_000_000;

fn thread_cpu_time() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
