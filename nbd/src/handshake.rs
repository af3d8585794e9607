//! Fixed newstyle negotiation: the greeting, then options until the client picks an export
//! (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`) or leaves.
//!
//! Every option's length is checked against [`MAX_OPTION_LEN`] before its data is read, and
//! every length inside the data against what is left of it; a client sends at most
//! [`MAX_OPTIONS`] options. Violations get an error reply, or end the connection where the
//! protocol leaves no way to answer (bad magic, unknown client flags).

use std::io::{self, Read, Write};

use crate::proto::{self, info, opt, rep, tflag};
use crate::{Context, Export, MAX_REQUEST};

/// Longest option data accepted (names are at most 4096 bytes by the protocol).
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Most options in one negotiation.
pub const MAX_OPTIONS: usize = 1024;

/// What negotiation settled.
#[derive(Debug)]
pub struct Negotiated<'a> {
    /// The export chosen.
    pub export: &'a Export,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// Metadata contexts selected for block status, with their ids.
    pub contexts: Vec<(u32, Context)>,
}

/// Transmission flags of `export`.
pub fn transmission_flags(export: &Export) -> u16 {
    let mut f = tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::SEND_FUA | tflag::SEND_DF | tflag::SEND_CACHE;
    if export.read_only {
        f |= tflag::READ_ONLY;
    } else {
        f |= tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES | tflag::SEND_FAST_ZERO;
    }
    if export.multi_conn {
        f |= tflag::CAN_MULTI_CONN;
    }
    f
}

/// A cursor over option data that refuses to read past its end.
struct Data<'d>(&'d [u8]);

impl<'d> Data<'d> {
    fn take(&mut self, n: usize) -> Option<&'d [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// A u32 length then that many bytes.
    fn string(&mut self) -> Option<&'d [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

/// The export a name selects: the one with that name; the empty name selects the first.
fn find<'a>(exports: &'a [Export], name: &[u8]) -> Option<&'a Export> {
    exports.iter().find(|e| e.name.as_bytes() == name).or_else(|| if name.is_empty() { exports.first() } else { None })
}

fn reply(w: &mut impl Write, option: u32, code: u32, message: &str) -> io::Result<()> {
    proto::write_option_reply(w, option, code, message.as_bytes())?;
    w.flush()
}

/// Runs the negotiation. `Ok(None)`: the client left (or broke the protocol) before choosing.
pub fn negotiate<'a>(
    r: &mut impl Read,
    w: &mut impl Write,
    exports: &'a [Export],
) -> io::Result<Option<Negotiated<'a>>> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&proto::NBD_MAGIC.to_be_bytes());
    greeting.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&greeting)?;
    w.flush()?;
    let client = proto::read_u32(r)?;
    if client & !(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES) != 0 {
        return Ok(None);
    }
    let no_zeroes = client & proto::CLIENT_NO_ZEROES != 0;
    let mut structured = false;
    let mut contexts: Vec<(u32, Context)> = Vec::new();
    for _ in 0..MAX_OPTIONS {
        if proto::read_u64(r)? != proto::IHAVEOPT {
            return Ok(None);
        }
        let option = proto::read_u32(r)?;
        let len = proto::read_u32(r)?;
        if len > MAX_OPTION_LEN {
            reply(w, option, rep::ERR_TOO_BIG, "option data too long")?;
            return Ok(None);
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;
        match option {
            opt::EXPORT_NAME => {
                let Some(export) = find(exports, &data) else { return Ok(None) };
                let mut reply = Vec::with_capacity(134);
                reply.extend_from_slice(&export.image.size().to_be_bytes());
                reply.extend_from_slice(&transmission_flags(export).to_be_bytes());
                if !no_zeroes {
                    reply.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&reply)?;
                w.flush()?;
                return Ok(Some(Negotiated { export, structured, contexts }));
            }
            opt::ABORT => {
                let _ = reply(w, option, rep::ACK, "");
                return Ok(None);
            }
            opt::LIST => {
                if len != 0 {
                    reply(w, option, rep::ERR_INVALID, "LIST takes no data")?;
                    continue;
                }
                for e in exports {
                    let mut d = (e.name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(e.name.as_bytes());
                    d.extend_from_slice(e.description.as_bytes());
                    proto::write_option_reply(w, option, rep::SERVER, &d)?;
                }
                reply(w, option, rep::ACK, "")?;
            }
            opt::INFO | opt::GO => {
                let mut d = Data(&data);
                let parsed = (|| {
                    let name = d.string()?;
                    let n = d.u16()? as usize;
                    let requests: Vec<u16> = (0..n).map(|_| d.u16()).collect::<Option<_>>()?;
                    d.0.is_empty().then_some((name, requests))
                })();
                let Some((name, requests)) = parsed else {
                    reply(w, option, rep::ERR_INVALID, "malformed INFO/GO request")?;
                    continue;
                };
                let Some(export) = find(exports, name) else {
                    reply(w, option, rep::ERR_UNKNOWN, "export unknown")?;
                    continue;
                };
                let mut item = info::EXPORT.to_be_bytes().to_vec();
                item.extend_from_slice(&export.image.size().to_be_bytes());
                item.extend_from_slice(&transmission_flags(export).to_be_bytes());
                proto::write_option_reply(w, option, rep::INFO, &item)?;
                if requests.contains(&info::NAME) {
                    let mut item = info::NAME.to_be_bytes().to_vec();
                    item.extend_from_slice(export.name.as_bytes());
                    proto::write_option_reply(w, option, rep::INFO, &item)?;
                }
                if requests.contains(&info::DESCRIPTION) && !export.description.is_empty() {
                    let mut item = info::DESCRIPTION.to_be_bytes().to_vec();
                    item.extend_from_slice(export.description.as_bytes());
                    proto::write_option_reply(w, option, rep::INFO, &item)?;
                }
                if requests.contains(&info::BLOCK_SIZE) {
                    let mut item = info::BLOCK_SIZE.to_be_bytes().to_vec();
                    item.extend_from_slice(&1u32.to_be_bytes());
                    item.extend_from_slice(&4096u32.to_be_bytes());
                    item.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                    proto::write_option_reply(w, option, rep::INFO, &item)?;
                }
                reply(w, option, rep::ACK, "")?;
                if option == opt::GO {
                    return Ok(Some(Negotiated { export, structured, contexts }));
                }
            }
            opt::STRUCTURED_REPLY => {
                if len != 0 {
                    reply(w, option, rep::ERR_INVALID, "STRUCTURED_REPLY takes no data")?;
                } else {
                    structured = true;
                    reply(w, option, rep::ACK, "")?;
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let set = option == opt::SET_META_CONTEXT;
                if set && !structured {
                    reply(w, option, rep::ERR_INVALID, "structured replies first")?;
                    continue;
                }
                let mut d = Data(&data);
                let parsed = (|| {
                    let name = d.string()?;
                    let n = d.u32()? as usize;
                    let mut queries = Vec::new();
                    for _ in 0..n {
                        queries.push(d.string()?);
                    }
                    d.0.is_empty().then_some((name, queries))
                })();
                let Some((name, queries)) = parsed else {
                    reply(w, option, rep::ERR_INVALID, "malformed meta context request")?;
                    continue;
                };
                if find(exports, name).is_none() {
                    reply(w, option, rep::ERR_UNKNOWN, "export unknown")?;
                    continue;
                }
                let mut chosen: Vec<Context> = Vec::new();
                if queries.is_empty() && !set {
                    chosen.extend(Context::ALL);
                }
                for q in &queries {
                    for c in Context::ALL {
                        let hit = if set { *q == c.name().as_bytes() } else { c.matches_query(q) };
                        if hit && !chosen.contains(&c) {
                            chosen.push(c);
                        }
                    }
                }
                for c in &chosen {
                    let mut item = c.id().to_be_bytes().to_vec();
                    item.extend_from_slice(c.name().as_bytes());
                    proto::write_option_reply(w, option, rep::META_CONTEXT, &item)?;
                }
                if set {
                    contexts = chosen.iter().map(|c| (c.id(), *c)).collect();
                }
                reply(w, option, rep::ACK, "")?;
            }
            _ => reply(w, option, rep::ERR_UNSUP, "option not supported")?,
        }
    }
    Ok(None)
}
