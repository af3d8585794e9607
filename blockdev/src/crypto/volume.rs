//! LUKS volumes kept in a container: reading and unlocking their header, the `info` block qemu
//! prints for them, and their `-o` create options. Shared by the raw `luks` format and qcow2's
//! LUKS encryption (whose area sits inside the qcow2 file).

use super::luks::{CipherSpec, LuksCreateOptions, LuksHeader, HEADER_LEN};
use super::{CipherAlg, CipherMode, HashAlg, IvGen, SectorCipher, SECTOR_SIZE};
use crate::options::CreateOptions;
use crate::qobject::{Dict, Value};
use crate::{Error, Result, Storage};

/// The LUKS create options under `prefix` (`""` for `-f luks`, `"encrypt."` for qcow2), with
/// qemu's defaults and messages.
pub fn luks_create_options(opts: &CreateOptions, prefix: &str) -> Result<LuksCreateOptions> {
    let get = |k: &str| opts.get(&format!("{prefix}{k}")).map(str::to_string);
    let bad = |k: &str, v: &str| Error::invalid_argument(format!("Invalid parameter '{prefix}{k}' value '{v}'"));
    let mut o = LuksCreateOptions::default();
    if let Some(v) = get("cipher-alg") {
        o.spec.alg = CipherAlg::parse(&v).ok_or_else(|| {
            Error::unsupported(format!("Cipher algorithm '{v}' is not supported by this version of vdisk"))
        })?;
    }
    if let Some(v) = get("cipher-mode") {
        o.spec.mode = CipherMode::parse(&v).ok_or_else(|| {
            Error::unsupported(format!("Cipher mode '{v}' is not supported by this version of vdisk"))
        })?;
    }
    let ivgen_hash = match get("ivgen-hash-alg") {
        Some(v) => Some(HashAlg::parse(&v).ok_or_else(|| bad("ivgen-hash-alg", &v))?),
        None => None,
    };
    if let Some(v) = get("ivgen-alg") {
        o.spec.ivgen = match v.as_str() {
            "plain" => IvGen::Plain,
            "plain64" => IvGen::Plain64,
            "essiv" => IvGen::Essiv(ivgen_hash.unwrap_or(HashAlg::Sha256)),
            _ => return Err(bad("ivgen-alg", &v)),
        };
    }
    if let Some(v) = get("hash-alg") {
        o.spec.hash = HashAlg::parse(&v).ok_or_else(|| {
            Error::unsupported(format!("Hash algorithm '{v}' is not supported by this version of vdisk"))
        })?;
    }
    if let Some(ms) = opts.get_number(&format!("{prefix}iter-time"))? {
        o.iter_time_ms = ms;
    }
    Ok(o)
}

/// The `format-specific` data of a LUKS volume as qemu's `info` shows it.
pub fn luks_info(h: &LuksHeader) -> Dict {
    let s = h.spec;
    let mut d = Dict::new();
    d.insert("cipher-alg", s.alg.name().into())
        .insert("cipher-mode", s.mode.name().into())
        .insert("ivgen-alg", s.ivgen.name().into());
    if let IvGen::Essiv(hash) = s.ivgen {
        d.insert("ivgen-hash-alg", hash.name().into());
    }
    d.insert("hash-alg", s.hash.name().into())
        .insert("detached-header", false.into())
        .insert("payload-offset", Value::Int(h.payload_offset as i64 * SECTOR_SIZE as i64))
        .insert("master-key-iters", Value::Int(h.mk_digest_iterations as i64))
        .insert("uuid", h.uuid.as_str().into());
    let slots = h
        .slots
        .iter()
        .map(|slot| {
            let mut e = Dict::new();
            e.insert("active", slot.active.into());
            if slot.active {
                e.insert("iters", Value::Int(slot.iterations as i64))
                    .insert("stripes", Value::Int(slot.stripes as i64));
            }
            e.insert("key-offset", Value::Int(slot.key_offset as i64 * SECTOR_SIZE as i64));
            Value::Dict(e)
        })
        .collect();
    d.insert("slots", Value::List(slots));
    d
}

/// Reads and validates the LUKS header at the start of `storage`, whose first `area_len` bytes
/// are the LUKS area.
pub fn read_header(storage: &dyn Storage, base: u64, area_len: u64) -> Result<LuksHeader> {
    let mut head = [0u8; HEADER_LEN];
    crate::read_exact_at(storage, base, &mut head)?;
    LuksHeader::parse(&head, area_len)
}

/// Unlocks `header` (at `base` in `storage`) with `passphrase`: the volume cipher.
pub fn unlock(storage: &dyn Storage, base: u64, header: &LuksHeader, passphrase: &[u8]) -> Result<SectorCipher> {
    let mut read = |off: u64, buf: &mut [u8]| crate::read_exact_at(storage, base + off, buf);
    let (_, key) = header.unlock(passphrase, &mut read)?;
    header.spec.cipher(&key)
}

/// Bytes of header and key material qemu (and vdisk) lay out for `spec`.
pub fn header_area_len(spec: &CipherSpec) -> u64 {
    let material = (spec.key_bytes() as u64 * 4000).div_ceil(4096) * 4096;
    4096 + 8 * material
}
