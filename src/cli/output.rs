//! The commands' standard output, held until the command's work is done.
//! Rust ignores SIGPIPE, so `println!` panics when the reader went away
//! (`kmsfs status | head -1`), and a write that fails halfway through would
//! stop a command between two steps (a `rekey` of many files, `init` before
//! its audit record). Commands print here instead, and `run` writes it all
//! out once the command has finished and its audit record is written.

use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// The status a shell reports for a program killed by SIGPIPE.
pub const BROKEN_PIPE_STATUS: i32 = 128 + libc::SIGPIPE;

static HELD: Mutex<Vec<u8>> = Mutex::new(Vec::new());
/// A command that writes its own output (a streamed listing) met a closed pipe.
static READER_GONE: AtomicBool = AtomicBool::new(false);

/// Adds `args` to the command's output.
pub fn write(args: std::fmt::Arguments<'_>) {
    let mut held = HELD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    // Writing into a Vec fails only if a Display impl does, which ours do not.
    let _ = held.write_fmt(args);
}

/// Records that the reader of a streamed output went away.
pub fn reader_gone() {
    READER_GONE.store(true, Ordering::Relaxed);
}

/// Writes the held output to standard output. Err(BrokenPipe) also when a
/// streaming command met a closed pipe before.
pub fn flush() -> std::io::Result<()> {
    let held = std::mem::take(&mut *HELD.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
    let mut out = std::io::stdout().lock();
    out.write_all(&held).and_then(|()| out.flush())?;
    if READER_GONE.load(Ordering::Relaxed) {
        return Err(std::io::ErrorKind::BrokenPipe.into());
    }
    Ok(())
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
