use super::luks::{CipherSpec, LuksCreateOptions, LuksHeader, HEADER_LEN};
use super::*;
use crate::ErrorKind;

fn specs() -> Vec<CipherSpec> {
    let mut v = Vec::new();
    for alg in [CipherAlg::Aes128, CipherAlg::Aes192, CipherAlg::Aes256] {
        for mode in [CipherMode::Ecb, CipherMode::Cbc, CipherMode::Xts] {
            for ivgen in [IvGen::Plain, IvGen::Plain64, IvGen::Essiv(HashAlg::Sha256)] {
                v.push(CipherSpec { alg, mode, ivgen, hash: HashAlg::Sha256 });
            }
        }
    }
    v
}

#[test]
fn aes_known_answer_through_ecb_and_cbc() {
    // FIPS-197 appendix C.1.
    let key: Vec<u8> = (0u8..16).collect();
    let mut sector = [0u8; SECTOR_SIZE];
    for (i, b) in sector[..16].iter_mut().enumerate() {
        *b = (i as u8) * 0x11;
    }
    let want = [0x69, 0xc4, 0xe0, 0xd8, 0x6a, 0x7b, 0x04, 0x30, 0xd8, 0xcd, 0xb7, 0x80, 0x70, 0xb4, 0xc5, 0x5a];
    for mode in [CipherMode::Ecb, CipherMode::Cbc] {
        let c = SectorCipher::new(CipherAlg::Aes128, mode, IvGen::Plain64, &key).unwrap();
        let mut s = sector;
        // Sector 0: plain64's IV is all zeros, so CBC's first block is plain AES.
        c.encrypt(0, &mut s).unwrap();
        assert_eq!(s[..16], want, "{mode:?}");
        c.decrypt(0, &mut s).unwrap();
        assert_eq!(s, sector);
    }
}

#[test]
fn every_combination_round_trips_and_depends_on_the_sector() {
    let data: Vec<u8> = (0..4 * SECTOR_SIZE).map(|i| (i * 7 % 251) as u8).collect();
    for spec in specs() {
        let key: Vec<u8> = (0..spec.key_bytes() as u8).map(|i| i.wrapping_mul(13)).collect();
        let c = spec.cipher(&key).unwrap();
        let mut buf = data.clone();
        c.encrypt(100, &mut buf).unwrap();
        assert_ne!(buf, data, "{spec:?}");
        let mut other = data.clone();
        c.encrypt(101, &mut other).unwrap();
        if spec.mode != CipherMode::Ecb {
            assert_ne!(buf[..SECTOR_SIZE], other[..SECTOR_SIZE], "{spec:?}: IV depends on the sector");
        }
        // Sector by sector gives what the whole buffer gave.
        let mut second = data[SECTOR_SIZE..2 * SECTOR_SIZE].to_vec();
        c.encrypt(101, &mut second).unwrap();
        assert_eq!(second, buf[SECTOR_SIZE..2 * SECTOR_SIZE], "{spec:?}");
        c.decrypt(100, &mut buf).unwrap();
        assert_eq!(buf, data, "{spec:?}");
    }
}

#[test]
fn plain_wraps_at_32_bits_and_plain64_does_not() {
    let key = [7u8; 32];
    let data = [1u8; SECTOR_SIZE];
    let enc = |ivgen, sector| {
        let c = SectorCipher::new(CipherAlg::Aes128, CipherMode::Xts, ivgen, &key).unwrap();
        let mut b = data;
        c.encrypt(sector, &mut b).unwrap();
        b
    };
    assert_eq!(enc(IvGen::Plain, 5), enc(IvGen::Plain, (1 << 32) + 5));
    assert_ne!(enc(IvGen::Plain64, 5), enc(IvGen::Plain64, (1 << 32) + 5));
    assert_eq!(enc(IvGen::Plain, 5), enc(IvGen::Plain64, 5));
}

#[test]
fn wrong_sizes_are_errors() {
    assert!(SectorCipher::new(CipherAlg::Aes256, CipherMode::Xts, IvGen::Plain64, &[0; 32]).is_err());
    assert!(SectorCipher::new(CipherAlg::Aes256, CipherMode::Cbc, IvGen::Essiv(HashAlg::Sha1), &[0; 32]).is_err());
    let c = SectorCipher::new(CipherAlg::Aes128, CipherMode::Cbc, IvGen::Plain64, &[0; 16]).unwrap();
    assert!(c.encrypt(0, &mut [0u8; 100]).is_err());
}

fn quick(spec: CipherSpec) -> LuksCreateOptions {
    LuksCreateOptions { spec, iter_time_ms: 1 }
}

#[test]
fn created_volumes_unlock_with_their_passphrase_only() {
    for spec in [
        LuksCreateOptions::default().spec,
        CipherSpec {
            alg: CipherAlg::Aes128,
            mode: CipherMode::Cbc,
            ivgen: IvGen::Essiv(HashAlg::Sha256),
            hash: HashAlg::Sha1,
        },
        CipherSpec { alg: CipherAlg::Aes192, mode: CipherMode::Cbc, ivgen: IvGen::Plain, hash: HashAlg::Sha512 },
    ] {
        let v = quick(spec).create(b"secret").unwrap();
        let h = LuksHeader::parse(&v.area, v.area.len() as u64).unwrap();
        assert_eq!(h, v.header);
        assert_eq!(h.spec, spec);
        let mut read = |off: u64, buf: &mut [u8]| {
            buf.copy_from_slice(&v.area[off as usize..off as usize + buf.len()]);
            Ok(())
        };
        let (slot, key) = h.unlock(b"secret", &mut read).unwrap();
        assert_eq!((slot, &key[..]), (0, &v.key[..]));
        let e = h.unlock(b"Secret", &mut read).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::BadKey);
        assert_eq!(e.message(), "Invalid password, cannot unlock any keyslot");
    }
}

#[test]
fn default_layout_is_qemus() {
    let v = quick(LuksCreateOptions::default().spec).create(b"x").unwrap();
    let h = &v.header;
    assert_eq!(
        (h.cipher_name.as_str(), h.cipher_mode.as_str(), h.hash_spec.as_str()),
        ("aes", "xts-plain64", "sha256")
    );
    assert_eq!(h.key_bytes, 64);
    let offsets: Vec<u32> = h.slots.iter().map(|s| s.key_offset).collect();
    assert_eq!(offsets, [8, 512, 1016, 1520, 2024, 2528, 3032, 3536]);
    assert_eq!(h.payload_offset, 4040);
    assert!(h.slots[0].active && h.slots[1..].iter().all(|s| !s.active));
    assert!(h.slots[0].iterations >= luks::MIN_SLOT_ITERATIONS);
    assert!(h.mk_digest_iterations >= luks::MIN_DIGEST_ITERATIONS);
}

#[test]
fn damaged_headers_are_errors_not_panics() {
    let v = quick(LuksCreateOptions::default().spec).create(b"x").unwrap();
    let len = v.area.len() as u64;
    assert!(LuksHeader::parse(&v.area[..HEADER_LEN - 1], len).is_err());
    assert!(LuksHeader::parse(&v.area, 4096).is_err(), "key material outside the area");
    for at in 0..HEADER_LEN {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut b = v.area[..HEADER_LEN].to_vec();
            b[at] ^= flip;
            if let Ok(h) = LuksHeader::parse(&b, len) {
                // Whatever parses stays inside the area.
                for i in 0..luks::KEY_SLOTS {
                    assert!(h.material_range(i).end <= len);
                }
                assert!(h.slots.iter().all(|s| !s.active || s.iterations <= luks::MAX_ITERATIONS));
            }
        }
    }
    let mut b = v.area[..HEADER_LEN].to_vec();
    b[212..216].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(LuksHeader::parse(&b, len).unwrap_err().message().contains("iteration count"));
}

#[test]
fn legacy_aes_is_aes128_cbc_keyed_by_the_passphrase() {
    let c = legacy_aes_cipher(b"0123456789abcdefXYZ").unwrap();
    let same = SectorCipher::new(CipherAlg::Aes128, CipherMode::Cbc, IvGen::Plain64, b"0123456789abcdef").unwrap();
    let (mut a, mut b) = ([3u8; SECTOR_SIZE], [3u8; SECTOR_SIZE]);
    c.encrypt(9, &mut a).unwrap();
    same.encrypt(9, &mut b).unwrap();
    assert_eq!(a, b);
    let short = legacy_aes_cipher(b"pw").unwrap();
    let padded =
        SectorCipher::new(CipherAlg::Aes128, CipherMode::Cbc, IvGen::Plain64, b"pw\0\0\0\0\0\0\0\0\0\0\0\0\0\0")
            .unwrap();
    let (mut a, mut b) = ([3u8; SECTOR_SIZE], [3u8; SECTOR_SIZE]);
    short.encrypt(1, &mut a).unwrap();
    padded.encrypt(1, &mut b).unwrap();
    assert_eq!(a, b);
}

#[test]
fn text_fields_that_fill_their_field_round_trip() {
    // Found by the luks_header fuzz target: a UUID of 40 characters has no terminator.
    let v = quick(LuksCreateOptions::default().spec).create(b"x").unwrap();
    let mut b = v.area[..HEADER_LEN].to_vec();
    b[168..208].copy_from_slice(&[b'a'; 40]);
    let h = LuksHeader::parse(&b, v.area.len() as u64).unwrap();
    assert_eq!(h.uuid.len(), 40);
    assert_eq!(LuksHeader::parse(&h.encode(), v.area.len() as u64).unwrap(), h);
}

#[test]
fn xts_matches_the_xts_mode_crate() {
    use aes::cipher::{array::Array, KeyInit};
    use xts_mode::Xts128;
    let data: Vec<u8> = (0..4 * SECTOR_SIZE).map(|i| (i * 31 % 253) as u8).collect();
    for key_len in [32usize, 48, 64] {
        let key: Vec<u8> = (0..key_len as u8).map(|i| i.wrapping_mul(7).wrapping_add(3)).collect();
        let alg = CipherAlg::from_key_len(key_len / 2).unwrap();
        let ours = SectorCipher::new(alg, CipherMode::Xts, IvGen::Plain64, &key).unwrap();
        let mut got = data.clone();
        ours.encrypt(0x1234_5678_9abc, &mut got).unwrap();
        let mut want = data.clone();
        let (k1, k2) = key.split_at(key_len / 2);
        let tweak = |n: u64| {
            let mut t = [0u8; 16];
            t[..8].copy_from_slice(&n.to_le_bytes());
            Array::from(t)
        };
        for (i, sector) in want.chunks_exact_mut(SECTOR_SIZE).enumerate() {
            let n = 0x1234_5678_9abc + i as u64;
            match key_len {
                32 => Xts128::new(aes::Aes128::new_from_slice(k1).unwrap(), aes::Aes128::new_from_slice(k2).unwrap())
                    .encrypt_sector(sector, tweak(n)),
                48 => Xts128::new(aes::Aes192::new_from_slice(k1).unwrap(), aes::Aes192::new_from_slice(k2).unwrap())
                    .encrypt_sector(sector, tweak(n)),
                _ => Xts128::new(aes::Aes256::new_from_slice(k1).unwrap(), aes::Aes256::new_from_slice(k2).unwrap())
                    .encrypt_sector(sector, tweak(n)),
            }
        }
        assert!(got == want, "XTS with a {key_len}-byte key differs from xts-mode");
        ours.decrypt(0x1234_5678_9abc, &mut got).unwrap();
        assert_eq!(got, data);
    }
}
