//! Feeds fuzzed bytes to vdisk's NBD client as everything a server sends on one connection
//! (`nbd::client::NbdStorage::over_stream`: negotiation, then the replies to a fixed series of
//! requests: reads inside and across the end of the export, block status, a write, write zeroes,
//! discard, flush).
//!
//! Input layout: the first byte picks the stream prefix: with bit 0 set the target prepends a
//! valid server side of the negotiation (greeting, structured replies acknowledged when bit 1 is
//! set, the `base:allocation` context, a 1 MiB export, read-only when bit 2 is set), so mutations
//! reach the replies; the rest of the input follows as raw server bytes.
//!
//! Asserts: no panic, hang or unbounded allocation, whatever the server sends; a read that
//! succeeds past the export's end reads zeros there.

#![no_main]

use std::io::{IoSlice, IoSliceMut};

use blockdev::Storage;
use libfuzzer_sys::fuzz_target;
use nbd::client::{ClientOptions, NbdStorage};

const SIZE: u64 = 1 << 20;

fn option_reply(out: &mut Vec<u8>, opt: u32, kind: u32, data: &[u8]) {
    out.extend_from_slice(&0x0003_e889_0455_65a9u64.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut stream = Vec::with_capacity(rest.len() + 160);
    if mode & 1 != 0 {
        stream.extend_from_slice(&0x4e42_444d_4147_4943u64.to_be_bytes());
        stream.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
        stream.extend_from_slice(&3u16.to_be_bytes());
        if mode & 2 != 0 {
            option_reply(&mut stream, 8, 1, &[]);
            let mut ctx = 7u32.to_be_bytes().to_vec();
            ctx.extend_from_slice(b"base:allocation");
            option_reply(&mut stream, 10, 4, &ctx);
            option_reply(&mut stream, 10, 1, &[]);
        } else {
            option_reply(&mut stream, 8, (1 << 31) | 1, &[]);
        }
        let flags: u16 = if mode & 4 != 0 { 0b11 } else { 0b1_0110_1101 };
        let mut info = 0u16.to_be_bytes().to_vec();
        info.extend_from_slice(&SIZE.to_be_bytes());
        info.extend_from_slice(&flags.to_be_bytes());
        option_reply(&mut stream, 7, 3, &info);
        option_reply(&mut stream, 7, 1, &[]);
    }
    stream.extend_from_slice(rest);
    let opts = ClientOptions { read_only: mode & 8 != 0, ..ClientOptions::default() };
    let Ok(disk) = NbdStorage::over_stream("fuzz", std::io::Cursor::new(stream), std::io::sink(), "disk", &opts) else {
        return;
    };
    let len = disk.len().unwrap_or(0);
    let mut buf = vec![0u8; 8192];
    let _ = disk.read_at(0, &mut [IoSliceMut::new(&mut buf)]);
    let mut tail = vec![0xffu8; 8192];
    let at = len.saturating_sub(4096);
    if disk.read_at(at, &mut [IoSliceMut::new(&mut tail)]).is_ok() {
        let inside = (len - at) as usize;
        assert!(tail[inside..].iter().all(|&b| b == 0), "past the end reads zeros");
    }
    let _ = disk.data_status(0, 1 << 20);
    let _ = disk.write_at(4096, &[IoSlice::new(&[0x5a; 512])]);
    let _ = disk.write_zeroes(0, 65536, true);
    let _ = disk.discard(65536, 65536);
    let _ = disk.flush();
    let _ = disk.data_status(len / 2, 1 << 20);
});
