//! Every kmsfs process may unlock keys, so each starts by making itself a
//! poor place to find them: no core dumps, not dumpable (so other processes
//! of the same user cannot ptrace it or read its /proc files), and the
//! passphrase variable wiped from the memory /proc/PID/environ shows.

use std::ffi::CStr;

use rustix::process::{DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit};
use zeroize::Zeroizing;

/// Turns off core dumps and ptrace/proc access by other processes of the
/// same user. A failure is logged: the command still works without it.
pub fn harden_process() {
    if let Err(e) = setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    ) {
        log::warn!("cannot turn off core dumps (RLIMIT_CORE): {e}");
    }
    if let Err(e) = set_dumpable_behavior(DumpableBehavior::NotDumpable) {
        log::warn!("cannot mark the process non-dumpable: {e}");
    }
}

/// Takes a secret from the environment: returns its value, overwrites the
/// original bytes with zeros (the ones /proc/PID/environ reads) and removes
/// the variable. Must run before any other thread exists.
pub fn take_env_secret(name: &str) -> Option<Zeroizing<String>> {
    let value = Zeroizing::new(std::env::var(name).ok()?);
    let prefix = format!("{name}=");
    // SAFETY: called from `main` before any thread is started, so nothing
    // reads or changes the environment meanwhile. `environ` is a
    // NULL-terminated array of NUL-terminated strings; only bytes inside the
    // value of the matching entry (before its NUL) are written.
    unsafe {
        let mut entry = libc::environ;
        while !entry.is_null() && !(*entry).is_null() {
            let bytes = CStr::from_ptr(*entry).to_bytes();
            if let Some(rest) = bytes.strip_prefix(prefix.as_bytes()) {
                std::ptr::write_bytes((*entry).add(prefix.len()), 0, rest.len());
            }
            entry = entry.add(1);
        }
        std::env::remove_var(name);
    }
    Some(value)
}
