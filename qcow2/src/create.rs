//! Creating images with qemu-img's `-o` options and producing qemu's byte layout.
//!
//! Like qemu, creation writes a minimal header, a one-cluster refcount table and one refcount block
//! (clusters 0, 1 and 2), then opens that image with the normal driver and grows it to its size
//! (which places the L1 table at cluster 3), sets the backing file and preallocates. The result is
//! byte for byte what `qemu-img create` writes for the same options.

use std::sync::Arc;

use blockdev::options::{CreateOptions, OptionKind, OptionSpec};
use blockdev::{write_all_at, Chain, Error, OpenOptions, Opener, Prealloc, ResizeOptions, Result, Storage};

use crate::cache::set_u64;
use crate::driver::Qcow2;
use crate::header::{autoclear, compat, incompat, Header};
use crate::limits::{MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};

/// qcow2's create options in qemu's order (this order is the "Formatting" line's).
pub const CREATE_OPTIONS: &[OptionSpec] = &[
    OptionSpec::new(
        "encryption",
        OptionKind::Bool,
        "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
    ),
    OptionSpec::new("encrypt.format", OptionKind::Str, "Encrypt the image, format choices: 'aes', 'luks'"),
    OptionSpec::new("encrypt.key-secret", OptionKind::Str, "ID of secret providing qcow AES key or LUKS passphrase"),
    OptionSpec::new("encrypt.cipher-alg", OptionKind::Str, "Name of encryption cipher algorithm"),
    OptionSpec::new("encrypt.cipher-mode", OptionKind::Str, "Name of encryption cipher mode"),
    OptionSpec::new("encrypt.ivgen-alg", OptionKind::Str, "Name of IV generator algorithm"),
    OptionSpec::new("encrypt.ivgen-hash-alg", OptionKind::Str, "Name of IV generator hash algorithm"),
    OptionSpec::new("encrypt.hash-alg", OptionKind::Str, "Name of encryption hash algorithm"),
    OptionSpec::new("encrypt.iter-time", OptionKind::Number, "Time to spend in PBKDF in milliseconds"),
    OptionSpec::with_default("cluster_size", OptionKind::Size, "qcow2 cluster size", "65536"),
    OptionSpec::with_default("extended_l2", OptionKind::Bool, "Extended L2 tables", "off"),
    OptionSpec::new(
        "preallocation",
        OptionKind::Str,
        "Preallocation mode (allowed values: off, metadata, falloc, full)",
    ),
    OptionSpec::with_default(
        "compression_type",
        OptionKind::Str,
        "Compression method used for image cluster compression",
        "zlib",
    ),
    OptionSpec::new("size", OptionKind::Size, "Virtual disk size"),
    OptionSpec::new("compat", OptionKind::Str, "Compatibility level (v2 [0.10] or v3 [1.1])"),
    OptionSpec::new("backing_file", OptionKind::Str, "File name of a base image"),
    OptionSpec::new("backing_fmt", OptionKind::Str, "Image format of the base image"),
    OptionSpec::new("data_file", OptionKind::Str, "File name of an external data file"),
    OptionSpec::new("data_file_raw", OptionKind::Bool, "The external data file must stay valid as a raw image"),
    OptionSpec::with_default("lazy_refcounts", OptionKind::Bool, "Postpone refcount updates", "off"),
    OptionSpec::with_default("refcount_bits", OptionKind::Number, "Width of a reference count entry in bits", "16"),
];

/// Everything `create` needs, validated.
#[derive(Debug, Clone)]
pub struct Params {
    /// Virtual size (rounded up to 512).
    pub size: u64,
    /// 2 or 3.
    pub version: u32,
    /// log2 cluster size.
    pub cluster_bits: u32,
    /// log2 refcount width.
    pub refcount_order: u32,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// Lazy refcounts.
    pub lazy_refcounts: bool,
    /// zstd instead of zlib.
    pub zstd: bool,
    /// Preallocation.
    pub prealloc: Prealloc,
    /// Backing file and format.
    pub backing: Option<(String, Option<String>)>,
    /// External data file name and the raw flag.
    pub data_file: Option<(String, bool)>,
    /// Encryption.
    pub encryption: Option<Encryption>,
}

/// How a new image is encrypted.
#[derive(Debug, Clone)]
pub enum Encryption {
    /// Legacy AES keyed by the passphrase.
    Aes(Option<blockdev::crypto::Secret>),
    /// LUKS with these options and passphrase.
    Luks(blockdev::crypto::luks::LuksCreateOptions, Option<blockdev::crypto::Secret>),
}

/// The LUKS options qcow2 takes under `encrypt.` (legacy AES takes none of them).
const LUKS_ONLY: &[&str] = &["cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg", "hash-alg", "iter-time"];

/// The encryption `opts` ask for, with qemu's checks and messages; the passphrase is required
/// unless `measure`.
fn encryption_for(opts: &CreateOptions, measure: bool) -> Result<Option<Encryption>> {
    let bad = |m: String| Error::invalid_argument(m);
    let alias = opts.get_bool("encryption")?;
    let format = match (opts.get("encrypt.format"), alias) {
        (Some(_), Some(_)) => {
            return Err(bad("'encrypt.format' and its alias 'encryption' can't be used at the same time".into()))
        }
        (Some(f), None) => f.to_string(),
        (None, Some(true)) => "aes".to_string(),
        (None, Some(false) | None) => {
            if opts.entries().iter().any(|(k, _)| k.starts_with("encrypt.")) {
                return Err(bad("Parameter 'encrypt.format' is missing".into()));
            }
            return Ok(None);
        }
    };
    let secret = opts.secret("encrypt.key-secret")?;
    if secret.is_none() && !measure {
        return Err(Error::new(blockdev::ErrorKind::NeedsKey, "Parameter 'encrypt.key-secret' is required for cipher"));
    }
    match format.as_str() {
        "aes" => {
            if let Some(k) = LUKS_ONLY.iter().find(|k| opts.has(&format!("encrypt.{k}"))) {
                return Err(bad(format!("Parameter 'encrypt.{k}' is unexpected")));
            }
            Ok(Some(Encryption::Aes(secret)))
        }
        "luks" => Ok(Some(Encryption::Luks(blockdev::crypto::volume::luks_create_options(opts, "encrypt.")?, secret))),
        f => Err(bad(format!("Parameter 'format' does not accept value '{f}'"))),
    }
}

/// Reads and validates the create options with qemu's messages.
pub fn params(opts: &CreateOptions) -> Result<Params> {
    params_for(opts, false)
}

/// Validates options; `measure` words two messages differently (qemu parses its options apart).
fn params_for(opts: &CreateOptions, measure: bool) -> Result<Params> {
    let bad = |m: &str| Error::invalid_argument(m.to_string());
    let size = opts.get_size("size")?.unwrap_or(0).div_ceil(512) * 512;
    let version = match opts.get("compat") {
        None | Some("1.1") | Some("v3") => 3,
        Some("0.10") | Some("v2") => 2,
        Some(v) if measure => return Err(bad(&format!("Invalid compatibility level: '{v}'"))),
        Some(v) => return Err(bad(&format!("Parameter 'version' does not accept value '{v}'"))),
    };
    let cluster_size = opts.get_size("cluster_size")?.unwrap_or(65536);
    if !cluster_size.is_power_of_two() || !(1 << MIN_CLUSTER_BITS..=1 << MAX_CLUSTER_BITS).contains(&cluster_size) {
        return Err(bad("Cluster size must be a power of two between 512 and 2048k"));
    }
    let cluster_bits = cluster_size.trailing_zeros();
    let extended_l2 = opts.get_bool("extended_l2")?.unwrap_or(false);
    if extended_l2 {
        if version < 3 {
            return Err(bad("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)"));
        }
        if cluster_bits < 14 {
            return Err(bad("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"));
        }
    }
    let prealloc = match opts.get("preallocation") {
        None => Prealloc::Off,
        Some(v) => {
            Prealloc::parse(v).ok_or_else(|| bad(&format!("Parameter 'preallocation' does not accept value '{v}'")))?
        }
    };
    let backing = opts.get("backing_file").map(|b| (b.to_string(), opts.get("backing_fmt").map(str::to_string)));
    if backing.is_some() && prealloc != Prealloc::Off && !extended_l2 {
        return Err(bad("Backing file and preallocation can only be used at the same time if extended_l2 is on"));
    }
    if backing.is_none() && opts.has("backing_fmt") {
        return Err(bad("Backing format cannot be used without backing file"));
    }
    let lazy_refcounts = opts.get_bool("lazy_refcounts")?.unwrap_or(false);
    if lazy_refcounts && version < 3 {
        return Err(bad(
            "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)",
        ));
    }
    let refcount_bits = opts.get_number("refcount_bits")?.unwrap_or(16);
    if refcount_bits > 64 || !refcount_bits.is_power_of_two() {
        return Err(bad("Refcount width must be a power of two and may not exceed 64 bits"));
    }
    if version < 3 && refcount_bits != 16 {
        let hint = if measure { "compat=1.1" } else { "version=v3" };
        return Err(bad(&format!(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above (use {hint} or greater)"
        )));
    }
    let data_file_raw = opts.get_bool("data_file_raw")?.unwrap_or(false);
    let data_file = opts.get("data_file").map(|d| (d.to_string(), data_file_raw));
    if data_file_raw && data_file.is_none() {
        return Err(bad("data-file-raw requires data-file"));
    }
    if data_file_raw && backing.is_some() {
        return Err(bad("Backing file and data-file-raw cannot be used at the same time"));
    }
    // A raw data file must read the same as the image, so every guest cluster maps 1:1 onto it
    // from the start: qemu forces metadata preallocation (create only; measure is unchanged).
    let prealloc = if data_file_raw && prealloc == Prealloc::Off && !measure { Prealloc::Metadata } else { prealloc };
    if data_file.is_some() && version < 3 {
        return Err(bad(
            "External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
        ));
    }
    let zstd = match opts.get("compression_type") {
        None | Some("zlib") => false,
        Some("zstd") => true,
        Some(v) => return Err(bad(&format!("Parameter 'compression-type' does not accept value '{v}'"))),
    };
    if zstd && version < 3 {
        return Err(bad("Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)"));
    }
    let encryption = encryption_for(opts, measure)?;
    Ok(Params {
        size,
        version,
        cluster_bits,
        refcount_order: refcount_bits.trailing_zeros(),
        extended_l2,
        lazy_refcounts,
        zstd,
        prealloc,
        backing,
        data_file,
        encryption,
    })
}

/// The options `measure` accepts, validated as for `create`.
pub fn params_for_measure(opts: &CreateOptions) -> Result<Params> {
    params_for(opts, true)
}

/// Creates an image at `filename`.
pub fn create(filename: &str, opts: &CreateOptions, opener: &dyn Opener) -> Result<()> {
    let p = params(opts)?;
    let mut file_opts = CreateOptions::new();
    file_opts.set("size", "0");
    let file = opener.create_storage(filename, &file_opts)?;
    // As qemu, no half-made image is left behind: the files are removed again on failure.
    blockdev::delete_on_error(opener, filename, || match &p.data_file {
        Some((name, _)) => {
            let mut o = CreateOptions::new();
            o.set("size", "0");
            let data = opener.create_storage(name, &o)?;
            blockdev::delete_on_error(opener, name, || build(file.clone(), Some(data), &p))
        }
        None => build(file.clone(), None, &p),
    })
}

/// Writes the image described by `p` into the freshly created `file` (and `data`).
pub(crate) fn build(file: Arc<dyn Storage>, data: Option<Arc<dyn Storage>>, p: &Params) -> Result<()> {
    write_initial(file.as_ref(), p)?;
    let q = Qcow2::open(
        file.clone(),
        &OpenOptions { read_only: false, no_backing: true, ..OpenOptions::default() },
        &Chain::new(),
        &DataOnly { data: data.clone() },
    )?;
    {
        let mut m = q.lock();
        if let Some((name, _)) = &p.data_file {
            m.exts.data_file = Some(name.clone());
        }
        // The full header (feature table, data file name) as qemu writes it after creation.
        m.write_header(file.as_ref(), true)?;
    }
    q.resize_image(p.size, &ResizeOptions { prealloc: Prealloc::Off, allow_shrink: false })?;
    if let Some((name, fmt)) = &p.backing {
        let mut m = q.lock();
        m.exts.backing_file = Some(name.clone());
        m.exts.backing_format = fmt.clone();
        m.write_header(file.as_ref(), true)?;
    }
    let q = match &p.encryption {
        None => q,
        Some(e) => set_up_encryption(q, file.clone(), data.clone(), e)?,
    };
    match p.prealloc {
        Prealloc::Off => {}
        Prealloc::Falloc | Prealloc::Full if p.data_file.is_none() => q.grow_allocated(0, p.size, p.prealloc)?,
        mode => q.preallocate(0, p.size, mode)?,
    }
    blockdev::BlockDriver::close(q.as_ref())
}

/// Encrypts the freshly created (still empty) image `q`: records the scheme in the header (for
/// LUKS, after writing the LUKS area into newly allocated clusters) and reopens it with the key
/// so that preallocation writes encrypted data.
fn set_up_encryption(
    q: Arc<Qcow2>,
    file: Arc<dyn Storage>,
    data: Option<Arc<dyn Storage>>,
    e: &Encryption,
) -> Result<Arc<Qcow2>> {
    let secret = match e {
        Encryption::Aes(s) | Encryption::Luks(_, s) => s.clone().ok_or_else(crate::crypt::key_required)?,
    };
    {
        let mut m = q.lock();
        let io = file.as_ref();
        match e {
            Encryption::Aes(_) => m.h.crypt_method = crate::crypt::CRYPT_AES,
            Encryption::Luks(o, _) => {
                let volume = o.create(secret.bytes())?;
                let cs = m.geo.cluster_size();
                let len = volume.area.len() as u64;
                let host = m.alloc(io, len.div_ceil(cs))?;
                // The whole clusters are written, zeros after the area, as qemu does.
                let mut area = volume.area;
                area.resize((len.div_ceil(cs) * cs) as usize, 0);
                write_all_at(io, host, &area)?;
                m.h.crypt_method = crate::crypt::CRYPT_LUKS;
                m.exts.crypto = Some((host, len));
            }
        }
        m.write_header(io, true)?;
    }
    blockdev::BlockDriver::close(q.as_ref())?;
    drop(q);
    let opts = OpenOptions { read_only: false, no_backing: true, key_secret: Some(secret), ..OpenOptions::default() };
    Qcow2::open(file, &opts, &Chain::new(), &DataOnly { data })
}

/// The header, refcount table and refcount block of an empty image (clusters 0, 1 and 2).
fn write_initial(io: &dyn Storage, p: &Params) -> Result<()> {
    let cs = 1u64 << p.cluster_bits;
    let mut h = Header {
        version: p.version,
        cluster_bits: p.cluster_bits,
        size: 0,
        crypt_method: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible: 0,
        compatible: 0,
        autoclear: 0,
        refcount_order: p.refcount_order,
        compression_type: u8::from(p.zstd),
        unknown_fields: Vec::new(),
    };
    if p.lazy_refcounts {
        h.compatible |= compat::LAZY_REFCOUNTS;
    }
    if p.data_file.is_some() {
        h.incompatible |= incompat::DATA_FILE;
    }
    if matches!(p.data_file, Some((_, true))) {
        h.autoclear |= autoclear::DATA_FILE_RAW;
    }
    if p.zstd {
        h.incompatible |= incompat::COMPRESSION;
    }
    if p.extended_l2 {
        h.incompatible |= incompat::EXTL2;
    }
    // qemu writes the bare header first and the full one once the image is open; the data file
    // name must already be there for the open to find the data file.
    let first = match &p.data_file {
        Some((name, _)) => {
            let exts = crate::header::Extensions { data_file: Some(name.clone()), ..Default::default() };
            let mut b = h.clone();
            b.version = h.version;
            b.encode_cluster(&exts)?
        }
        None => {
            let mut b = h.encode_fixed();
            b.resize(cs as usize, 0);
            b
        }
    };
    write_all_at(io, 0, &first)?;
    let mut tables = vec![0u8; 2 * cs as usize];
    set_u64(&mut tables, 0, 2 * cs);
    // The block counts the three clusters it, the table and the header occupy.
    let order = p.refcount_order;
    for i in 0..3 {
        crate::refcount::write_entry(&mut tables[cs as usize..], order, i, 1);
    }
    write_all_at(io, cs, &tables)?;
    Ok(())
}

/// An opener that only hands out the data file being created.
pub(crate) struct DataOnly {
    pub(crate) data: Option<Arc<dyn Storage>>,
}

impl Opener for DataOnly {
    fn open_image(
        &self,
        _: &str,
        name: &str,
        _: Option<&str>,
        _: &OpenOptions,
        _: &Chain,
    ) -> Result<Arc<dyn blockdev::BlockDriver>> {
        Err(Error::unsupported(format!("cannot open '{name}' while creating")))
    }

    fn open_storage(&self, _: &str, name: &str, _: &OpenOptions) -> Result<Arc<dyn Storage>> {
        self.data.clone().ok_or_else(|| Error::unsupported(format!("cannot open '{name}' while creating")))
    }

    fn create_storage(&self, name: &str, _: &CreateOptions) -> Result<Arc<dyn Storage>> {
        Err(Error::unsupported(format!("cannot create '{name}' here")))
    }
}
