//! Names in a reverse view: which of the view's names is which, and the
//! long names, whose plaintext can only be found by encrypting the
//! directory's names until one hashes the same.

// `stat` field types differ between architectures; the casts are for the others.
#![allow(clippy::unnecessary_cast)]

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex};

use fuser::Errno;
use rustix::fs::Stat;

use crate::crypto::NameCipher;
use crate::volume::layout::{self, BackingName, LONG_NAME_PREFIX, NAME_MAX, SIDECAR_SUFFIX};

pub enum ViewName<'a> {
    Short(&'a [u8]),
    Long(&'a str),
    Sidecar(&'a str),
    /// Not a name the view has (kmsfs's names all contain a `.`).
    Other,
}

pub fn parse(name: &[u8]) -> ViewName<'_> {
    let Ok(text) = std::str::from_utf8(name) else {
        return ViewName::Other;
    };
    if text.starts_with(LONG_NAME_PREFIX) {
        return match text.strip_suffix(SIDECAR_SUFFIX) {
            Some(hashed) => ViewName::Sidecar(hashed),
            None => ViewName::Long(text),
        };
    }
    if text.contains('.') {
        return ViewName::Other;
    }
    ViewName::Short(name)
}

/// The plaintext of a short encrypted name; a name that would be stored
/// long has no short form.
pub fn decrypt_short(names: &NameCipher, iv: &[u8; 16], encrypted: &[u8]) -> Result<OsString, Errno> {
    let plain = names.decrypt(iv, encrypted).map_err(|_| Errno::ENOENT)?;
    if plain.is_empty() || plain.len() > NAME_MAX || plain.contains(&b'/') || plain == b"." || plain == b".." {
        return Err(Errno::ENOENT);
    }
    Ok(OsStr::from_bytes(&plain).to_os_string())
}

/// Hashed name → (plaintext name, full encrypted name).
type LongMap = HashMap<String, (OsString, String)>;
/// A directory's mtime (seconds, nanoseconds): while it stays, so do its names.
type MtimeStamp = (i64, i64);

/// Per directory (by inode, while its mtime stays), the hashed long names
/// of its entries.
#[derive(Default)]
pub struct LongNames {
    cache: Mutex<HashMap<u64, (MtimeStamp, Arc<LongMap>)>>,
}

/// Names shorter than this are always stored whole (FORMAT.md, "Names").
const SHORTEST_LONG: usize = 160;
const CACHED_DIRS: usize = 1024;

impl LongNames {
    /// The plaintext name and full encrypted name behind `hashed` in the
    /// directory `dir` (opened for reading).
    pub fn find(
        &self,
        names: &NameCipher,
        dir: OwnedFd,
        st: &Stat,
        iv: &[u8; 16],
        hashed: &str,
    ) -> Option<(OsString, String)> {
        let stamp = (st.st_mtime as i64, st.st_mtime_nsec as i64);
        let ino = st.st_ino as u64;
        let cached = crate::util::lock(&self.cache)
            .get(&ino)
            .filter(|(at, _)| *at == stamp)
            .map(|(_, map)| Arc::clone(map));
        let map = match cached {
            Some(map) => map,
            None => {
                let map = Arc::new(Self::scan(names, dir, iv)?);
                let mut cache = crate::util::lock(&self.cache);
                if cache.len() >= CACHED_DIRS {
                    cache.clear();
                }
                cache.insert(ino, (stamp, Arc::clone(&map)));
                map
            }
        };
        map.get(hashed).cloned()
    }

    fn scan(names: &NameCipher, dir: OwnedFd, iv: &[u8; 16]) -> Option<LongMap> {
        let mut map = LongMap::new();
        let mut entries = rustix::fs::Dir::new(dir).ok()?;
        while let Some(Ok(entry)) = entries.next() {
            let name = entry.file_name().to_bytes();
            if name.len() < SHORTEST_LONG {
                continue;
            }
            if let BackingName::Long { hashed, encrypted } = layout::backing_name(names, iv, name) {
                map.insert(hashed, (OsStr::from_bytes(name).to_os_string(), encrypted));
            }
        }
        Some(map)
    }
}
