//! Opens fuzzed bytes as a VHD (in memory: fixed, dynamic, or differencing with its parent refused)
//! and runs a short sequence of reads, writes (block allocation and table write-back), zero
//! writes, block-status queries and flushes, then closes it: `vdisk_fuzz::exercise_image`. Any
//! panic, hang or unbounded allocation is a bug: errors are fine.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vdisk_fuzz::exercise_image(&vpc::VpcFormat, "fuzz.vhd", data));
