//! vdisk's HTTP and HTTPS protocol driver: an image on a web or object server opens as a
//! read-only [`blockdev::Storage`], so that any format driver runs on top of it (a qcow2 served
//! over HTTPS opens as qcow2, and can be the backing file of a local overlay).
//!
//! - Open: a `HEAD` request (redirects followed, the final URL kept for the reads) gives the
//!   length; the server must advertise `Accept-Ranges: bytes`.
//! - Reads: `GET` with a `Range` header. Small reads go through a bounded cache of aligned
//!   chunks of the readahead size ([`HttpOptions::readahead`]), so the many small metadata reads
//!   of a format driver cost one request per chunk; reads of a chunk or more bypass the cache and
//!   become one request each (split at [`MAX_REQUEST`]).
//! - TLS through rustls, verifying against the platform's CA store (`SSL_CERT_FILE` /
//!   `SSL_CERT_DIR` override it) plus [`HttpOptions::ca_file`]; `sslverify=off` as qemu has it.
//! - Every connect and every socket read times out ([`HttpOptions::timeout`]), and a request as
//!   a whole after the timeout plus one second per 128 KiB asked for: a server that stops or
//!   trickles yields an error, never a hang.
//!
//! # Invariants
//! - Nothing the server sends is trusted: a range reply must be `206` with a `Content-Range`
//!   naming exactly the bytes asked for and the length the open saw, and must deliver all of
//!   them; a `200` (the whole file) is refused without reading its body. No reply allocates more
//!   than the request asked for.
//! - Read-only: every write-type call fails with [`blockdev::ErrorKind::ReadOnly`]; nothing is
//!   ever sent but `HEAD` and `GET`.
//! - The cache holds at most [`CACHE_BYTES`] (or one chunk, if a chunk is larger); a chunk is
//!   immutable once cached, so readers share it without copying under the lock.

mod cache;
mod options;
mod storage;
mod tls;

pub use options::{HttpNode, HttpOptions, NodeOptions, NODE_OPTION_KEYS};
pub use storage::{HttpStorage, CACHE_BYTES, MAX_REQUEST};

/// Whether `name` is an `http://` or `https://` URL (it is then never a local path).
pub fn is_http_name(name: &str) -> bool {
    scheme_of(name).is_some()
}

/// `"http"` or `"https"` for a URL of that scheme (case-insensitive, as URLs are).
pub(crate) fn scheme_of(name: &str) -> Option<&'static str> {
    let (scheme, _) = name.split_once("://")?;
    if scheme.eq_ignore_ascii_case("http") {
        Some("http")
    } else if scheme.eq_ignore_ascii_case("https") {
        Some("https")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_names() {
        assert!(is_http_name("http://h/x.qcow2"));
        assert!(is_http_name("HTTPS://h/x"));
        assert!(!is_http_name("nbd://h/x"));
        assert!(!is_http_name("/srv/http://x"));
        assert!(!is_http_name("http:relative"));
    }
}
