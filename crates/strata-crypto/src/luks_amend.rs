//! Key slot management (QEMU: qcrypto_block_luks_amend_options): adding a
//! password to a slot, or erasing slots by index or by the password they
//! hold, refusing by default to lose the last way in.

use crate::luks::{Luks, Writes, DEFAULT_ITER_TIME_MS, NUM_SLOTS};
use crate::{secret, Error, Result};

/// QCryptoBlockAmendOptionsLUKS.
#[derive(Clone, Debug, Default)]
pub struct AmendOptions {
    /// `active` adds a password, `inactive` erases.
    pub active: bool,
    pub new_secret: Option<String>,
    pub old_secret: Option<String>,
    pub keyslot: Option<i64>,
    pub iter_time_ms: Option<u64>,
    /// The secret that unlocks the master key (default: the one the image
    /// was opened with).
    pub secret: Option<String>,
}

fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::new(msg))
}

impl Luks {
    /// Applies `o` to the header; `materials` are the slots' key material
    /// as read, `open_secret` the secret the image was opened with.
    /// Returns the writes to make into the header region.
    pub fn amend(
        &mut self,
        o: &AmendOptions,
        force: bool,
        open_secret: Option<&str>,
        materials: &[Vec<u8>],
    ) -> Result<Writes> {
        if o.active {
            self.add_keyslot(o, force, open_secret, materials)
        } else {
            self.erase_keyslots(o, force, materials)
        }
    }

    fn add_keyslot(
        &mut self,
        o: &AmendOptions,
        force: bool,
        open_secret: Option<&str>,
        materials: &[Vec<u8>],
    ) -> Result<Writes> {
        let Some(new_secret) = &o.new_secret else {
            return err("'new-secret' is required to activate a keyslot");
        };
        if o.old_secret.is_some() {
            return err("'old-secret' must not be given when activating keyslots");
        }
        let slot = match o.keyslot {
            Some(k) if !(0..NUM_SLOTS as i64).contains(&k) => {
                return err(format!(
                    "Invalid keyslot {} specified, must be between 0 and {}",
                    k as u32,
                    NUM_SLOTS - 1
                ))
            }
            Some(k) => k as usize,
            None => self
                .free_slot()
                .ok_or_else(|| Error::new("Can't add a keyslot - all keyslots are in use"))?,
        };
        if !force && self.header.slots[slot].is_active() {
            return err(format!(
                "Refusing to overwrite active keyslot {slot} - please erase it first"
            ));
        }
        let unlock_with = o
            .secret
            .as_deref()
            .or(open_secret)
            .ok_or_else(|| Error::new("Parameter 'key-secret' is required for cipher"))?;
        let old = secret::lookup_utf8(unlock_with)?;
        let master = self.unlock(old.as_bytes(), materials)?;
        let new = secret::lookup_utf8(new_secret)?;
        self.store_key(
            slot,
            new.as_bytes(),
            &master,
            o.iter_time_ms.unwrap_or(DEFAULT_ITER_TIME_MS),
        )
    }

    fn erase_keyslots(
        &mut self,
        o: &AmendOptions,
        force: bool,
        materials: &[Vec<u8>],
    ) -> Result<Writes> {
        if o.new_secret.is_some() {
            return err("'new-secret' must not be given when erasing keyslots");
        }
        if o.iter_time_ms.is_some() {
            return err("'iter-time' must not be given when erasing keyslots");
        }
        if o.secret.is_some() {
            return err("'secret' must not be given when erasing keyslots");
        }
        let old = o
            .old_secret
            .as_deref()
            .map(secret::lookup_utf8)
            .transpose()?;
        if let Some(k) = o.keyslot {
            if !(0..NUM_SLOTS as i64).contains(&k) {
                return err(format!(
                    "Invalid keyslot {k} specified, must be between 0 and {}",
                    NUM_SLOTS - 1
                ));
            }
            let k = k as usize;
            if let Some(pw) = &old {
                let opened = self.slots_opened_by(pw.as_bytes(), materials)?;
                if !opened.contains(&k) {
                    return err(format!(
                        "Given keyslot {k} doesn't contain the given old password for erase operation"
                    ));
                }
            }
            if !force && !self.header.slots[k].is_active() {
                return err(format!("Given keyslot {k} is already erased (inactive) "));
            }
            if !force && self.active_slots() == 1 {
                return err(format!(
                    "Attempt to erase the only active keyslot {k} which will erase all the data in the image irreversibly - refusing operation"
                ));
            }
            return self.erase_key(k);
        }
        let Some(pw) = old else {
            return err("To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be given");
        };
        let slots = self.slots_opened_by(pw.as_bytes(), materials)?;
        if slots.is_empty() {
            return err("No keyslots match given (old) password for erase operation");
        }
        if !force && slots.len() == self.active_slots() {
            return err("All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation");
        }
        let mut writes = Vec::new();
        for k in slots {
            writes.extend(self.erase_key(k)?);
        }
        Ok(writes)
    }
}
