//! [`HttpStorage`]: a file on an HTTP(S) server read through range requests.

use std::io::{IoSlice, IoSliceMut, Read};
use std::sync::Arc;
use std::time::Duration;

use blockdev::{Error, ErrorKind, Prealloc, Result, Storage};
use ureq::http::{header, StatusCode};
use ureq::ResponseExt;

use crate::cache::ChunkCache;
use crate::{scheme_of, tls, HttpOptions};

/// Most bytes one range request asks for; larger reads are split.
pub const MAX_REQUEST: u64 = 8 << 20;

/// Slowest transfer a request tolerates beyond the timeout: a request of `n` bytes fails after
/// `timeout + n / MIN_RATE` seconds in all, so a server that trickles bytes cannot hold a read
/// forever (the per-read timeout alone restarts with every byte).
const MIN_RATE: u64 = 128 << 10;

/// Bytes the chunk cache holds at most (or one chunk, when the readahead is larger).
pub const CACHE_BYTES: u64 = 8 << 20;

/// Most redirects followed before giving up.
const MAX_REDIRECTS: u32 = 10;

/// What qemu's curl driver says before an error found while opening.
const OPEN_PREFIX: &str = "CURL: Error opening file";

/// A read-only file on an HTTP or HTTPS server.
#[derive(Debug)]
pub struct HttpStorage {
    agent: ureq::Agent,
    /// The URL as given (the image's name).
    name: String,
    /// The URL reads go to: the one the open's redirects ended at.
    url: String,
    scheme: &'static str,
    len: u64,
    /// Chunk size of the cache: the readahead.
    chunk: u64,
    /// The node's timeout (connect, every read; the base of a request's whole budget).
    timeout: Duration,
    cache: ChunkCache,
}

/// An error of a request to `url`.
fn request_error(what: &str, err: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Io, format!("{what}: {err}"))
}

/// curl's words for an HTTP error status, which qemu's messages carry.
fn status_error(status: StatusCode) -> String {
    format!("The requested URL returned error: {}", status.as_u16())
}

const NO_RANGES: &str = "Server does not support 'range' (byte ranges).";

impl HttpStorage {
    /// Opens `url` (`http://` or `https://`): one `HEAD` request for its length and range
    /// support, following redirects.
    pub fn open(url: &str, opts: &HttpOptions) -> Result<HttpStorage> {
        let scheme = scheme_of(url).ok_or_else(|| Error::invalid_argument(format!("'{url}' is not an HTTP URL")))?;
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(MAX_REDIRECTS)
            .timeout_resolve(Some(opts.timeout))
            .timeout_connect(Some(opts.timeout))
            .timeout_per_read(Some(opts.timeout))
            .timeout_per_write(Some(opts.timeout))
            .user_agent(concat!("vdisk/", env!("CARGO_PKG_VERSION")))
            // An http URL may redirect to https: the same trust either way.
            .tls_config(tls::config(opts)?);
        let agent: ureq::Agent = config.build().into();
        let open_error = |msg: String| Error::new(ErrorKind::Io, format!("{OPEN_PREFIX}: {msg}"));
        // A whole exchange is bounded too: headers trickled byte by byte would reset the per-read
        // timeout forever.
        let resp = agent
            .head(url)
            .config()
            .timeout_per_call(Some(opts.timeout * 2))
            .build()
            .call()
            .map_err(|e| open_error(e.to_string()))?;
        if resp.status() != StatusCode::OK {
            let kind = if resp.status() == StatusCode::NOT_FOUND { ErrorKind::NotFound } else { ErrorKind::Io };
            return Err(open_error(status_error(resp.status())).with_kind(kind));
        }
        let ranges = resp
            .headers()
            .get_all(header::ACCEPT_RANGES)
            .iter()
            .any(|v| v.to_str().is_ok_and(|s| s.split(',').any(|u| u.trim().eq_ignore_ascii_case("bytes"))));
        if !ranges {
            return Err(open_error(NO_RANGES.into()).with_kind(ErrorKind::Unsupported));
        }
        let len = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| open_error("the server did not give the file's length".into()))?;
        let final_url = resp.get_uri().to_string();
        let chunk = opts.readahead;
        Ok(HttpStorage {
            agent,
            name: url.to_string(),
            url: final_url,
            scheme,
            len,
            chunk,
            timeout: opts.timeout,
            cache: ChunkCache::new((CACHE_BYTES / chunk) as usize),
        })
    }

    /// Fills `out` with the file's bytes at `offset` (inside the file) in one range request.
    fn get_range(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let want = out.len();
        let last = offset + want as u64 - 1;
        let what = || format!("HTTP read of {want} bytes at offset {offset} of '{}'", self.name);
        let resp = self
            .agent
            .get(&self.url)
            .header(header::RANGE, format!("bytes={offset}-{last}"))
            .config()
            .timeout_per_call(Some(self.timeout + Duration::from_secs(want as u64 / MIN_RATE)))
            .build()
            .call()
            .map_err(|e| request_error(&what(), e))?;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {}
            // The whole file: range support is gone. Its body is never read.
            StatusCode::OK => return Err(request_error(&what(), NO_RANGES)),
            s => return Err(request_error(&what(), status_error(s))),
        }
        let range = resp.headers().get(header::CONTENT_RANGE).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !content_range_matches(range, offset, last, self.len) {
            return Err(request_error(&what(), format!("the server answered with the range '{range}'")));
        }
        let mut body = resp.into_body().into_reader();
        let mut got = 0;
        while got < out.len() {
            match body.read(&mut out[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(request_error(&what(), format!("after {got} bytes: {e}"))),
            }
        }
        if got < out.len() {
            return Err(request_error(&what(), format!("the server sent only {got} bytes")));
        }
        // Reading to the end hands the connection back for the next request.
        let mut extra = [0u8; 1];
        match body.read(&mut extra) {
            Ok(0) => Ok(()),
            Ok(_) => Err(request_error(&what(), "the server sent more bytes than the range")),
            Err(e) => Err(request_error(&what(), e)),
        }
    }

    /// Chunk `index` of the file, from the cache or fetched (and cached).
    fn chunk(&self, index: u64) -> Result<Arc<[u8]>> {
        if let Some(data) = self.cache.get(index) {
            return Ok(data);
        }
        let start = index * self.chunk;
        let mut data = vec![0u8; self.chunk.min(self.len - start) as usize];
        self.get_range(start, &mut data)?;
        let data: Arc<[u8]> = data.into();
        self.cache.insert(index, data.clone());
        Ok(data)
    }

    /// Fills `buf` from `offset`; bytes past the end of the file read as zeroes.
    fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let inside = self.len.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[inside..].fill(0);
        let buf = &mut buf[..inside];
        if buf.len() as u64 >= self.chunk {
            for (i, piece) in buf.chunks_mut(MAX_REQUEST as usize).enumerate() {
                self.get_range(offset + i as u64 * MAX_REQUEST, piece)?;
            }
            return Ok(());
        }
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let data = self.chunk(at / self.chunk)?;
            let within = (at % self.chunk) as usize;
            let n = (data.len() - within).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&data[within..within + n]);
            done += n;
        }
        Ok(())
    }
}

/// Whether a `Content-Range` value says `bytes first-last/total` with the expected numbers (the
/// total may be `*`).
fn content_range_matches(value: &str, first: u64, last: u64, total: u64) -> bool {
    let Some(rest) = value.trim().strip_prefix("bytes ") else { return false };
    let Some((span, size)) = rest.split_once('/') else { return false };
    let Some((a, b)) = span.split_once('-') else { return false };
    let size_ok = size == "*" || size.parse::<u64>() == Ok(total);
    a.parse::<u64>() == Ok(first) && b.parse::<u64>() == Ok(last) && size_ok
}

impl Storage for HttpStorage {
    fn len(&self) -> Result<u64> {
        Ok(self.len)
    }

    fn read_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        blockdev::checked_end(offset, blockdev::iov_len_mut(bufs))?;
        blockdev::with_contiguous_mut(bufs, |buf| self.read_into(offset, buf))
    }

    fn write_at(&self, _offset: u64, _bufs: &[IoSlice<'_>]) -> Result<()> {
        Err(Error::read_only())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn set_len(&self, _len: u64, _prealloc: Prealloc) -> Result<()> {
        Err(Error::read_only())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> Result<()> {
        Err(Error::read_only())
    }

    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(Error::read_only())
    }

    /// HTTP says nothing of holes: all data, as qemu's curl driver reports it.
    fn data_status(&self, _offset: u64, max_len: u64) -> Result<(bool, u64)> {
        Ok((true, max_len))
    }

    fn is_read_only(&self) -> bool {
        true
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn protocol(&self) -> &'static str {
        self.scheme
    }

    fn is_remote(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        assert!(content_range_matches("bytes 0-511/1024", 0, 511, 1024));
        assert!(content_range_matches("bytes 512-1023/*", 512, 1023, 1024));
        assert!(!content_range_matches("bytes 0-511/2048", 0, 511, 1024), "the file changed size");
        assert!(!content_range_matches("bytes 0-1023/1024", 0, 511, 1024), "more than asked");
        assert!(!content_range_matches("bytes 1-512/1024", 0, 511, 1024));
        assert!(!content_range_matches("", 0, 511, 1024));
        assert!(!content_range_matches("items 0-511/1024", 0, 511, 1024));
    }
}
