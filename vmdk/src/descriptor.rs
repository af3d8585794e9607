//! The VMDK descriptor: the text that names the disk's extents and carries its CID chain and
//! disk database (`ddb.*`) keys.
//!
//! Parsing is bounded ([`MAX_DESCRIPTOR_BYTES`], [`MAX_EXTENTS`]) and strict about extent lines
//! (access, a positive sector count, a known type, a quoted file name for every type but ZERO);
//! unknown keys are kept. LF and CRLF line ends are accepted. The text is kept as read, so that
//! updating one key (the CID on first write) rewrites only that line and every `ddb` key and
//! comment survives.

use blockdev::{Error, Result};

/// Largest descriptor vdisk reads (qemu reads at most 2 MiB of a descriptor file).
pub const MAX_DESCRIPTOR_BYTES: usize = 2 << 20;

/// Most extents one descriptor may name.
pub const MAX_EXTENTS: usize = 4096;

/// `parentCID` of a disk without a parent.
pub const NO_PARENT: u32 = 0xffff_ffff;

/// How an extent may be accessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `RW`.
    ReadWrite,
    /// `RDONLY`.
    ReadOnly,
    /// `NOACCESS`: reads as zeros, never written.
    NoAccess,
}

/// What an extent holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentType {
    /// `FLAT` (and ESXi's `VMFS`): the sectors as they are, from an offset in the file.
    Flat,
    /// `SPARSE`: a hosted sparse extent (`KDMV` header, grain directory and tables).
    Sparse,
    /// `ZERO`: no file; reads as zeros.
    Zero,
    /// ESXi's `VMFSSPARSE` (`COWD`) and `SESPARSE` extents, which vdisk does not read.
    Unsupported,
}

/// One extent line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    /// Access mode.
    pub access: Access,
    /// Size in 512-byte sectors.
    pub sectors: u64,
    /// Kind.
    pub kind: ExtentType,
    /// The type as written (`FLAT`, `VMFS`, ...), for `info`.
    pub type_name: String,
    /// File name as written (relative to the descriptor's directory unless absolute).
    pub file: Option<String>,
    /// Sector offset of the extent's data in a FLAT file.
    pub offset: u64,
}

/// A parsed descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// The text as read (LF line ends).
    pub text: String,
    /// `CID`.
    pub cid: u32,
    /// `parentCID`.
    pub parent_cid: u32,
    /// `createType`.
    pub create_type: String,
    /// `parentFileNameHint`, for delta disks.
    pub parent_hint: Option<String>,
    /// The extents in order.
    pub extents: Vec<ExtentLine>,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::invalid_image(msg.into())
}

/// The value of a `key = "value"` or `key=value` line, unquoted.
fn key_value(line: &str) -> Option<(&str, &str)> {
    let (k, v) = line.split_once('=')?;
    let v = v.trim();
    let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
    Some((k.trim(), v))
}

fn parse_hex32(what: &str, v: &str) -> Result<u32> {
    u32::from_str_radix(v, 16).map_err(|_| invalid(format!("Invalid {what} '{v}' in the VMDK descriptor")))
}

/// Parses one extent line (`RW 204800 SPARSE "name.vmdk"`, `RW 2048 FLAT "f" 128`, `RW 8 ZERO`).
fn parse_extent(line: &str) -> Result<ExtentLine> {
    let bad = || invalid(format!("Invalid extent line: {line}"));
    let mut rest = line.trim();
    let mut word = || -> Option<&str> {
        let r = rest.trim_start();
        let end = r.find(char::is_whitespace).unwrap_or(r.len());
        let (w, tail) = r.split_at(end);
        rest = tail;
        (!w.is_empty()).then_some(w)
    };
    let access = match word().ok_or_else(bad)? {
        "RW" => Access::ReadWrite,
        "RDONLY" => Access::ReadOnly,
        "NOACCESS" => Access::NoAccess,
        _ => return Err(bad()),
    };
    let sectors: u64 = word().and_then(|w| w.parse().ok()).ok_or_else(bad)?;
    let type_name = word().ok_or_else(bad)?.to_string();
    let kind = match type_name.as_str() {
        "FLAT" | "VMFS" => ExtentType::Flat,
        "SPARSE" => ExtentType::Sparse,
        "ZERO" => ExtentType::Zero,
        "VMFSSPARSE" | "SESPARSE" | "VMFSRDM" | "VMFSRAW" => ExtentType::Unsupported,
        _ => return Err(bad()),
    };
    let tail = rest.trim();
    let (file, offset) = if tail.is_empty() {
        (None, None)
    } else {
        let q = tail.strip_prefix('"').ok_or_else(bad)?;
        let close = q.find('"').ok_or_else(bad)?;
        let name = &q[..close];
        let after = q[close + 1..].trim();
        let offset = if after.is_empty() { None } else { Some(after.parse().map_err(|_| bad())?) };
        (Some(name.to_string()), offset)
    };
    // FLAT extents name their start in the file; the others (VMFS included) must not, as in qemu.
    if (type_name == "FLAT") != offset.is_some() && kind != ExtentType::Zero {
        return Err(bad());
    }
    let offset = offset.unwrap_or(0);
    if sectors == 0 && kind != ExtentType::Zero {
        return Err(bad());
    }
    if kind != ExtentType::Zero && file.as_deref().is_none_or(str::is_empty) {
        return Err(bad());
    }
    Ok(ExtentLine { access, sectors, kind, type_name, file, offset })
}

impl Descriptor {
    /// Parses descriptor text.
    pub fn parse(bytes: &[u8]) -> Result<Descriptor> {
        let bytes = &bytes[..bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len())];
        if bytes.len() > MAX_DESCRIPTOR_BYTES {
            return Err(invalid("VMDK descriptor too large"));
        }
        let text = String::from_utf8_lossy(bytes).replace("\r\n", "\n");
        let mut cid = None;
        let mut parent_cid = NO_PARENT;
        let mut create_type = None;
        let mut parent_hint = None;
        let mut extents = Vec::new();
        let mut version_seen = false;
        for raw in text.lines() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.starts_with("RW ") || line.starts_with("RDONLY ") || line.starts_with("NOACCESS ") {
                if extents.len() == MAX_EXTENTS {
                    return Err(invalid(format!("More than {MAX_EXTENTS} extents in the VMDK descriptor")));
                }
                extents.push(parse_extent(line)?);
                continue;
            }
            let Some((k, v)) = key_value(line) else { continue };
            match k {
                "version" => version_seen = true,
                "CID" => cid = Some(parse_hex32("CID", v)?),
                "parentCID" => parent_cid = parse_hex32("parentCID", v)?,
                "createType" => create_type = Some(v.to_string()),
                "parentFileNameHint" => parent_hint = Some(v.to_string()),
                _ => {}
            }
        }
        if !version_seen {
            return Err(invalid("VMDK descriptor has no version line"));
        }
        let create_type = create_type.ok_or_else(|| invalid("invalid VMDK image descriptor"))?;
        if extents.is_empty() {
            return Err(invalid("Invalid VMDK image descriptor: no extents"));
        }
        Ok(Descriptor { text, cid: cid.unwrap_or(0), parent_cid, create_type, parent_hint, extents })
    }

    /// Whether `head` (the start of a file) looks like a descriptor: its first line that is not
    /// a comment or blank is `version=1`, `2` or `3`, as qemu probes.
    pub fn probe(head: &[u8]) -> bool {
        let text = String::from_utf8_lossy(&head[..head.len().min(4096)]);
        text.lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .and_then(key_value)
            .is_some_and(|(k, v)| k == "version" && matches!(v, "1" | "2" | "3"))
    }

    /// The text with key `key` set to `value` (the line replaced in place, or added after the
    /// `version` line), everything else unchanged.
    pub fn with_key(&self, key: &str, value: &str) -> String {
        let is = |line: &str, k: &str| key_value(line.trim()).is_some_and(|(lk, _)| lk == k);
        let present = self.text.lines().any(|l| is(l, key));
        let mut out = String::with_capacity(self.text.len() + 32);
        for line in self.text.lines() {
            if present && is(line, key) {
                out.push_str(&format!("{key}={value}\n"));
                continue;
            }
            out.push_str(line);
            out.push('\n');
            if !present && is(line, "version") {
                out.push_str(&format!("{key}={value}\n"));
            }
        }
        out
    }
}

/// What a new descriptor says (qemu's layout and key order).
pub struct NewDescriptor<'a> {
    /// `CID`.
    pub cid: u32,
    /// `parentCID`.
    pub parent_cid: u32,
    /// `createType`.
    pub create_type: &'a str,
    /// `parentFileNameHint` line, for delta disks.
    pub parent_hint: Option<&'a str>,
    /// Extent lines, already formatted.
    pub extents: &'a [String],
    /// `ddb.virtualHWVersion`.
    pub hw_version: &'a str,
    /// Geometry: cylinders, heads, sectors.
    pub geometry: (u64, u32, u32),
    /// `ddb.adapterType`.
    pub adapter: &'a str,
    /// `ddb.toolsVersion`.
    pub tools_version: &'a str,
}

impl NewDescriptor<'_> {
    /// The text, as qemu-img writes it.
    pub fn render(&self) -> String {
        let mut s = String::new();
        s.push_str("# Disk DescriptorFile\nversion=1\n");
        s.push_str(&format!("CID={:x}\nparentCID={:x}\n", self.cid, self.parent_cid));
        s.push_str(&format!("createType=\"{}\"\n", self.create_type));
        if let Some(hint) = self.parent_hint {
            s.push_str(&format!("parentFileNameHint=\"{hint}\"\n"));
        }
        s.push_str("\n# Extent description\n");
        for e in self.extents {
            s.push_str(e);
            s.push('\n');
        }
        s.push_str("\n# The Disk Data Base\n#DDB\n\n");
        s.push_str(&format!("ddb.virtualHWVersion = \"{}\"\n", self.hw_version));
        let (c, h, sec) = self.geometry;
        s.push_str(&format!("ddb.geometry.cylinders = \"{c}\"\nddb.geometry.heads = \"{h}\"\n"));
        s.push_str(&format!("ddb.geometry.sectors = \"{sec}\"\n"));
        s.push_str(&format!("ddb.adapterType = \"{}\"\n", self.adapter));
        s.push_str(&format!("ddb.toolsVersion = \"{}\"\n", self.tools_version));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU: &str = "# Disk DescriptorFile\r\nversion=1\r\nCID=32a406b1\r\nparentCID=ffffffff\r\n\
        createType=\"twoGbMaxExtentFlat\"\r\n\r\n# Extent description\r\nRW 4194304 FLAT \"a b-f001.vmdk\" 0\r\n\
        RDONLY 100 SPARSE \"s.vmdk\"\r\nNOACCESS 8 ZERO\r\n\r\nddb.adapterType = \"ide\"\r\n";

    #[test]
    fn parses_qemu_style_descriptor_with_crlf_and_spaces_in_names() {
        let d = Descriptor::parse(QEMU.as_bytes()).unwrap();
        assert_eq!((d.cid, d.parent_cid, d.create_type.as_str()), (0x32a406b1, NO_PARENT, "twoGbMaxExtentFlat"));
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[0].file.as_deref(), Some("a b-f001.vmdk"));
        assert_eq!((d.extents[0].kind, d.extents[0].sectors), (ExtentType::Flat, 4194304));
        assert_eq!((d.extents[1].access, d.extents[1].kind), (Access::ReadOnly, ExtentType::Sparse));
        assert_eq!(
            (d.extents[2].access, d.extents[2].kind, d.extents[2].file.as_deref()),
            (Access::NoAccess, ExtentType::Zero, None)
        );
        assert!(Descriptor::probe(QEMU.as_bytes()));
    }

    #[test]
    fn rejects_bad_extent_lines() {
        for bad in [
            "RW x FLAT \"f\" 0",
            "RW 10 BOGUS \"f\"",
            "RW 10 FLAT",
            "RW 0 FLAT \"f\" 0",
            "RW 10 FLAT \"f",
            "RW 10 FLAT \"f\"",
            "RW 10 VMFS \"f\" 1",
            "RW 10 SPARSE \"f\" 5",
            "RW 10 ZERO 5",
        ] {
            let text = format!("version=1\ncreateType=\"custom\"\n{bad}\n");
            assert!(Descriptor::parse(text.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn with_key_rewrites_one_line_and_keeps_the_rest() {
        let d = Descriptor::parse(QEMU.as_bytes()).unwrap();
        let t = d.with_key("CID", "0000abcd");
        let again = Descriptor::parse(t.as_bytes()).unwrap();
        assert_eq!(again.cid, 0xabcd);
        assert!(t.contains("ddb.adapterType = \"ide\""));
        assert_eq!(again.extents, d.extents);
    }
}
