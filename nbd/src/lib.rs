//! vdisk's NBD server and client. The server exports any opened image (`Arc<dyn BlockDriver>`)
//! over the Network Block Device protocol to real clients (qemu-img, qemu-io, QEMU, nbdinfo,
//! nbdcopy); the client ([`client`]) opens an export as a [`blockdev::Storage`] under any format
//! driver, named as qemu-img names NBD images ([`address`]).
//!
//! - Negotiation ([`handshake`]): fixed newstyle, `NO_ZEROES`; options `EXPORT_NAME`, `ABORT`,
//!   `LIST`, `INFO`, `GO`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT`, `SET_META_CONTEXT`; others
//!   answer `ERR_UNSUP` (no TLS, no extended headers).
//! - Transmission ([`transmission`]): `READ`, `WRITE`, `FLUSH`, `TRIM`, `WRITE_ZEROES` (with
//!   `NO_HOLE` and `FAST_ZERO`), `CACHE`, `BLOCK_STATUS` for `base:allocation` and
//!   `qemu:allocation-depth`, `DISC`; simple or structured replies; `FUA`.
//! - Serving ([`server`]): unix sockets or TCP (`TCP_NODELAY`), a thread per connection, a
//!   connection limit, persistent or one-shot (exit when the last client leaves, as qemu-nbd).
//!
//! # Invariants
//! - Nothing the client sends is trusted: option and request lengths are bounded before any
//!   buffer is sized from them; read-only exports never reach a write call.
//! - A reply is written only after the operation it answers finished; `FLUSH` and `FUA` replies
//!   only after the image flushed (durable).
//! - [`handle`] works on any byte stream, so the fuzz target drives it in memory.

pub mod address;
pub mod client;
pub mod handshake;
pub mod proto;
pub mod server;
pub mod transmission;

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::sync::Arc;

use blockdev::BlockDriver;

/// Largest READ or WRITE payload (qemu's limit too), also the block size maximum advertised.
pub const MAX_REQUEST: u32 = 32 << 20;

/// One export.
#[derive(Clone)]
pub struct Export {
    /// The name clients ask for (the empty name selects the first export).
    pub name: String,
    /// Free text shown by `LIST` and `INFO`.
    pub description: String,
    /// The image.
    pub image: Arc<dyn BlockDriver>,
    /// Refuse writes (and advertise `READ_ONLY`).
    pub read_only: bool,
    /// Advertise `CAN_MULTI_CONN` (flushes on one connection cover writes on all: true here,
    /// since every connection shares the one image).
    pub multi_conn: bool,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export").field("name", &self.name).field("read_only", &self.read_only).finish()
    }
}

/// A metadata context for block status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// `base:allocation`: hole and zero flags.
    BaseAllocation,
    /// `qemu:allocation-depth`: 0 unallocated, 1 the top image, 2 its backing file, ...
    AllocationDepth,
}

impl Context {
    /// Every context the server offers.
    pub const ALL: [Context; 2] = [Context::BaseAllocation, Context::AllocationDepth];

    /// The context's name.
    pub fn name(self) -> &'static str {
        match self {
            Context::BaseAllocation => "base:allocation",
            Context::AllocationDepth => "qemu:allocation-depth",
        }
    }

    /// The id the server gives it.
    pub fn id(self) -> u32 {
        match self {
            Context::BaseAllocation => 0,
            Context::AllocationDepth => 1,
        }
    }

    /// Whether a `LIST_META_CONTEXT` query selects it: its name, or its namespace (`base:`,
    /// `qemu:`) alone.
    pub fn matches_query(self, query: &[u8]) -> bool {
        let name = self.name().as_bytes();
        query == name || (query.ends_with(b":") && name.starts_with(query))
    }
}

/// Serves one client on a byte stream: negotiation, then requests until it leaves. Errors are
/// the stream's (or a protocol violation that ended the connection).
pub fn handle(r: impl Read, w: impl Write, exports: &[Export]) -> io::Result<()> {
    let mut r = BufReader::with_capacity(256 << 10, r);
    let mut w = BufWriter::with_capacity(256 << 10, w);
    let Some(negotiated) = handshake::negotiate(&mut r, &mut w, exports)? else { return Ok(()) };
    transmission::serve(&mut r, &mut w, &negotiated)
}
