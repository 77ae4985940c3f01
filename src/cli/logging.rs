//! Logging: `RUST_LOG` filters, env_logger formats. A mount daemon in the
//! background has no terminal: unless `--log-file` names a file, it logs to
//! syslog (`/dev/log`, which journald serves too), or, on a host without
//! one, to a file of its own (`daemon_log_file`), so that tamper and EIO
//! reports are never dropped.

use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use super::{CliError, ExitCode};

/// Where syslog listens, unless KMSFS_LOG_SOCKET names another socket.
const SYSLOG_SOCKET: &str = "/dev/log";

struct Logger {
    inner: env_logger::Logger,
    /// Set once the daemon is in the background without a log file.
    sink: Mutex<Option<Sink>>,
    /// KMSFS_DEBUG_FUSE_REQUESTS=1: fuser's per-request lines (with plaintext
    /// names) are let through, for counting requests on a test mount.
    fuse_requests: bool,
}

static LOGGER: OnceLock<&'static Logger> = OnceLock::new();

/// fuser unmounts once serving ends, which it does when the kernel ends the
/// connection: after `umount` or `kmsfs umount`, the mount is already gone
/// and its unmount fails with EINVAL ("not a mount point"): a warning at
/// every unmount that would say nothing. Any other failure still shows, and
/// serving that ends any other way is reported by the daemon itself (an
/// error and a non-zero exit).
fn is_unmount_of_a_mount_gone(record: &log::Record) -> bool {
    record.target() == "fuser::session" && record.level() == log::Level::Warn && {
        let message = record.args().to_string();
        message.starts_with("Failed to umount filesystem")
            && message.contains(&std::io::Error::from_raw_os_error(libc::EINVAL).to_string())
    }
}

/// Other crates' trace lines are never written: the HTTP client's dump the
/// bytes of each request and answer, provider tokens, SigV4 signatures and
/// unwrapped volume keys included (at debug it redacts them).
fn secret_bearing(metadata: &log::Metadata) -> bool {
    let target = metadata.target();
    let ours = target == "kmsfs" || target.starts_with("kmsfs::");
    metadata.level() == log::Level::Trace && !ours
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        // fuser logs every request, plaintext names included, at debug
        // level: whatever RUST_LOG says, nothing below info from it is
        // written (unless KMSFS_DEBUG_FUSE_REQUESTS=1 asks for them).
        let fuser = metadata.target() == "fuser" || metadata.target().starts_with("fuser::");
        let hidden = (fuser && metadata.level() > log::Level::Info && !self.fuse_requests) || secret_bearing(metadata);
        !hidden && self.inner.enabled(metadata)
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) || is_unmount_of_a_mount_gone(record) {
            return;
        }
        let mut sink = kmsfs::util::lock(&self.sink);
        match sink.as_mut() {
            Some(Sink::File(file)) => {
                use std::io::Write;
                // One write per line: two daemons of one volume share the file.
                let line = format!(
                    "{} {} {}: {}\n",
                    kmsfs::util::utc_date(kmsfs::util::unix_now()),
                    record.level(),
                    record.target(),
                    record.args()
                );
                let _ = file.write_all(line.as_bytes());
            }
            Some(Sink::Syslog(socket)) => {
                // RFC 3164: <facility daemon (3) * 8 + severity>tag[pid]: message
                let severity = match record.level() {
                    log::Level::Error => 3,
                    log::Level::Warn => 4,
                    log::Level::Info => 6,
                    log::Level::Debug | log::Level::Trace => 7,
                };
                let line = format!(
                    "<{}>kmsfs[{}]: {} {}: {}",
                    3 * 8 + severity,
                    std::process::id(),
                    record.level(),
                    record.target(),
                    record.args()
                );
                let _ = socket.send(line.as_bytes());
            }
            None => self.inner.log(record),
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// Sets up logging to stderr, or to `log_file`. With `json`, a line on
/// stderr is a JSON object (`{"log": {"level", "target", "message"}}`), as
/// a failure is: a script reads stderr as JSON lines.
pub fn init(log_file: Option<&Path>, json: bool) -> Result<(), CliError> {
    let mut builder = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn,fuser=error"));
    if json && log_file.is_none() {
        builder.format(|buf, record| {
            use std::io::Write;
            let line = serde_json::json!({"log": {
                "level": record.level().as_str(),
                "target": record.target(),
                "message": record.args().to_string(),
            }});
            writeln!(buf, "{line}")
        });
    }
    if let Some(path) = log_file {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| CliError::new(ExitCode::Io, format!("cannot open log file {}: {e}", path.display())))?;
        builder.target(env_logger::Target::Pipe(Box::new(file)));
    }
    let inner = builder.build();
    let max = inner.filter();
    let logger: &'static Logger = Box::leak(Box::new(Logger {
        inner,
        sink: Mutex::new(None),
        fuse_requests: std::env::var_os("KMSFS_DEBUG_FUSE_REQUESTS").is_some_and(|v| v == "1"),
    }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(max);
        let _ = LOGGER.set(logger);
    }
    Ok(())
}

/// Where a daemon in the background logs.
pub enum Sink {
    Syslog(UnixDatagram),
    File(std::fs::File),
}

/// Where the daemon of volume `volume_id` will log once it has detached
/// (`to`): syslog, or, when the host has none, a file of its own, said
/// now, while the terminal is still there.
pub fn daemon_sink(volume_id: &[u8; 16]) -> Option<Sink> {
    let path = std::env::var_os("KMSFS_LOG_SOCKET").unwrap_or_else(|| SYSLOG_SOCKET.into());
    let unavailable = match UnixDatagram::unbound().and_then(|s| s.connect(&path).map(|()| s)) {
        Ok(socket) => return Some(Sink::Syslog(socket)),
        Err(e) => e,
    };
    let Some(file) = daemon_log_file(volume_id) else {
        log::warn!(
            "no syslog at {} ({unavailable}) and no directory for a log file: the daemon's log is lost; use \
             --log-file",
            Path::new(&path).display()
        );
        return None;
    };
    match open_own_log(&file) {
        Ok(opened) => {
            log::warn!(
                "no syslog at {} ({unavailable}): the daemon logs to {}",
                Path::new(&path).display(),
                file.display()
            );
            Some(Sink::File(opened))
        }
        Err(e) => {
            log::warn!(
                "no syslog at {} ({unavailable}), and {} cannot be opened ({e}): the daemon's log is lost; use \
                 --log-file",
                Path::new(&path).display(),
                file.display()
            );
            None
        }
    }
}

/// Opens (or creates) `file` for appending, only in a directory of this
/// user's alone (`util::private_dir`), never through a symlink, and only a
/// regular file with one name: a root daemon must not append to a file
/// someone else chose.
fn open_own_log(file: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::MetadataExt;
    kmsfs::util::private_dir(file.parent().unwrap_or(Path::new("/")))?;
    let opened = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(file)?;
    let meta = opened.metadata()?;
    if !meta.is_file() || meta.nlink() != 1 {
        return Err(std::io::Error::other("not a regular file with one name"));
    }
    Ok(opened)
}

/// The log file of a daemon on a host without syslog:
/// `/var/log/kmsfs/VOLUME-ID.log` for root, else under `$XDG_STATE_HOME`
/// (default `~/.local/state`) `/kmsfs/log/`.
fn daemon_log_file(volume_id: &[u8; 16]) -> Option<std::path::PathBuf> {
    let dir = if rustix::process::geteuid().is_root() {
        std::path::PathBuf::from("/var/log/kmsfs")
    } else {
        kmsfs::util::state_dir()?.join("kmsfs/log")
    };
    Some(dir.join(format!("{}.log", kmsfs::util::hex(volume_id))))
}

/// From now on log to `sink` (the daemon has detached from the terminal).
pub fn to(sink: Sink) {
    if let Some(logger) = LOGGER.get() {
        *kmsfs::util::lock(&logger.sink) = Some(sink);
    }
}
