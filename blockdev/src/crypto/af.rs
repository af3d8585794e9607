//! LUKS anti-forensic splitting: a key is stored as `stripes` times its size, so that destroying
//! any part of the stored material destroys the key.
//!
//! Split: stripes 1 to n-1 are random; `d` starts at zeros and becomes `diffuse(d XOR stripe)` for
//! each of them; the last stripe is `d XOR key`. Merge repeats the walk over the stored stripes and
//! XORs the last one. `diffuse` replaces each digest-sized chunk `c` (index `i`, the last one
//! possibly shorter) with the first `len(c)` bytes of `hash(be32(i) || c)`.

use zeroize::Zeroizing;

use super::{random, HashAlg};
use crate::{Error, Result};

/// Splits `key` into `stripes` stripes written to `out` (`key.len() * stripes` bytes).
pub fn split(hash: HashAlg, key: &[u8], stripes: u32, out: &mut [u8]) -> Result<()> {
    let n = key.len();
    if stripes == 0 || out.len() != n * stripes as usize {
        return Err(Error::invalid_argument("anti-forensic split: output size does not match the stripes"));
    }
    let (random_part, last) = out.split_at_mut(n * (stripes as usize - 1));
    random::fill(random_part)?;
    let d = walk(hash, random_part, n);
    for ((o, d), k) in last.iter_mut().zip(d.iter()).zip(key) {
        *o = d ^ k;
    }
    Ok(())
}

/// Merges `stripes` stripes of `key_len` bytes each back into the key.
pub fn merge(hash: HashAlg, material: &[u8], key_len: usize, stripes: u32) -> Result<Zeroizing<Vec<u8>>> {
    if stripes == 0 || key_len == 0 || material.len() != key_len * stripes as usize {
        return Err(Error::invalid_argument("anti-forensic merge: material size does not match the stripes"));
    }
    let (head, last) = material.split_at(key_len * (stripes as usize - 1));
    let mut d = walk(hash, head, key_len);
    for (d, l) in d.iter_mut().zip(last) {
        *d ^= l;
    }
    Ok(d)
}

/// `d` after XOR-and-diffuse with every `n`-byte stripe of `stripes`.
fn walk(hash: HashAlg, stripes: &[u8], n: usize) -> Zeroizing<Vec<u8>> {
    let mut d = Zeroizing::new(vec![0u8; n]);
    for stripe in stripes.chunks_exact(n) {
        for (d, s) in d.iter_mut().zip(stripe) {
            *d ^= s;
        }
        diffuse(hash, &mut d);
    }
    d
}

fn diffuse(hash: HashAlg, block: &mut [u8]) {
    for (i, chunk) in block.chunks_mut(hash.digest_len()).enumerate() {
        let h = hash.digest(&[&(i as u32).to_be_bytes(), chunk]);
        let n = chunk.len();
        chunk.copy_from_slice(&h[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_undoes_split_for_every_hash_and_odd_key_sizes() {
        for hash in HashAlg::ALL {
            for n in [16usize, 32, 33, 64] {
                let key: Vec<u8> = (0..n as u8).collect();
                let mut out = vec![0u8; n * 40];
                split(hash, &key, 40, &mut out).unwrap();
                assert_eq!(&merge(hash, &out, n, 40).unwrap()[..], &key[..], "{hash:?} {n}");
                out[5] ^= 1;
                assert_ne!(&merge(hash, &out, n, 40).unwrap()[..], &key[..], "damage is noticed");
            }
        }
    }

    #[test]
    fn sizes_are_checked() {
        assert!(split(HashAlg::Sha256, &[0; 16], 4, &mut [0; 63]).is_err());
        assert!(merge(HashAlg::Sha256, &[0; 63], 16, 4).is_err());
        assert!(merge(HashAlg::Sha256, &[], 16, 0).is_err());
    }
}
