//! The network protocols: [`NbdProtocol`] (`nbd://`, `nbd+unix://` and the older `nbd:` forms
//! open an NBD export, [`nbd::client`]) and [`HttpProtocol`] (`http://` and `https://`, a file on
//! a web server, read-only, [`httpfile`]); any format driver then runs on them.
//!
//! Remote containers take no file locks (the server owns the file) and cannot grow. "Creating"
//! an NBD one, as qemu-img does, opens the existing export read-write, checks that the image fits
//! and clears its first sector; HTTP ones cannot be written at all.

use std::sync::Arc;

use blockdev::{Error, OpenOptions, Prealloc, Protocol, Result, Storage};
use nbd::address::Address;
use nbd::client::{ClientOptions, NbdStorage};

#[cfg(feature = "http")]
pub(crate) use httpfile::NodeOptions as HttpNodeOptions;

/// Without the `http` feature no option belongs to an HTTP node.
#[cfg(not(feature = "http"))]
#[derive(Debug, Default)]
pub(crate) struct HttpNodeOptions {
    _none: (),
}

/// An HTTP node's URL and options (none exist without the `http` feature).
#[cfg(not(feature = "http"))]
type HttpNode = (String, Vec<(String, String)>);

#[cfg(not(feature = "http"))]
impl HttpNodeOptions {
    pub(crate) fn take(&mut self, _key: &str, _value: &str) -> bool {
        false
    }

    pub(crate) fn node(&self, _format: &str) -> Result<Option<HttpNode>> {
        Ok(None)
    }
}

/// Whether `name` is an `http://` or `https://` URL.
fn is_http_name(name: &str) -> bool {
    name.split_once("://").is_some_and(|(s, _)| s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https"))
}

/// Opens the HTTP(S) file `name` read-only with the node options of `opts`.
#[cfg(feature = "http")]
fn open_http(name: &str, opts: &OpenOptions) -> Result<Arc<dyn Storage>> {
    if !opts.read_only {
        return Err(Error::read_only().with_message("curl driver does not support writes"));
    }
    let http = httpfile::HttpOptions::from_pairs(&opts.protocol_options)?;
    Ok(Arc::new(httpfile::HttpStorage::open(name, &http)?))
}

#[cfg(not(feature = "http"))]
fn open_http(_name: &str, _opts: &OpenOptions) -> Result<Arc<dyn Storage>> {
    Err(Error::unsupported("vdisk was built without HTTP support (feature \"http\" of crate formats)"))
}

/// NBD exports.
#[derive(Debug, Default)]
pub struct NbdProtocol;

impl Protocol for NbdProtocol {
    fn drivers(&self) -> &'static [&'static str] {
        &["nbd"]
    }

    fn claims(&self, filename: &str) -> bool {
        nbd::address::is_nbd_name(filename)
    }

    fn open(&self, filename: &str, opts: &OpenOptions) -> Result<Arc<dyn Storage>> {
        let address = Address::parse(filename)
            .ok_or_else(|| Error::invalid_argument(format!("'{filename}' is not an NBD address")))??;
        let client = ClientOptions { read_only: opts.read_only, ..ClientOptions::default() };
        Ok(Arc::new(NbdStorage::connect(&address, &client)?))
    }

    /// "Creates" the export for an image of `size` bytes, as qemu-img does: opens the existing
    /// export read-write, refuses images larger than it and preallocation, and zeroes the first
    /// sector (so that an old header there is not probed).
    fn create(&self, filename: &str, size: u64, prealloc: Prealloc) -> Result<Arc<dyn Storage>> {
        let storage = self.open(filename, &OpenOptions::read_write())?;
        if !matches!(prealloc, Prealloc::Off | Prealloc::Metadata) {
            return Err(Error::unsupported(format!("Unsupported preallocation mode '{}'", prealloc.as_str())));
        }
        storage.set_len(size, Prealloc::Off)?;
        storage.write_zeroes(0, storage.len()?.min(512), false)?;
        Ok(storage)
    }
}

/// Files on web servers, read-only.
#[derive(Debug, Default)]
pub struct HttpProtocol;

impl Protocol for HttpProtocol {
    fn drivers(&self) -> &'static [&'static str] {
        &["http", "https"]
    }

    fn claims(&self, filename: &str) -> bool {
        is_http_name(filename)
    }

    fn open(&self, filename: &str, opts: &OpenOptions) -> Result<Arc<dyn Storage>> {
        open_http(filename, opts)
    }

    fn create(&self, filename: &str, _size: u64, _prealloc: Prealloc) -> Result<Arc<dyn Storage>> {
        let scheme = filename.split_once("://").map_or("http", |(s, _)| s);
        Err(Error::unsupported(format!("Protocol driver '{scheme}' does not support image creation")))
    }
}
