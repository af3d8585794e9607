//! Opens fuzzed bytes as a VDI image (in memory) and runs a short sequence of reads, writes
//! (block allocation), zero writes, block-status queries, flushes and a check, then closes it:
//! `vdisk_fuzz::exercise_image`. Any panic, hang or unbounded allocation is a bug: errors are fine.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vdisk_fuzz::exercise_image(&vdi::VdiFormat, "fuzz.vdi", data));
