//! The `kmsfs` command. Installed as `mount.kmsfs` (a symlink) it also
//! serves `mount -t kmsfs` and fstab entries.

mod cli;

use std::io::Write;

fn main() {
    let code = cli::run();
    if kmsfs::kms::pkcs11::abandoned_calls() {
        // A PKCS#11 module still inside a call given up on may hold locks
        // its exit handlers wait for: leave without running them.
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        unsafe { libc::_exit(code) };
    }
    std::process::exit(code);
}
