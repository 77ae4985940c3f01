//! Crash points the tests use to stop a command at a chosen moment, through
//! `KMSFS_TEST_*` variables. They exist only with the `test-hooks` feature,
//! which the test build turns on (see Cargo.toml): a kmsfs built for use
//! never kills itself, or changes its batch sizes, because of its
//! environment. Also what the unit and mount tests both look at.

/// The number in variable `name`, when the hooks are built in.
pub fn number(name: &str) -> Option<u64> {
    if cfg!(feature = "test-hooks") {
        std::env::var(name).ok().and_then(|v| v.parse().ok())
    } else {
        None
    }
}

/// SIGKILLs this process when the hooks are built in and `condition`
/// holds for the value of variable `name`.
pub fn kill_if(name: &str, condition: impl FnOnce(&str) -> bool) {
    if !cfg!(feature = "test-hooks") {
        return;
    }
    if std::env::var(name).is_ok_and(|v| condition(&v)) {
        let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    }
}

/// Which pages of `file` are in the page cache: the tests of what the
/// daemon asks the kernel to read ahead look with this.
#[doc(hidden)]
pub fn resident_pages(file: &std::fs::File) -> std::io::Result<Vec<bool>> {
    use std::os::fd::AsRawFd;
    let len = usize::try_from(file.metadata()?.len()).map_err(std::io::Error::other)?;
    if len == 0 {
        return Ok(Vec::new());
    }
    let mut pages = vec![0u8; len.div_ceil(4096)];
    // SAFETY: a read-only shared mapping of an open file, unmapped before
    // returning; mincore writes one byte per page of it into `pages`.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let asked = libc::mincore(addr, len, pages.as_mut_ptr());
        let error = std::io::Error::last_os_error();
        libc::munmap(addr, len);
        if asked != 0 {
            return Err(error);
        }
    }
    Ok(pages.iter().map(|page| page & 1 == 1).collect())
}
