//! Key-slot management of an open LUKS volume, as `qemu-img amend` does it: adding a passphrase
//! (`state=active`, `new-secret`, optionally `keyslot` and `iter-time`) and erasing slots
//! (`state=inactive` with `keyslot` and/or `old-secret`), with qemu's rules and messages.
//!
//! Update order (a crash leaves the volume openable with every passphrase that was not being
//! erased):
//! - adding: the new slot's material is written and flushed, then the header marking it active;
//! - erasing: the header marking the slot inactive is written and flushed first, then the
//!   material is overwritten with random bytes and flushed.
//!
//! Safety rails as qemu's: the last active slot is never erased and an active slot never
//! overwritten unless `force` is given.

use zeroize::Zeroizing;

use super::luks::{KeySlot, LuksHeader, KEY_SLOTS};
use super::{random, Secret};
use crate::options::CreateOptions;
use crate::{Error, Result, Storage};

/// qemu's default `iter-time` for a new slot, in milliseconds.
const DEFAULT_ITER_TIME_MS: u64 = 2000;

/// What an `amend` asks of the slots, read from the options under a prefix (`"encrypt."` for
/// qcow2, `""` for the `luks` format).
struct Request<'a> {
    opts: &'a CreateOptions,
    prefix: &'a str,
    activate: bool,
    /// The slot index as qemu's C `int` holds it (negative when given as such).
    keyslot: Option<i32>,
    iter_time: Option<u64>,
}

impl<'a> Request<'a> {
    fn parse(opts: &'a CreateOptions, prefix: &'a str) -> Result<Request<'a>> {
        let activate = match opts.get(&format!("{prefix}state")) {
            None => return Err(Error::invalid_argument("Parameter 'state' is missing")),
            Some("active") => true,
            Some("inactive") => false,
            Some(v) => return Err(Error::invalid_argument(format!("Parameter 'state' does not accept value '{v}'"))),
        };
        // Numbers wrap as strtoull does; the index is then narrowed to an `int`.
        let keyslot = opts.get_number(&format!("{prefix}keyslot"))?.map(|n| n as i64 as i32);
        let iter_time = opts.get_number(&format!("{prefix}iter-time"))?;
        Ok(Request { opts, prefix, activate, keyslot, iter_time })
    }

    fn has(&self, key: &str) -> bool {
        self.opts.get(&format!("{}{key}", self.prefix)).is_some()
    }

    /// The secret option `key` names (qemu's "No secret with id" when it names none).
    fn secret(&self, key: &str) -> Result<Option<Secret>> {
        self.opts.secret(&format!("{}{key}", self.prefix))
    }
}

/// The LUKS area of an open image: where its header lives and the passphrase it was opened with.
pub struct SlotEditor<'a> {
    /// The container holding the area.
    pub storage: &'a dyn Storage,
    /// Offset of the LUKS header in `storage`.
    pub base: u64,
    /// The passphrase the image was opened with (adding a slot unlocks the volume key with it).
    pub opened_with: Option<&'a Secret>,
}

/// Whether `opts` carries any of the key-slot options under `prefix`.
pub fn requested(opts: &CreateOptions, prefix: &str) -> bool {
    ["state", "keyslot", "old-secret", "new-secret", "iter-time"]
        .iter()
        .any(|k| opts.get(&format!("{prefix}{k}")).is_some())
}

impl SlotEditor<'_> {
    /// Applies the key-slot options in `opts` (under `prefix`) to `header`, on disk and in
    /// memory. `force` allows overwriting an active slot and erasing the last one.
    pub fn amend(&self, header: &mut LuksHeader, opts: &CreateOptions, prefix: &str, force: bool) -> Result<()> {
        let req = Request::parse(opts, prefix)?;
        if req.activate {
            self.add(header, &req, force)
        } else {
            self.erase_requested(header, &req, force)
        }
    }

    fn add(&self, header: &mut LuksHeader, req: &Request, force: bool) -> Result<()> {
        if !req.has("new-secret") {
            return Err(Error::invalid_argument("'new-secret' is required to activate a keyslot"));
        }
        if req.has("old-secret") {
            return Err(Error::invalid_argument("'old-secret' must not be given when activating keyslots"));
        }
        let slot = match req.keyslot {
            Some(k) => {
                if !(0..KEY_SLOTS as i32).contains(&k) {
                    return Err(Error::invalid_argument(format!(
                        "Invalid keyslot {} specified, must be between 0 and {}",
                        k as u32,
                        KEY_SLOTS - 1
                    )));
                }
                k as usize
            }
            None => header
                .slots
                .iter()
                .position(|s| !s.active)
                .ok_or_else(|| Error::invalid_argument("Can't add a keyslot - all keyslots are in use"))?,
        };
        if !force && header.slots[slot].active {
            return Err(Error::invalid_argument(format!(
                "Refusing to overwrite active keyslot {slot} - please erase it first"
            )));
        }
        let opened =
            self.opened_with.ok_or_else(|| Error::invalid_argument("Parameter 'key-secret' is required for cipher"))?;
        let mut read = |off: u64, buf: &mut [u8]| crate::read_exact_at(self.storage, self.base + off, buf);
        let (_, key) = header.unlock(opened.bytes(), &mut read)?;
        let new = req.secret("new-secret")?.ok_or_else(|| Error::invalid_argument("'new-secret' is missing"))?;
        let iter_time = req.iter_time.unwrap_or(DEFAULT_ITER_TIME_MS);
        let (entry, material) = header.make_slot(slot, &key, new.bytes(), iter_time)?;
        let material = Zeroizing::new(material);
        crate::write_all_at(self.storage, self.base + header.material_range(slot).start, &material)?;
        self.storage.flush()?;
        let mut updated = header.clone();
        updated.slots[slot] = entry;
        self.store_header(&updated)?;
        *header = updated;
        Ok(())
    }

    fn erase_requested(&self, header: &mut LuksHeader, req: &Request, force: bool) -> Result<()> {
        if req.has("new-secret") {
            return Err(Error::invalid_argument("'new-secret' must not be given when erasing keyslots"));
        }
        if req.has("iter-time") {
            return Err(Error::invalid_argument("'iter-time' must not be given when erasing keyslots"));
        }
        let old = req.secret("old-secret")?;
        let active = header.slots.iter().filter(|s| s.active).count();
        if let Some(k) = req.keyslot {
            if !(0..KEY_SLOTS as i32).contains(&k) {
                return Err(Error::invalid_argument(format!(
                    "Invalid keyslot {k} specified, must be between 0 and {}",
                    KEY_SLOTS - 1
                )));
            }
            let slot = k as usize;
            if let Some(old) = &old {
                if !self.slot_opens(header, slot, old)? {
                    return Err(Error::invalid_argument(format!(
                        "Given keyslot {slot} doesn't contain the given old password for erase operation"
                    )));
                }
            }
            if !force && !header.slots[slot].active {
                return Err(Error::invalid_argument(format!("Given keyslot {slot} is already erased (inactive) ")));
            }
            if !force && active == 1 {
                return Err(Error::invalid_argument(format!(
                    "Attempt to erase the only active keyslot {slot} which will erase all the data in the image \
                     irreversibly - refusing operation"
                )));
            }
            return self.erase(header, &[slot]);
        }
        let Some(old) = old else {
            return Err(Error::invalid_argument(
                "To erase keyslot(s), either explicit keyslot index or the password currently contained in them \
                 must be given",
            ));
        };
        let mut matching = Vec::new();
        for slot in 0..KEY_SLOTS {
            if self.slot_opens(header, slot, &old)? {
                matching.push(slot);
            }
        }
        if matching.is_empty() {
            return Err(Error::invalid_argument("No keyslots match given (old) password for erase operation"));
        }
        if !force && matching.len() == active {
            return Err(Error::invalid_argument(
                "All the active keyslots match the (old) password that was given and erasing them will erase all \
                 the data in the image irreversibly - refusing operation",
            ));
        }
        self.erase(header, &matching)
    }

    /// Whether `passphrase` opens slot `slot` (an inactive slot opens with none).
    fn slot_opens(&self, header: &LuksHeader, slot: usize, passphrase: &Secret) -> Result<bool> {
        if !header.slots[slot].active {
            return Ok(false);
        }
        let mut material = Zeroizing::new(vec![0u8; header.material_len()]);
        crate::read_exact_at(self.storage, self.base + header.material_range(slot).start, &mut material)?;
        Ok(header.open_slot(slot, &material, passphrase.bytes())?.is_some())
    }

    /// Marks `slots` inactive on disk (header first), then overwrites their material.
    fn erase(&self, header: &mut LuksHeader, slots: &[usize]) -> Result<()> {
        let mut updated = header.clone();
        for &i in slots {
            updated.slots[i] = KeySlot::inactive(header.slots[i].key_offset);
        }
        self.store_header(&updated)?;
        *header = updated;
        let mut garbage = vec![0u8; header.material_len()];
        for &i in slots {
            random::fill(&mut garbage)?;
            crate::write_all_at(self.storage, self.base + header.material_range(i).start, &garbage)?;
        }
        self.storage.flush()
    }

    fn store_header(&self, header: &LuksHeader) -> Result<()> {
        crate::write_all_at(self.storage, self.base, &header.encode())?;
        self.storage.flush()
    }
}
