//! NBD image names, as qemu-img accepts them wherever a file name goes:
//!
//! - `nbd://HOST[:PORT][/EXPORT]` and `nbd+tcp://...` (TCP, port 10809 unless named; an IPv6
//!   host in brackets),
//! - `nbd+unix:///[EXPORT]?socket=PATH` (a unix socket),
//! - the older `nbd:HOST:PORT[:exportname=EXPORT]` and `nbd:unix:PATH[:exportname=EXPORT]`.
//!
//! The export name of a URL is percent-decoded; an absent one is the empty name (the server's
//! default export).

use std::fmt;
use std::path::PathBuf;

use blockdev::{Error, Result};

/// The port NBD servers listen on unless told otherwise.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP host name or address and port.
    Tcp {
        /// Host name or address (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// A unix socket.
    Unix(PathBuf),
}

/// A parsed NBD image name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// The server.
    pub endpoint: Endpoint,
    /// The export to ask for (empty: the server's default).
    pub export: String,
}

/// Whether `name` is an NBD image name (it may still be malformed).
pub fn is_nbd_name(name: &str) -> bool {
    name.starts_with("nbd:") || name.starts_with("nbd+tcp:") || name.starts_with("nbd+unix:")
}

fn bad(name: &str, why: &str) -> Error {
    Error::invalid_argument(format!("Invalid NBD name '{name}': {why}"))
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl Address {
    /// Parses `name`; `None` when it is not an NBD name at all.
    pub fn parse(name: &str) -> Option<Result<Address>> {
        if let Some(rest) = name.strip_prefix("nbd+unix://") {
            return Some(Self::parse_unix_url(name, rest));
        }
        if let Some(rest) = name.strip_prefix("nbd://").or_else(|| name.strip_prefix("nbd+tcp://")) {
            return Some(Self::parse_tcp_url(name, rest));
        }
        if let Some(rest) = name.strip_prefix("nbd:") {
            return Some(Self::parse_legacy(name, rest));
        }
        None
    }

    fn parse_unix_url(name: &str, rest: &str) -> Result<Address> {
        let (path, query) = rest.split_once('?').ok_or_else(|| bad(name, "nbd+unix needs ?socket=PATH"))?;
        if !path.is_empty() && !path.starts_with('/') {
            return Err(bad(name, "nbd+unix takes no host"));
        }
        let mut socket = None;
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("socket", v)) => socket = Some(percent_decode(v).ok_or_else(|| bad(name, "bad escape"))?),
                _ => return Err(bad(name, "the only query parameter is socket")),
            }
        }
        let socket = socket.filter(|s| !s.is_empty()).ok_or_else(|| bad(name, "nbd+unix needs ?socket=PATH"))?;
        let export = percent_decode(path.strip_prefix('/').unwrap_or(path)).ok_or_else(|| bad(name, "bad escape"))?;
        Ok(Address { endpoint: Endpoint::Unix(socket.into()), export })
    }

    fn parse_tcp_url(name: &str, rest: &str) -> Result<Address> {
        if rest.contains('?') {
            return Err(bad(name, "TCP addresses take no query"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| bad(name, "unclosed '['"))?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad(name, "no host"));
        }
        let port = match port {
            Some(p) => p.parse::<u16>().map_err(|_| bad(name, "bad port"))?,
            None => DEFAULT_PORT,
        };
        let export = percent_decode(path).ok_or_else(|| bad(name, "bad escape"))?;
        Ok(Address { endpoint: Endpoint::Tcp { host: host.to_string(), port }, export })
    }

    fn parse_legacy(name: &str, rest: &str) -> Result<Address> {
        let (target, export) = match rest.split_once(":exportname=") {
            Some((t, e)) => (t, e.to_string()),
            None => (rest, String::new()),
        };
        if let Some(path) = target.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad(name, "no socket path"));
            }
            return Ok(Address { endpoint: Endpoint::Unix(path.into()), export });
        }
        let (host, port) = target.rsplit_once(':').unwrap_or((target, ""));
        if host.is_empty() {
            return Err(bad(name, "no host"));
        }
        let port =
            if port.is_empty() { DEFAULT_PORT } else { port.parse::<u16>().map_err(|_| bad(name, "bad port"))? };
        Ok(Address { endpoint: Endpoint::Tcp { host: host.to_string(), port }, export })
    }
}

/// The keys of an NBD node's options (qemu's `driver=nbd` node) that [`Address::from_node_options`]
/// reads, relative to the node.
pub const NODE_OPTION_KEYS: [&str; 8] =
    ["server.type", "server.path", "server.host", "server.port", "export", "path", "host", "port"];

impl Address {
    /// The address an NBD node's options give, as qemu's `json:` names and `--image-opts` spell
    /// them (keys relative to the node, from [`NODE_OPTION_KEYS`]): `server.type=unix` with
    /// `server.path`, or `server.type=inet` with `server.host` and `server.port` (10809 when
    /// absent); the older flat `path`, or `host` and `port`; `export` in both.
    pub fn from_node_options(get: impl Fn(&str) -> Option<String>) -> Result<Address> {
        let bad = |why: &str| Error::invalid_argument(format!("Invalid NBD node options: {why}"));
        let export = get("export").unwrap_or_default();
        let port = |p: Option<String>| match p {
            Some(p) => p.parse::<u16>().map_err(|_| bad("bad port")),
            None => Ok(DEFAULT_PORT),
        };
        let endpoint = match get("server.type").as_deref() {
            Some("unix") => Endpoint::Unix(get("server.path").ok_or_else(|| bad("server.path is missing"))?.into()),
            Some("inet") => Endpoint::Tcp {
                host: get("server.host").ok_or_else(|| bad("server.host is missing"))?,
                port: port(get("server.port"))?,
            },
            Some(other) => return Err(bad(&format!("unknown server.type '{other}'"))),
            None => match (get("path"), get("host")) {
                (Some(path), None) => Endpoint::Unix(path.into()),
                (None, Some(host)) => Endpoint::Tcp { host, port: port(get("port"))? },
                (Some(_), Some(_)) => return Err(bad("path and host are mutually exclusive")),
                (None, None) => return Err(bad("no server given")),
            },
        };
        Ok(Address { endpoint, export })
    }
}

/// An NBD file node spelled as dotted `file.*` options, the way `json:` names and `--image-opts`
/// give it: `file.driver=nbd` and the keys of [`NODE_OPTION_KEYS`] under `file.`.
#[derive(Debug, Default)]
pub struct FileNodeOptions {
    nbd: bool,
    keys: Vec<(String, String)>,
}

impl FileNodeOptions {
    /// Takes `key=value` if it is part of an NBD file node; false (nothing taken) otherwise.
    pub fn take(&mut self, key: &str, value: &str) -> bool {
        if key == "file.driver" && value == "nbd" {
            self.nbd = true;
            return true;
        }
        match key.strip_prefix("file.") {
            Some(k) if NODE_OPTION_KEYS.contains(&k) => {
                self.keys.push((k.to_string(), value.to_string()));
                true
            }
            _ => false,
        }
    }

    /// The URL of the export the options name; `None` when they name no NBD node. NBD keys
    /// without `file.driver=nbd` are refused with qemu's message for an option the image's
    /// `format` does not support; an incomplete server address is refused too.
    pub fn url(&self, format: &str) -> Result<Option<String>> {
        if !self.nbd {
            return match self.keys.first() {
                Some((k, _)) => Err(Error::invalid_argument(format!(
                    "Block format '{format}' does not support the option 'file.{k}'"
                ))),
                None => Ok(None),
            };
        }
        let get = |k: &str| self.keys.iter().find(|(x, _)| x == k).map(|(_, v)| v.clone());
        Ok(Some(Address::from_node_options(get)?.to_string()))
    }
}

impl fmt::Display for Address {
    /// The URL form (qemu's spelling in `info`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.endpoint {
            Endpoint::Tcp { host, port } if host.contains(':') => write!(f, "nbd://[{host}]:{port}/{}", self.export),
            Endpoint::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{}", self.export),
            Endpoint::Unix(p) => write!(f, "nbd+unix:///{}?socket={}", self.export, p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> Address {
        Address { endpoint: Endpoint::Tcp { host: host.into(), port }, export: export.into() }
    }

    #[test]
    fn url_and_legacy_forms() {
        let ok = |s: &str| Address::parse(s).unwrap().unwrap();
        assert_eq!(ok("nbd://localhost/disk"), tcp("localhost", DEFAULT_PORT, "disk"));
        assert_eq!(ok("nbd+tcp://10.0.0.1:1234"), tcp("10.0.0.1", 1234, ""));
        assert_eq!(ok("nbd://[::1]:99/a%20b"), tcp("::1", 99, "a b"));
        assert_eq!(ok("nbd:example:77:exportname=x"), tcp("example", 77, "x"));
        let unix = Address { endpoint: Endpoint::Unix("/run/s.sock".into()), export: "e".into() };
        assert_eq!(ok("nbd+unix:///e?socket=/run/s.sock"), unix);
        assert_eq!(ok("nbd:unix:/run/s.sock:exportname=e"), unix);
        assert_eq!(ok("nbd+unix:///e?socket=/run/s.sock").to_string(), "nbd+unix:///e?socket=/run/s.sock");
        assert_eq!(ok("nbd://[::1]:99/x").to_string(), "nbd://[::1]:99/x");
        assert!(Address::parse("disk.qcow2").is_none());
        assert!(Address::parse("./nbd:x").is_none());
    }

    #[test]
    fn node_options_give_the_same_addresses() {
        let from = |pairs: &[(&str, &str)]| {
            let owned: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            Address::from_node_options(|k| owned.iter().find(|(x, _)| x == k).map(|(_, v)| v.clone()))
        };
        let unix = Address { endpoint: Endpoint::Unix("/s".into()), export: "e".into() };
        assert_eq!(from(&[("server.type", "unix"), ("server.path", "/s"), ("export", "e")]).unwrap(), unix);
        assert_eq!(from(&[("path", "/s"), ("export", "e")]).unwrap(), unix);
        assert_eq!(from(&[("server.type", "inet"), ("server.host", "h")]).unwrap(), tcp("h", DEFAULT_PORT, ""));
        assert_eq!(from(&[("host", "h"), ("port", "5")]).unwrap(), tcp("h", 5, ""));
        for bad in [
            &[][..],
            &[("server.type", "vsock")],
            &[("server.type", "unix")],
            &[("host", "h"), ("port", "x")],
            &[("path", "/s"), ("host", "h")],
        ] {
            assert!(from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn malformed_names_are_errors() {
        for s in [
            "nbd://",
            "nbd://host:port/x",
            "nbd://host:70000",
            "nbd://[::1/x",
            "nbd+unix:///x",
            "nbd+unix:///x?socket=",
            "nbd+unix://host/x?socket=/s",
            "nbd+unix:///x?sock=/s",
            "nbd://h/%zz",
            "nbd:unix:",
            "nbd::1",
        ] {
            assert!(Address::parse(s).unwrap().is_err(), "{s}");
        }
    }
}
