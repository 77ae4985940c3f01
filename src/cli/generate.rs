//! Shell completions and man pages, generated from the clap definitions so
//! that they never drift from `--help`.

use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

use super::{Cli, CliError, ExitCode};

/// Prints the completion script for `shell` to stdout.
pub fn completions(shell: Shell) -> Result<(), CliError> {
    let mut command = Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "kmsfs", &mut script);
    out!("{}", String::from_utf8_lossy(&script));
    Ok(())
}

/// Writes `kmsfs.1` and one page per subcommand (`kmsfs-mount.1`, …) into `dir`.
pub fn man_pages(dir: &Path) -> Result<(), CliError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::new(ExitCode::Io, format!("creating {}: {e}", dir.display())))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .map_err(|e| CliError::new(ExitCode::Io, format!("writing man pages into {}: {e}", dir.display())))
}
