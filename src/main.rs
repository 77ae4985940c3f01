//! The `kmsfs` command. Installed as `mount.kmsfs` (a symlink) it also
//! serves `mount -t kmsfs` and fstab entries.

mod cli;

fn main() {
    std::process::exit(cli::run());
}
