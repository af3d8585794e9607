//! Backing-file operations: changing the recorded backing file (`rebase`) and emptying the image
//! (`commit`).

use blockdev::{BackingOps, Error, Result};

use crate::driver::Qcow2;
use crate::entry::OFFSET_MASK;
use crate::header::autoclear;

impl BackingOps for Qcow2 {
    fn set_backing(&self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        self.check_writable()?;
        let mut m = self.lock();
        if name.is_some() && m.h.autoclear & autoclear::DATA_FILE_RAW != 0 {
            return Err(Error::unsupported("Cannot use a backing file with data-file-raw"));
        }
        let old = (m.exts.backing_file.clone(), m.exts.backing_format.clone());
        m.exts.backing_file = name.map(str::to_string);
        m.exts.backing_format = if name.is_some() { format.map(str::to_string) } else { None };
        let io = self.file.as_ref();
        if let Err(e) = m.write_header(io, true) {
            m.exts.backing_file = old.0;
            m.exts.backing_format = old.1;
            return Err(e);
        }
        io.flush()
    }

    fn make_empty(&self) -> Result<()> {
        self.check_writable()?;
        let cs = self.cluster_size();
        let entries = self.geo.l2_entries();
        let l1_len = self.lock().l1.len();
        for i in 0..l1_len {
            let _g = self.writes.lock(i as u64 * entries, (i as u64 + 1) * entries);
            let mut m = self.lock();
            let io = self.file.as_ref();
            if m.l1[i] & OFFSET_MASK == 0 {
                continue;
            }
            for j in 0..entries {
                let gc = i as u64 * entries + j;
                let (e, b) = m.entry(io, gc)?;
                if e != 0 || b != 0 {
                    m.set_entry(io, gc, 0, 0)?;
                    crate::write::queue_entry_free(&mut m, e, cs, crate::discard::DiscardKind::Snapshot);
                }
            }
        }
        let mut m = self.lock();
        m.flush(self.file.as_ref())?;
        m.flush(self.file.as_ref())
    }
}
