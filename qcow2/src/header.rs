//! The qcow2 header and its extensions: parsing, validation and encoding.
//!
//! The header lives in the first cluster: the fixed fields (72 bytes for version 2, at least 104
//! for version 3, 112 with the compression type), then header extensions, then the backing file
//! name. Parsing checks every field against the limits in [`crate::limits`] and the file size
//! before anything is allocated. Encoding reproduces QEMU's layout byte for byte (extension order,
//! feature table only for version 3 with clusters above 4 KiB), and keeps unknown header fields and
//! unknown extensions so that rewriting a header never loses what another implementation stored.
//!
//! Header updates that touch only fixed fields are written as the first 512-byte sector (atomic on
//! every device); changes to extensions or the backing file name rewrite the whole first cluster.

use blockdev::{Error, Result};

use crate::limits::*;

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;

/// Incompatible feature bits.
pub mod incompat {
    /// Refcounts may be inconsistent (lazy refcounts in use).
    pub const DIRTY: u64 = 1 << 0;
    /// The image is corrupt and must not be written.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// A non-zlib compression type is used.
    pub const COMPRESSION: u64 = 1 << 3;
    /// Extended L2 entries (subclusters).
    pub const EXTL2: u64 = 1 << 4;
    /// Every bit vdisk understands.
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTL2;
}

/// Compatible feature bits.
pub mod compat {
    /// Lazy refcounts.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits.
pub mod autoclear {
    /// The bitmaps extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file is a valid raw image by itself.
    pub const DATA_FILE_RAW: u64 = 1 << 1;
    /// Every bit vdisk understands.
    pub const KNOWN: u64 = BITMAPS | DATA_FILE_RAW;
}

/// Header extension magic numbers.
pub mod ext {
    /// End of the extension area.
    pub const END: u32 = 0;
    /// Backing file format name.
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Feature name table.
    pub const FEATURE_TABLE: u32 = 0x6803_f857;
    /// Persistent bitmaps.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// Full disk encryption header pointer.
    pub const CRYPTO: u32 = 0x0537_be77;
    /// External data file name.
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// Compression type of compressed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (qemu calls it zlib).
    Zlib,
    /// One zstd frame per cluster.
    Zstd,
}

impl CompressionType {
    /// qemu's name.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// The fixed header fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Compatible feature bits.
    pub compatible: u64,
    /// Autoclear feature bits.
    pub autoclear: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Compression type byte (offset 104), 0 when absent.
    pub compression_type: u8,
    /// Header bytes past the fields vdisk knows (kept verbatim, up to `header_length`).
    pub unknown_fields: Vec<u8>,
}

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// Name.
    pub name: String,
}

/// The header extensions and the backing file name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    /// Backing file name (from the end of the header cluster).
    pub backing_file: Option<String>,
    /// Backing file format extension.
    pub backing_format: Option<String>,
    /// External data file name extension.
    pub data_file: Option<String>,
    /// Encryption header pointer: (offset, length).
    pub crypto: Option<(u64, u64)>,
    /// Where the persistent bitmaps' directory is (only when the autoclear bit vouches for it).
    pub bitmaps: Option<crate::bitmap::BitmapsExt>,
    /// A bitmaps extension was found without its autoclear bit: a program that does not know
    /// bitmaps changed the image, so they are stale and dropped (the header is rewritten without
    /// them at the first write; their clusters leak).
    pub stale_bitmaps: bool,
    /// Feature name table found in the image (only used for messages).
    pub feature_table: Vec<FeatureName>,
    /// Extensions vdisk does not know: (magic, data), in file order.
    pub unknown: Vec<(u32, Vec<u8>)>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Whether L2 entries are extended (subclusters).
    pub fn extended_l2(&self) -> bool {
        self.incompatible & incompat::EXTL2 != 0
    }

    /// The compression type.
    pub fn compression(&self) -> CompressionType {
        if self.compression_type == 1 {
            CompressionType::Zstd
        } else {
            CompressionType::Zlib
        }
    }

    /// Length of the fixed part as it is encoded.
    pub fn header_length(&self) -> u32 {
        if self.version == 2 {
            72
        } else {
            112 + self.unknown_fields.len() as u32
        }
    }

    /// Parses and validates the fixed fields from the start of the image (at least 512 bytes or
    /// the whole file if shorter). Checks that need the file size are done by the caller.
    pub fn parse(b: &[u8]) -> Result<Header> {
        if b.len() < 72 || be32(b, 0) != MAGIC {
            return Err(Error::invalid_image("Image is not in qcow2 format"));
        }
        let version = be32(b, 4);
        if !(2..=3).contains(&version) {
            return Err(Error::unsupported(format!("Unsupported qcow2 version {version}")));
        }
        let cluster_bits = be32(b, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::invalid_image(format!("Unsupported cluster size: 2^{cluster_bits}")));
        }
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(b, 24),
            crypt_method: be32(b, 32),
            l1_size: be32(b, 36),
            l1_table_offset: be64(b, 40),
            refcount_table_offset: be64(b, 48),
            refcount_table_clusters: be32(b, 56),
            nb_snapshots: be32(b, 60),
            snapshots_offset: be64(b, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            compression_type: 0,
            unknown_fields: Vec::new(),
        };
        if version == 3 {
            if b.len() < 104 {
                return Err(Error::invalid_image("qcow2 header too short"));
            }
            h.incompatible = be64(b, 72);
            h.compatible = be64(b, 80);
            h.autoclear = be64(b, 88);
            h.refcount_order = be32(b, 96);
            let header_length = be32(b, 100) as u64;
            if header_length < 104 {
                return Err(Error::invalid_image("qcow2 header too short"));
            }
            if header_length > h.cluster_size() {
                return Err(Error::invalid_image("qcow2 header exceeds cluster size"));
            }
            if header_length as usize > b.len() {
                return Err(Error::invalid_image("qcow2 header exceeds the file"));
            }
            if header_length > 104 {
                h.compression_type = b[104];
            }
            if header_length > 112 {
                h.unknown_fields = b[112..header_length as usize].to_vec();
            }
        }
        if h.refcount_order > 6 {
            return Err(Error::invalid_image("Reference count entry width too large; may not exceed 64 bits"));
        }
        h.validate_compression()?;
        Ok(h)
    }

    fn validate_compression(&self) -> Result<()> {
        match self.compression_type {
            0 | 1 => {}
            t => return Err(Error::unsupported(format!("Unknown compression type '{t}'"))),
        }
        let flag = self.incompatible & incompat::COMPRESSION != 0;
        if self.compression_type != 0 && !flag {
            return Err(Error::invalid_image("Compression type incompatible feature bit must be set"));
        }
        if self.compression_type == 0 && flag {
            return Err(Error::invalid_image("Compression type incompatible feature bit must not be set"));
        }
        Ok(())
    }

    /// The fixed fields, encoded (72 bytes for version 2, `header_length` for version 3).
    pub fn encode_fixed(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.header_length() as usize);
        b.extend_from_slice(&MAGIC.to_be_bytes());
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes()); // backing file offset, set by encode_cluster
        b.extend_from_slice(&0u32.to_be_bytes()); // backing file size
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&self.crypt_method.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        b.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            b.extend_from_slice(&self.incompatible.to_be_bytes());
            b.extend_from_slice(&self.compatible.to_be_bytes());
            b.extend_from_slice(&self.autoclear.to_be_bytes());
            b.extend_from_slice(&self.refcount_order.to_be_bytes());
            b.extend_from_slice(&self.header_length().to_be_bytes());
            b.push(self.compression_type);
            b.extend_from_slice(&[0u8; 7]);
            b.extend_from_slice(&self.unknown_fields);
        }
        b
    }

    /// The whole first cluster: fixed fields, extensions, backing file name. Fails with ENOSPC
    /// (as qemu does) when they do not fit.
    pub fn encode_cluster(&self, exts: &Extensions) -> Result<Vec<u8>> {
        let cs = self.cluster_size() as usize;
        let mut b = self.encode_fixed();
        let add = |b: &mut Vec<u8>, magic: u32, data: &[u8]| {
            b.extend_from_slice(&magic.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len() + (8 - data.len() % 8) % 8, 0);
        };
        if let Some(f) = &exts.backing_format {
            add(&mut b, ext::BACKING_FORMAT, f.as_bytes());
        }
        if self.incompatible & incompat::DATA_FILE != 0 {
            if let Some(f) = &exts.data_file {
                add(&mut b, ext::DATA_FILE, f.as_bytes());
            }
        }
        if let Some((off, len)) = exts.crypto {
            let mut d = off.to_be_bytes().to_vec();
            d.extend_from_slice(&len.to_be_bytes());
            add(&mut b, ext::CRYPTO, &d);
        }
        if self.version >= 3 && self.cluster_size() > 4096 {
            add(&mut b, ext::FEATURE_TABLE, &qemu_feature_table());
        }
        if let Some(bm) = &exts.bitmaps {
            add(&mut b, ext::BITMAPS, &bm.encode());
        }
        for (magic, data) in &exts.unknown {
            add(&mut b, *magic, data);
        }
        add(&mut b, ext::END, &[]);
        if let Some(name) = &exts.backing_file {
            let off = b.len() as u64;
            b.extend_from_slice(name.as_bytes());
            b[8..16].copy_from_slice(&off.to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        }
        if b.len() > cs {
            return Err(Error::from_errno("write header", libc::ENOSPC));
        }
        b.resize(cs, 0);
        Ok(b)
    }
}

/// The feature name table qemu writes (8 entries of 48 bytes).
fn qemu_feature_table() -> Vec<u8> {
    const FEATURES: [(u8, u8, &str); 8] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let mut v = Vec::with_capacity(FEATURES.len() * 48);
    for (kind, bit, name) in FEATURES {
        let mut e = [0u8; 48];
        e[0] = kind;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        v.extend_from_slice(&e);
    }
    v
}

/// Parses the header extensions in `cluster` (the first cluster) after the fixed header, and the
/// backing file name. `unknown_features` lets the feature table be read even when the caller will
/// refuse the image.
pub fn parse_extensions(h: &Header, cluster: &[u8], backing_offset: u64, backing_size: u32) -> Result<Extensions> {
    let cs = h.cluster_size() as usize;
    let end = if backing_offset != 0 { (backing_offset as usize).min(cs) } else { cs }.min(cluster.len());
    let mut exts = Extensions::default();
    let mut off = if h.version == 2 { 72 } else { h.header_length() as usize };
    loop {
        if off + 8 > end {
            break; // no room for another extension header: treat as the end, as qemu does
        }
        let magic = be32(cluster, off);
        let len = be32(cluster, off + 4) as usize;
        off += 8;
        if off > end || len > end - off {
            return Err(Error::invalid_image("Header extension too large"));
        }
        let data = &cluster[off..off + len];
        match magic {
            ext::END => break,
            ext::BACKING_FORMAT => {
                if len >= 16 {
                    return Err(Error::invalid_image(format!("ERROR: ext_backing_format: len={len} too large (>=16)")));
                }
                exts.backing_format = Some(String::from_utf8_lossy(data).into_owned());
            }
            ext::FEATURE_TABLE => {
                // A later table replaces an earlier one; a short last entry is zero-padded and
                // the table ends at the first entry without a name (as qemu reads it).
                exts.feature_table.clear();
                let mut padded = data.to_vec();
                padded.resize(len.div_ceil(48) * 48, 0);
                for e in padded.chunks_exact(48) {
                    if e[2] == 0 {
                        break;
                    }
                    let name_len = e[2..].iter().position(|&c| c == 0).unwrap_or(46);
                    exts.feature_table.push(FeatureName {
                        kind: e[0],
                        bit: e[1],
                        name: String::from_utf8_lossy(&e[2..2 + name_len]).into_owned(),
                    });
                }
            }
            ext::CRYPTO => {
                if h.crypt_method != 2 {
                    return Err(Error::invalid_image(
                        "CRYPTO header extension only expected with LUKS encryption method",
                    ));
                }
                if len != 16 {
                    return Err(Error::invalid_image(format!(
                        "CRYPTO header extension size {len}, but expected size 16"
                    )));
                }
                let (o, l) = (be64(data, 0), be64(data, 8));
                if o % h.cluster_size() != 0 {
                    return Err(Error::invalid_image(format!(
                        "Encryption header offset '{o}' is not a multiple of cluster size '{}'",
                        h.cluster_size()
                    )));
                }
                exts.crypto = Some((o, l));
            }
            ext::BITMAPS => {
                if len != crate::bitmap::BitmapsExt::LEN {
                    return Err(Error::invalid_image("bitmaps_ext: Invalid extension length"));
                }
                if h.autoclear & autoclear::BITMAPS == 0 {
                    exts.stale_bitmaps = true;
                } else {
                    exts.bitmaps = Some(crate::bitmap::BitmapsExt::parse(data)?);
                }
            }
            ext::DATA_FILE => exts.data_file = Some(String::from_utf8_lossy(data).into_owned()),
            _ => exts.unknown.push((magic, data.to_vec())),
        }
        off += len.div_ceil(8) * 8;
    }
    if backing_offset != 0 {
        if backing_offset > h.cluster_size() {
            return Err(Error::invalid_image("Invalid backing file offset"));
        }
        let max = MAX_BACKING_NAME.min(h.cluster_size() - backing_offset);
        if backing_size as u64 > max {
            return Err(Error::invalid_image("Backing file name too long"));
        }
        let start = backing_offset as usize;
        let stop = start + backing_size as usize;
        if stop > cluster.len() {
            return Err(Error::invalid_image("Backing file name too long"));
        }
        // qemu keeps the name as a C string: it ends at the first NUL, and an empty name means
        // no backing file.
        let raw = &cluster[start..stop];
        let name = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
        if !name.is_empty() {
            exts.backing_file = Some(String::from_utf8_lossy(name).into_owned());
        }
    }
    Ok(exts)
}

/// qemu's message for unknown incompatible bits, naming them from the feature table.
pub fn unsupported_features_message(exts: &Extensions, mut mask: u64) -> String {
    let mut names = Vec::new();
    for f in &exts.feature_table {
        if f.kind == 0 && f.bit < 64 && mask & (1 << f.bit) != 0 {
            names.push(f.name.chars().take(46).collect::<String>());
            mask &= !(1 << f.bit);
        }
    }
    if mask != 0 {
        names.push(format!("Unknown incompatible feature: {mask:x}"));
    }
    format!("Unsupported qcow2 feature(s): {}", names.join(", "))
}

/// The backing file offset and size fields of an encoded header.
pub fn backing_fields(b: &[u8]) -> (u64, u32) {
    (be64(b, 8), be32(b, 16))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3() -> Header {
        Header {
            version: 3,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            compression_type: 0,
            unknown_fields: vec![],
        }
    }

    #[test]
    fn encodes_like_qemu_and_parses_back() {
        let h = v3();
        let mut exts = Extensions::default();
        let c = h.encode_cluster(&exts).unwrap();
        assert_eq!(c.len(), 65536);
        assert_eq!(&c[0x60..0x68], &[0, 0, 0, 4, 0, 0, 0, 0x70]);
        assert_eq!(&c[0x70..0x78], &[0x68, 0x03, 0xf8, 0x57, 0, 0, 1, 0x80]);
        assert_eq!(&c[0x7a..0x83], b"dirty bit");
        let p = Header::parse(&c).unwrap();
        assert_eq!(p, h);
        exts.backing_file = Some("base.img".into());
        exts.backing_format = Some("raw".into());
        let c = h.encode_cluster(&exts).unwrap();
        let (bo, bs) = backing_fields(&c);
        let e = parse_extensions(&p, &c, bo, bs).unwrap();
        assert_eq!(e.backing_file.as_deref(), Some("base.img"));
        assert_eq!(e.backing_format.as_deref(), Some("raw"));
        assert_eq!(e.feature_table.len(), 8);
    }

    #[test]
    fn rejects_bad_fixed_fields() {
        let mut c = v3().encode_cluster(&Extensions::default()).unwrap();
        c[23] = 8;
        assert_eq!(Header::parse(&c).unwrap_err().message(), "Unsupported cluster size: 2^8");
        c[23] = 16;
        c[7] = 4;
        assert_eq!(Header::parse(&c).unwrap_err().message(), "Unsupported qcow2 version 4");
        c[7] = 3;
        c[99] = 7;
        assert!(Header::parse(&c).unwrap_err().message().starts_with("Reference count entry width too large"));
        c[99] = 4;
        c[103] = 100;
        assert_eq!(Header::parse(&c).unwrap_err().message(), "qcow2 header too short");
        assert_eq!(Header::parse(b"QFI").unwrap_err().message(), "Image is not in qcow2 format");
    }

    #[test]
    fn extension_bounds_are_checked() {
        let h = v3();
        let mut c = h.encode_cluster(&Extensions::default()).unwrap();
        // An extension claiming to be longer than the cluster.
        c[0x74..0x78].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
        assert_eq!(parse_extensions(&h, &c, 0, 0).unwrap_err().message(), "Header extension too large");
        let mut c = h.encode_cluster(&Extensions::default()).unwrap();
        c[8..16].copy_from_slice(&0x20000u64.to_be_bytes());
        assert_eq!(parse_extensions(&h, &c, 0x20000, 4).unwrap_err().message(), "Invalid backing file offset");
        assert_eq!(parse_extensions(&h, &c, 0x1000, 2000).unwrap_err().message(), "Backing file name too long");
    }

    #[test]
    fn unknown_features_are_named() {
        let mut e = Extensions::default();
        e.feature_table.push(FeatureName { kind: 0, bit: 63, name: "test feature".into() });
        assert_eq!(
            unsupported_features_message(&e, (1 << 63) | (1 << 40)),
            "Unsupported qcow2 feature(s): test feature, Unknown incompatible feature: 10000000000"
        );
    }
}
