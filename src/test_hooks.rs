//! Crash points the tests use to stop a command at a chosen moment, through
//! `KMSFS_TEST_*` variables. They exist only with the `test-hooks` feature,
//! which the test build turns on (see Cargo.toml): a kmsfs built for use
//! never kills itself, or changes its batch sizes, because of its
//! environment.

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
