//! Formats qemu recognises that vdisk cannot open yet: their probes, so that such an image is
//! refused with its format's name instead of being opened as raw.
//!
//! Invariant: every format whose probe qemu-img 10.0.2 runs when it guesses a format is either a
//! registered [`Format`](blockdev::Format) or listed in [`FOREIGN_FORMATS`], with the same score
//! qemu's probe gives the same bytes. Probing can then never settle on raw for a file qemu opens
//! as something else, so `convert` cannot copy a container's bytes as if they were its disk.
//! An explicit `-f raw` still opens any file as raw, as in qemu.
//!
//! The scores (100 for a magic, 2 for cloop's shell preamble and dmg's file name, raw's fallback
//! being 1) follow qemu's, so the same file probes as the same format in both tools.

/// A format qemu recognises and vdisk cannot open yet.
#[derive(Debug)]
pub struct ForeignFormat {
    /// qemu's name of the format (`-f NAME`).
    pub name: &'static str,
    /// How the format is named in the refusal ("qcow (version 1)" for qemu's `qcow`).
    pub description: &'static str,
    /// qemu's probe score for a file starting with `head` and called `filename` (0 = not this
    /// format).
    pub probe: fn(head: &[u8], filename: &str) -> u32,
}

impl ForeignFormat {
    /// The error for an image probed as this format.
    pub fn refusal(&self) -> blockdev::Error {
        blockdev::Error::unsupported(format!(
            "Image is in the {} format, which vdisk does not support yet",
            self.description
        ))
    }

    /// The error for this format named by the user (`-f`, `-O`, a json: driver).
    pub fn named_refusal(&self) -> blockdev::Error {
        blockdev::Error::unsupported(format!("Image format '{}' is not supported by vdisk yet", self.name))
    }
}

/// Every format qemu probes that vdisk has no driver for, in qemu's driver order.
pub static FOREIGN_FORMATS: &[ForeignFormat] = &[
    ForeignFormat { name: "bochs", description: "bochs", probe: probe_bochs },
    ForeignFormat { name: "cloop", description: "cloop", probe: probe_cloop },
    ForeignFormat { name: "dmg", description: "dmg", probe: probe_dmg },
    ForeignFormat { name: "parallels", description: "parallels", probe: probe_parallels },
    ForeignFormat { name: "qcow", description: "qcow (version 1)", probe: probe_qcow },
    ForeignFormat { name: "qed", description: "qed", probe: probe_qed },
    ForeignFormat { name: "vhdx", description: "vhdx", probe: probe_vhdx },
];

/// The foreign format called `name`, if qemu has such a format and vdisk does not.
pub fn foreign_format(name: &str) -> Option<&'static ForeignFormat> {
    FOREIGN_FORMATS.iter().find(|f| f.name == name)
}

/// Little-endian u32 at `at` (the caller has checked the length).
fn le32(head: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]])
}

/// A NUL-terminated text field of `head[at..at + len]` equals `text` (C's `strcmp` on a field
/// that must hold the terminator within the field).
fn c_string_is(head: &[u8], at: usize, len: usize, text: &str) -> bool {
    let field = &head[at..at + len];
    field.len() > text.len() && field.starts_with(text.as_bytes()) && field[text.len()] == 0
}

/// Bochs growing redolog: three text fields and version 1 or 2 in a 512-byte header.
fn probe_bochs(head: &[u8], _filename: &str) -> u32 {
    const HEADER_SIZE: usize = 512;
    if head.len() < HEADER_SIZE {
        return 0;
    }
    let text_ok = c_string_is(head, 0, 32, "Bochs Virtual HD Image")
        && c_string_is(head, 32, 16, "Redolog")
        && c_string_is(head, 48, 16, "Growing");
    let version = le32(head, 64);
    if text_ok && (version == 0x0002_0000 || version == 0x0001_0000) {
        100
    } else {
        0
    }
}

/// cloop (compressed loop) images start with the shell preamble of version 2.0. qemu compares
/// only as much of it as the file has, so a shorter file that is a prefix of it matches too.
fn probe_cloop(head: &[u8], _filename: &str) -> u32 {
    const PREAMBLE: &[u8] = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";
    let n = PREAMBLE.len().min(head.len());
    if head[..n] == PREAMBLE[..n] {
        2
    } else {
        0
    }
}

/// Apple disk images have no magic at the start: qemu recognises them by the `.dmg` suffix.
fn probe_dmg(_head: &[u8], filename: &str) -> u32 {
    if filename.len() > 4 && filename.ends_with(".dmg") {
        2
    } else {
        0
    }
}

/// Parallels: either of its two 16-byte magics and version 2 in a 64-byte header.
fn probe_parallels(head: &[u8], _filename: &str) -> u32 {
    if head.len() < 64 {
        return 0;
    }
    let magic = &head[..16];
    if (magic == b"WithoutFreeSpace" || magic == b"WithouFreSpacExt") && le32(head, 16) == 2 {
        100
    } else {
        0
    }
}

/// QEMU's original qcow: qcow2's magic with version 1 in a 48-byte header.
fn probe_qcow(head: &[u8], _filename: &str) -> u32 {
    if head.len() >= 48 && head[..4] == *b"QFI\xfb" && head[4..8] == 1u32.to_be_bytes() {
        100
    } else {
        0
    }
}

/// QED: its little-endian magic "QED\0" in a 64-byte header.
fn probe_qed(head: &[u8], _filename: &str) -> u32 {
    if head.len() >= 64 && head[..4] == *b"QED\0" {
        100
    } else {
        0
    }
}

/// VHDX: the file type identifier "vhdxfile" at offset 0.
fn probe_vhdx(head: &[u8], _filename: &str) -> u32 {
    if head.len() >= 8 && head[..8] == *b"vhdxfile" {
        100
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score(name: &str, head: &[u8], filename: &str) -> u32 {
        (foreign_format(name).unwrap().probe)(head, filename)
    }

    #[test]
    fn magics_need_their_whole_header() {
        let mut qed = vec![0u8; 64];
        qed[..4].copy_from_slice(b"QED\0");
        assert_eq!(score("qed", &qed, "x"), 100);
        assert_eq!(score("qed", &qed[..63], "x"), 0);

        let mut qcow = vec![0u8; 48];
        qcow[..8].copy_from_slice(b"QFI\xfb\0\0\0\x01");
        assert_eq!(score("qcow", &qcow, "x"), 100);
        assert_eq!(score("qcow", &qcow[..47], "x"), 0);
        qcow[7] = 2; // qcow2, not qcow
        assert_eq!(score("qcow", &qcow, "x"), 0);

        let mut par = vec![0u8; 64];
        par[..16].copy_from_slice(b"WithouFreSpacExt");
        par[16] = 2;
        assert_eq!(score("parallels", &par, "x"), 100);
        par[16] = 3;
        assert_eq!(score("parallels", &par, "x"), 0);

        assert_eq!(score("vhdx", b"vhdxfile", "x"), 100);
        assert_eq!(score("vhdx", b"vhdxfil", "x"), 0);
    }

    #[test]
    fn bochs_fields_are_c_strings() {
        let mut h = vec![0u8; 512];
        h[..22].copy_from_slice(b"Bochs Virtual HD Image");
        h[32..39].copy_from_slice(b"Redolog");
        h[48..55].copy_from_slice(b"Growing");
        h[64..68].copy_from_slice(&0x0002_0000u32.to_le_bytes());
        assert_eq!(score("bochs", &h, "x"), 100);
        h[64..68].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        assert_eq!(score("bochs", &h, "x"), 100);
        h[55] = b'X'; // "GrowingX" is another subtype
        assert_eq!(score("bochs", &h, "x"), 0);
        h[55] = 0;
        assert_eq!(score("bochs", &h[..511], "x"), 0);
    }

    #[test]
    fn cloop_and_dmg_score_two() {
        assert_eq!(score("cloop", b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0", "x"), 2);
        assert_eq!(score("cloop", b"#!/bin/sh\n#V3.0 Format\n", "x"), 0);
        assert_eq!(score("dmg", b"", "/a/disk.dmg"), 2);
        assert_eq!(score("dmg", b"", ".dmg"), 0);
        assert_eq!(score("dmg", b"", "disk.DMG"), 0);
    }
}
