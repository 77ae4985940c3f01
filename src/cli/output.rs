//! The commands' standard output. Rust ignores SIGPIPE, so `println!` panics
//! when the reader went away (`kmsfs status | head -1`); these print instead
//! and end the program the way a Unix tool ends.

use std::io::Write;

use super::ExitCode;

/// The status a shell reports for a program killed by SIGPIPE.
const BROKEN_PIPE_STATUS: i32 = 128 + libc::SIGPIPE;

/// Writes `args` to standard output. A closed pipe ends the program quietly
/// with 141, as SIGPIPE would; any other failure (a full disk behind a
/// redirect) says so on stderr and exits with the I/O status, so no output is
/// lost silently. Commands that change a volume print once the change is
/// made, so a reader that goes away early loses only output.
pub fn write(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(BROKEN_PIPE_STATUS);
        }
        eprintln!("kmsfs: cannot write the output: {e}");
        std::process::exit(ExitCode::Io as i32);
    }
}

/// `println!` for command output, through [`write`].
macro_rules! outln {
    () => { $crate::cli::output::write(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::cli::output::write(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `print!` for command output, through [`write`].
macro_rules! out {
    ($($arg:tt)*) => { $crate::cli::output::write(format_args!($($arg)*)) };
}
