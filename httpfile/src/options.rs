//! Options of an HTTP(S) node: qemu's `curl` driver options that vdisk honours (`url`,
//! `readahead`, `timeout`, `sslverify`) and vdisk's `ca-file`, as `json:` names and
//! `--image-opts` spell them under `file.`.

use std::path::PathBuf;
use std::time::Duration;

use blockdev::{Error, Result};

/// Keys of an HTTP node besides `driver` and `url` (under `file.` in a format node).
pub const NODE_OPTION_KEYS: &[&str] = &["readahead", "timeout", "sslverify", "ca-file"];

/// Default readahead, qemu's: 256 KiB.
const DEFAULT_READAHEAD: u64 = 256 << 10;
/// Largest readahead accepted (a chunk is allocated at this size).
const MAX_READAHEAD: u64 = 64 << 20;
/// Default timeout in seconds, qemu's.
const DEFAULT_TIMEOUT_SECS: u64 = 5;
/// Largest timeout accepted in seconds, qemu's limit.
const MAX_TIMEOUT_SECS: u64 = 10000;

/// How an HTTP(S) image is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpOptions {
    /// Size of the aligned chunks small reads fetch and cache; a multiple of 512.
    pub readahead: u64,
    /// Limit on connecting and on every socket read (a stalled transfer fails after this long).
    pub timeout: Duration,
    /// Verify the server's TLS certificate (qemu's `sslverify`, on by default).
    pub ssl_verify: bool,
    /// PEM file of extra trusted CA certificates, next to the platform's store.
    pub ca_file: Option<PathBuf>,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            readahead: DEFAULT_READAHEAD,
            timeout: Duration::from_secs(DEFAULT_TIMEOUT_SECS),
            ssl_verify: true,
            ca_file: None,
        }
    }
}

impl HttpOptions {
    /// Options from node `key=value` pairs (keys of [`NODE_OPTION_KEYS`], without `file.`);
    /// the defaults for keys not given.
    pub fn from_pairs(pairs: &[(String, String)]) -> Result<HttpOptions> {
        let mut o = HttpOptions::default();
        for (k, v) in pairs {
            match k.as_str() {
                "readahead" => {
                    let n = blockdev::options::parse_size_option(k, v)?;
                    if n == 0 || n % 512 != 0 || n > MAX_READAHEAD {
                        return Err(Error::invalid_argument(format!(
                            "HTTP_READAHEAD_SIZE {n} is not a multiple of 512 between 512 and {MAX_READAHEAD}"
                        )));
                    }
                    o.readahead = n;
                }
                "timeout" => {
                    let secs: u64 = v.parse().map_err(|_| {
                        Error::invalid_argument(format!("Parameter 'timeout' expects a number, got '{v}'"))
                    })?;
                    if secs == 0 || secs > MAX_TIMEOUT_SECS {
                        return Err(Error::invalid_argument("timeout parameter is too large or negative"));
                    }
                    o.timeout = Duration::from_secs(secs);
                }
                "sslverify" => o.ssl_verify = blockdev::options::parse_bool(k, v)?,
                "ca-file" => o.ca_file = Some(PathBuf::from(v)),
                _ => return Err(Error::invalid_argument(format!("Invalid parameter '{k}'"))),
            }
        }
        Ok(o)
    }
}

/// An HTTP node's URL and its other options (keys without `file.`).
pub type HttpNode = (String, Vec<(String, String)>);

/// An HTTP(S) file node spelled as dotted `file.*` options, the way `json:` names and
/// `--image-opts` give it: `file.driver=http` (or `https`), `file.url`, and the keys of
/// [`NODE_OPTION_KEYS`] under `file.`.
#[derive(Debug, Default)]
pub struct NodeOptions {
    driver: Option<String>,
    url: Option<String>,
    keys: Vec<(String, String)>,
}

impl NodeOptions {
    /// Takes `key=value` if it is part of an HTTP file node; false (nothing taken) otherwise.
    pub fn take(&mut self, key: &str, value: &str) -> bool {
        match key {
            "file.driver" if value == "http" || value == "https" => {
                self.driver = Some(value.to_string());
                true
            }
            "file.url" => {
                self.url = Some(value.to_string());
                true
            }
            _ => match key.strip_prefix("file.") {
                Some(k) if NODE_OPTION_KEYS.contains(&k) => {
                    self.keys.push((k.to_string(), value.to_string()));
                    true
                }
                _ => false,
            },
        }
    }

    /// The URL and the node's other options when the keys name an HTTP node; `None` when they
    /// name none. Keys without `file.driver=http(s)` are refused with qemu's message for an
    /// option the image's `format` does not support, as is a URL of the other scheme.
    pub fn node(&self, format: &str) -> Result<Option<HttpNode>> {
        let Some(driver) = &self.driver else {
            let stray = self.url.as_ref().map(|_| "url").or(self.keys.first().map(|(k, _)| k.as_str()));
            return match stray {
                Some(k) => Err(Error::invalid_argument(format!(
                    "Block format '{format}' does not support the option 'file.{k}'"
                ))),
                None => Ok(None),
            };
        };
        let url = self.url.clone().ok_or_else(|| Error::invalid_argument("Parameter 'url' is missing"))?;
        if crate::scheme_of(&url) != Some(driver.as_str()) {
            return Err(Error::invalid_argument(format!("'{url}' is not an {driver}:// URL")));
        }
        HttpOptions::from_pairs(&self.keys)?;
        Ok(Some((url, self.keys.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_and_values() {
        assert_eq!(HttpOptions::from_pairs(&[]).unwrap(), HttpOptions::default());
        let o = HttpOptions::from_pairs(&pairs(&[
            ("readahead", "1M"),
            ("timeout", "2"),
            ("sslverify", "off"),
            ("ca-file", "/ca.pem"),
        ]))
        .unwrap();
        assert_eq!(o.readahead, 1 << 20);
        assert_eq!(o.timeout, Duration::from_secs(2));
        assert!(!o.ssl_verify);
        assert_eq!(o.ca_file, Some(PathBuf::from("/ca.pem")));
    }

    #[test]
    fn bad_values() {
        for (k, v) in [("readahead", "0"), ("readahead", "1000"), ("readahead", "1G"), ("timeout", "0")] {
            assert!(HttpOptions::from_pairs(&pairs(&[(k, v)])).is_err(), "{k}={v}");
        }
        assert!(HttpOptions::from_pairs(&pairs(&[("timeout", "x")])).is_err());
        assert!(HttpOptions::from_pairs(&pairs(&[("sslverify", "maybe")])).is_err());
    }

    #[test]
    fn node_options() {
        let mut n = NodeOptions::default();
        assert!(n.take("file.driver", "https"));
        assert!(n.take("file.url", "https://h/x"));
        assert!(n.take("file.timeout", "3"));
        assert!(!n.take("file.filename", "x"));
        let (url, keys) = n.node("qcow2").unwrap().unwrap();
        assert_eq!(url, "https://h/x");
        assert_eq!(keys, pairs(&[("timeout", "3")]));

        let mut wrong = NodeOptions::default();
        wrong.take("file.driver", "http");
        wrong.take("file.url", "https://h/x");
        assert!(wrong.node("raw").is_err(), "scheme and driver differ");

        let mut stray = NodeOptions::default();
        stray.take("file.timeout", "3");
        let e = stray.node("qcow2").unwrap_err();
        assert_eq!(e.message(), "Block format 'qcow2' does not support the option 'file.timeout'");
        assert!(NodeOptions::default().node("raw").unwrap().is_none());
    }
}
