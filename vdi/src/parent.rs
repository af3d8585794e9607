//! Finding the parent of a differencing VDI.
//!
//! A differencing VDI names its parent only by UUID (`uuidLinkage`, the parent's `uuidCreate`);
//! VirtualBox finds it through its media registry, which vdisk does not have. vdisk looks for it
//! among the `*.vdi` files next to the image and in the directory above (VirtualBox keeps a VM's
//! differencing disks in `Snapshots/` below the base disk), or takes the file the caller names
//! ([`blockdev::OpenOptions::parent_hint`], `--image-opts backing.file.filename=`). Either way
//! the candidate's header must carry the signature and the linked UUID; a named file that does
//! not is refused rather than silently read through.
//!
//! Bounds: at most [`MAX_DIR_ENTRIES`] directory entries are looked at per directory, and only
//! the first sector of each `*.vdi` file is read. The reference policy of the open applies to
//! every candidate before it is read (`Deny` finds nothing, `Confine` never looks above).

use std::io::Read;
use std::path::Path;

use blockdev::{check_reference, resolve_reference, ReferencePolicy, Result};

use crate::header::{Header, SIGNATURE};

/// Most directory entries examined per directory.
pub const MAX_DIR_ENTRIES: usize = 10_000;

/// The UUID in `bytes` (file byte order: Microsoft GUID) as text.
pub fn uuid_text(bytes: &[u8; 16]) -> String {
    let mut b = *bytes;
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// The header of the VDI at `path`, if it is one.
fn read_header(path: &Path) -> Option<Header> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut head = Vec::with_capacity(512);
    f.by_ref().take(512).read_to_end(&mut head).ok()?;
    let h = Header::parse(&head);
    (h.signature == SIGNATURE).then_some(h)
}

/// Whether the file `referrer` refers to as `name` is a VDI whose create UUID is `link`.
pub fn is_parent(referrer: &str, name: &str, link: &[u8; 16]) -> bool {
    read_header(Path::new(&resolve_reference(referrer, name))).is_some_and(|h| &h.uuid_create == link)
}

/// The name (relative to `child`'s directory) of a VDI next to `child`, or in the directory
/// above, whose create UUID is `link`.
pub fn search(child: &str, link: &[u8; 16], policy: ReferencePolicy) -> Result<Option<String>> {
    if policy == ReferencePolicy::Deny {
        return Ok(None);
    }
    let own = std::fs::canonicalize(child).ok();
    let dir = Path::new(child).parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    for (prefix, at) in [("", dir.to_path_buf()), ("../", dir.join(".."))] {
        if !prefix.is_empty() && policy == ReferencePolicy::Confine {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&at) else { continue };
        let mut names: Vec<String> = entries
            .take(MAX_DIR_ENTRIES)
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.len() > 4 && n[n.len() - 4..].eq_ignore_ascii_case(".vdi"))
            .collect();
        // Directory order is the filesystem's; sorted, the choice among duplicates is stable.
        names.sort();
        for n in names {
            let name = format!("{prefix}{n}");
            if check_reference(policy, child, &name).is_err() {
                continue;
            }
            let path = at.join(&n);
            if own.is_some() && std::fs::canonicalize(&path).ok() == own {
                continue;
            }
            if read_header(&path).is_some_and(|h| &h.uuid_create == link) {
                return Ok(Some(name));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_print_in_guid_order() {
        let b = [0x33, 0x22, 0x11, 0x00, 0x55, 0x44, 0x77, 0x66, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff];
        assert_eq!(uuid_text(&b), "00112233-4455-6677-8899-aabbccddeeff");
    }
}
