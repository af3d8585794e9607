//! Opens fuzzed bytes as a VMDK disk (in memory: a monolithic sparse or streamOptimized file, or
//! a descriptor whose extents need no other file; references to other files are refused) and
//! runs a short sequence of reads, writes, zero writes, block-status queries, flushes and a check,
//! then closes it (which ends a stream): `vdisk_fuzz::exercise_image`. Any panic, hang or
//! unbounded allocation is a bug: errors are fine.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vdisk_fuzz::exercise_image(&vmdk::VmdkFormat, "fuzz.vmdk", data));
