//! `kmsfs mount`: the mount daemon's life cycle.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::Args;
use kmsfs::fs::KmsFs;
use kmsfs::volume::Volume;
use kmsfs::volume::lock::{DaemonInfo, VolumeLock};

use super::mount_point::{absolute, check_apart, check_mount_point, mount_error};
use super::umount::{unmount, unmount_now};
use super::{CliError, ExitCode, KeyOptions};

pub(super) const READY: &[u8] = b"ready";
/// How long SIGTERM waits for a busy mount before detaching it.
const DEFAULT_LAZY_UNMOUNT_AFTER: Duration = Duration::from_secs(30);

#[derive(Args)]
pub struct MountArgs {
    /// The backing directory holding the encrypted volume (with --reverse: the plaintext directory)
    backing: PathBuf,
    /// Where the decrypted view appears (an existing directory)
    mountpoint: PathBuf,
    /// Stay in the foreground (logs go to stderr)
    #[arg(short = 'f', long)]
    pub foreground: bool,
    /// Mount options, comma-separated (all are in the README, "Mount options").
    /// Access: ro, allow_other (implies default_permissions), default_permissions (the kernel checks
    /// permissions), acl / noacl (POSIX ACLs), noexec, nosuid / suid, nodev / dev, nonempty,
    /// fsname=NAME. Times and syncing: noatime, nodiratime, relatime, strictatime, sync, dirsync.
    /// Caching: attr_timeout=SECS (default 30, reverse views 1), writeback_cache / no_writeback_cache (default on),
    /// keep_cache / no_keep_cache (default on), cache_dir / no_cache_dir (default off), noxattr, prefetch=N (default 8, 0 off),
    /// open_requests, write_through_below=MIB (default 256, 0 off), deferred_unlink (answer before removing; root only). Threads: threads=N (default 16),
    /// sync_threads=N (default 4). Kernel limits (root only): bdi_max_ratio=PCT,
    /// bdi_strict_limit=0|1, read_ahead_kb=KB (default 1024), bdi_defaults. Life: idle=DURATION
    /// (unmount when unused, e.g. 30m), lazy_unmount_after=DURATION (after SIGTERM, default 30s).
    /// For fstab: keystore=PATH, passphrase_file=PATH, key_file=PATH, audit_log=PATH
    #[arg(short = 'o', value_name = "OPTIONS", action = clap::ArgAction::Append)]
    pub options: Vec<String>,
    /// Append the daemon's log to this file (level from RUST_LOG, default warn)
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// Mount the encrypted, read-only view of the plaintext directory BACKING (made with
    /// `kmsfs init --reverse`), for backup tools to copy; the copy mounts without --reverse
    #[arg(long)]
    pub reverse: bool,
    /// With --reverse: leave out what matches PATTERN (.gitignore rules without `!`: `*.tmp`,
    /// `/cache`, `build/`, `**/node_modules`); repeatable
    #[arg(long, value_name = "PATTERN", requires = "reverse")]
    pub exclude: Vec<String>,
    /// With --reverse: patterns from FILE, one per line (`#` comments); repeatable
    #[arg(long, value_name = "FILE", requires = "reverse")]
    pub exclude_from: Vec<PathBuf>,
}

/// Detaches from the terminal. Returns in the child with the write end of
/// a pipe on which it reports readiness; the parent waits and exits.
pub(super) fn daemonize() -> Result<File, CliError> {
    let (read_end, write_end) =
        rustix::pipe::pipe().map_err(|e| CliError::new(ExitCode::Internal, format!("pipe: {e}")))?;
    // SAFETY: no other thread exists yet (the key flusher, rayon and FUSE
    // threads all start after this point), so the child is in a sound state.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(CliError::new(
            ExitCode::Internal,
            format!("fork: {}", std::io::Error::last_os_error()),
        ));
    }
    if pid > 0 {
        drop(write_end);
        let mut report = Vec::new();
        let _ = File::from(read_end).read_to_end(&mut report);
        if report == READY {
            std::process::exit(0);
        }
        let message = String::from_utf8_lossy(&report).into_owned();
        let message = if message.is_empty() {
            "the mount daemon exited before the mount was ready".into()
        } else {
            message
        };
        // The daemon exits once it has reported (recording the failed mount
        // first): waited for, so that a failed `mount` leaves nothing holding
        // the volume, its lock or a record of it.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut status = 0;
        // SAFETY: waits for this process's own child; `status` outlives the call.
        while unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("kmsfs: {message}");
        std::process::exit(ExitCode::Mount as i32);
    }
    drop(read_end);
    let _ = rustix::process::setsid();
    if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
        let _ = rustix::stdio::dup2_stdin(&null);
        let _ = rustix::stdio::dup2_stdout(&null);
        let _ = rustix::stdio::dup2_stderr(&null);
    }
    Ok(File::from(write_end))
}

/// A failure of the daemon after it detached, told to the parent waiting
/// on the readiness pipe (which prints it and exits non-zero) too.
pub(super) fn report_to_parent(pipe: &mut Option<File>, e: CliError) -> CliError {
    if let Some(p) = pipe.as_mut() {
        let _ = p.write_all(e.message.as_bytes());
    }
    e
}

/// Why a normal user's mount was refused, when it is the FUSE device:
/// kmsfs opens it itself before it would ask the setuid `fusermount3`.
fn fuse_device_hint(e: &std::io::Error) -> &'static str {
    let device_closed =
        rustix::fs::access("/dev/fuse", rustix::fs::Access::READ_OK | rustix::fs::Access::WRITE_OK).is_err();
    if e.kind() == std::io::ErrorKind::PermissionDenied && device_closed {
        " (/dev/fuse is not open to this user: it should be mode 0666, as the fuse3 package's udev rule makes it)"
    } else {
        ""
    }
}

/// The daemon holds one descriptor per inode the kernel remembers: raise
/// the limit as far as allowed (root may go up to fs.nr_open).
fn raise_fd_limit() {
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let hard = getrlimit(Resource::Nofile).maximum;
    let wanted = Rlimit {
        current: Some(ceiling),
        maximum: Some(hard.map_or(ceiling, |h| h.max(ceiling))),
    };
    if setrlimit(Resource::Nofile, wanted).is_err() {
        // Not allowed past the hard limit (no CAP_SYS_RESOURCE): up to it.
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: hard,
                maximum: hard,
            },
        );
    }
}

/// Set once the mount is up: from then on the daemon records the Mount and
/// its Unmount itself; a failure before it is a failed Mount.
pub(super) static SERVING: AtomicBool = AtomicBool::new(false);
/// The volume being mounted, once its DB was read.
pub(super) static MOUNTING: std::sync::OnceLock<[u8; 16]> = std::sync::OnceLock::new();

pub fn mount(args: MountArgs, keys: &KeyOptions) -> Result<(), CliError> {
    let backing = args.backing.clone();
    let result = serve(args, keys);
    if result.is_err() && !SERVING.load(std::sync::atomic::Ordering::Relaxed) {
        let event = super::volumes::event_for("Mount", &backing, MOUNTING.get());
        kmsfs::audit::record(event.outcome(&result.as_ref().map_err(|e| &e.message)));
    }
    result
}

fn serve(mut args: MountArgs, keys: &KeyOptions) -> Result<(), CliError> {
    let mut keys = keys.clone();
    // fstab and mount(8) give everything as -o: `reverse`, `exclude_from=`.
    let (reverse, exclude_from, rest) = super::mount_options::take_reverse_options(&args.options)?;
    args.reverse |= reverse;
    args.exclude_from.extend(exclude_from);
    if !args.reverse && !args.exclude_from.is_empty() {
        return Err(CliError::new(
            ExitCode::Usage,
            "exclude_from= is for reverse views only (with `reverse`)",
        ));
    }
    args.options = rest;
    let options = super::mount_options::parse(&args.options, &mut keys, args.reverse)?;
    let keys = &keys;
    super::audit::install(keys, "mount")?;
    // A backing directory that is not there is no volume (exit 4, as for status and fsck).
    if std::fs::metadata(&args.backing).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
        return Err(CliError::new(
            ExitCode::Volume,
            format!("backing directory {} does not exist", args.backing.display()),
        ));
    }
    let backing = absolute(&args.backing, "backing directory")?;
    let mountpoint = absolute(&args.mountpoint, "mount point")?;
    check_mount_point(&mountpoint, options.nonempty)?;
    if args.reverse {
        check_apart(&backing, &mountpoint)?;
        return super::reverse::serve(&args, keys, &options, &backing, &mountpoint);
    }
    if rustix::fs::statvfs(&backing).is_ok_and(|s| s.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY)) {
        return Err(mount_error(format!(
            "backing directory {} is on a read-only filesystem: kmsfs writes its metadata DB and lock there \
             (even for a read-only mount); remount it read-write",
            backing.display()
        )));
    }
    let row = kmsfs::volume::read_info(&backing)?.volume;
    // After: a directory that is no volume is named as such first.
    check_apart(&backing, &mountpoint)?;
    let _ = MOUNTING.set(row.volume_id);
    let provider = super::volumes::provider_for(&backing, &row, keys)?;
    let lock = VolumeLock::acquire(&backing)?;
    lock.serving(&mountpoint);
    let volume = Arc::new(Volume::open_to_serve(&backing, provider)?);
    log::info!(
        "volume {} opened with {} provider call(s)",
        kmsfs::util::hex(&row.volume_id),
        volume.provider_calls()
    );
    // After an automatic rotation of its master key, the volume key moves
    // to the newest version (as `kmsfs rewrap` would); the old one still
    // opens it if this fails.
    match kmsfs::volume::rotate::rewrap_if_behind(&volume) {
        Ok(moved) if !moved.is_empty() => {
            log::info!("volume key version(s) {moved:?} re-wrapped under the master key's newest version")
        }
        Ok(_) => {}
        Err(e) => log::warn!("re-wrapping the volume key under the master key's newest version failed: {e}"),
    }
    super::volumes::note_use(&**volume.keys().provider(), &backing);

    // No SQLite connection may cross the fork: its POSIX locks would not.
    // Nor a PKCS#11 session: the library's state is not the child's.
    volume.db().disconnect();
    volume.keys().provider().before_fork();
    let sink = if args.foreground || args.log_file.is_some() {
        None
    } else {
        super::logging::daemon_sink(&row.volume_id)
    };
    let mut ready_pipe = if args.foreground { None } else { Some(daemonize()?) };
    if let Some(sink) = sink {
        super::logging::to(sink);
    }
    // From here on this process is the daemon: report failures through the pipe too.
    let report = report_to_parent;
    rustix::process::umask(rustix::fs::Mode::empty());
    let lock = Arc::new(lock);
    let (stop_publishing, publisher) = publish_status(&lock, &volume).map_err(|e| report(&mut ready_pipe, e))?;
    raise_fd_limit();
    // Block crypto runs on rayon's pool. Named, its threads are told apart
    // from the request threads in `ps -L`, `top -H` and profiles (unnamed,
    // they would inherit the name of the request thread that first used it).
    if let Err(e) = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("kmsfs-crypto-{i}"))
        .build_global()
    {
        log::debug!("block crypto pool already set up: {e}");
    }
    volume
        .db()
        .reconnect()
        .map_err(|e| report(&mut ready_pipe, kmsfs::volume::VolumeError::from(e).into()))?;
    volume.start_background_flush();
    let fs = KmsFs::new(Arc::clone(&volume), options.fs).map_err(|e| report(&mut ready_pipe, CliError::from(e)))?;
    let activity = fs.activity();
    let session = kmsfs::fs::mount(fs, &mountpoint, &options).map_err(|e| {
        report(
            &mut ready_pipe,
            mount_error(format!(
                "cannot mount on {}: {e}{}",
                mountpoint.display(),
                fuse_device_hint(&e)
            )),
        )
    })?;
    kmsfs::fs::bdi::tune(&mountpoint, &options.bdi);
    let signals = stop_signals().map_err(|e| report(&mut ready_pipe, e))?;
    let detached = unmount_on_signal(signals, &mountpoint, lazy_after(&options)).map_err(|e| {
        report(
            &mut ready_pipe,
            CliError::new(ExitCode::Internal, format!("signal thread: {e}")),
        )
    })?;
    log::info!("mounted {} on {}", backing.display(), mountpoint.display());
    SERVING.store(true, std::sync::atomic::Ordering::Relaxed);
    // Recorded beside serving, not before it: the kernel already sends
    // requests, and the record's fsyncs would hold them up.
    let mount_event = super::volumes::event_for("Mount", &backing, Some(&row.volume_id))
        .details(serde_json::json!({ "mountpoint": mountpoint, "provider_calls": volume.provider_calls() }));
    let mount_recorded = std::thread::Builder::new()
        .name("kmsfs-audit".into())
        .spawn(move || kmsfs::audit::record(mount_event));
    if let Some(mut pipe) = ready_pipe.take() {
        let _ = pipe.write_all(READY);
    }
    super::systemd::ready(&format!("serving {} on {}", backing.display(), mountpoint.display()));
    volume.check_db_in_background();
    if let Some(idle) = options.idle {
        watch_idle(activity, idle, mountpoint.clone(), Arc::clone(&volume));
    }
    let served = session.run();
    super::systemd::stopping(&format!("unmounted {}; committing file keys", mountpoint.display()));
    stop_publishing.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = publisher.join();
    lock.publish(&DaemonInfo {
        pid: std::process::id(),
        provider_calls: volume.total_provider_calls(),
        commit_error: volume.commit_error(),
        problem: volume.problems(),
        finishing: true,
        ..DaemonInfo::default()
    });
    // The daemon's last word, which `kmsfs umount` reads once the lock is free.
    let committed = commit_at_exit(&volume);
    lock.publish(&DaemonInfo {
        pid: std::process::id(),
        provider_calls: volume.total_provider_calls(),
        commit_error: committed.as_ref().err().cloned(),
        problem: volume.problems(),
        finishing: true,
        ..DaemonInfo::default()
    });
    let outcome = match committed {
        Ok(()) if volume.problems().is_some() => {
            Err(CliError::new(ExitCode::Io, volume.problems().unwrap_or_default()))
        }
        Err(e) => {
            log::error!("{e}");
            super::systemd::status(&format!("file keys not committed: {e}"));
            Err(CliError::new(ExitCode::Io, e))
        }
        Ok(()) => match served {
            // How the kernel ends the connection of a mount this daemon detached
            // once its last open file closes: the end of serving, like ENODEV.
            // (Anything else that aborts the connection is reported.)
            Err(e)
                if e.raw_os_error() == Some(libc::ECONNABORTED)
                    && detached.load(std::sync::atomic::Ordering::Relaxed) =>
            {
                log::info!("{}: the kernel closed the connection", mountpoint.display());
                Ok(())
            }
            other => other.map_err(|e| mount_error(format!("serving {}: {e}", mountpoint.display()))),
        },
    };
    match mount_recorded {
        Ok(thread) => {
            let _ = thread.join();
        }
        Err(e) => log::error!("could not start the thread recording the mount in the audit log: {e}"),
    }
    kmsfs::audit::record(
        super::volumes::event_for("Unmount", &backing, Some(&row.volume_id))
            .outcome(&outcome.as_ref().map_err(|e| &e.message)),
    );
    // Close the DB (SQLite checkpoints the WAL on close) before releasing the
    // lock: `kmsfs umount` returns when the lock is free, and the backing
    // directory must not change after that.
    volume.db().disconnect();
    drop(lock);
    outcome
}

pub(super) fn stop_signals() -> Result<signal_hook::iterator::Signals, CliError> {
    signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM, libc::SIGHUP])
        .map_err(|e| CliError::new(ExitCode::Internal, format!("signal handler: {e}")))
}

pub(super) fn lazy_after(options: &kmsfs::fs::MountOptions) -> Duration {
    options.lazy_unmount_after.unwrap_or(DEFAULT_LAZY_UNMOUNT_AFTER)
}

/// Unmounts `mountpoint` at the first of `signals`, retrying while it is
/// busy and detaching it after `lazy_after`. Returns the flag set when it
/// was detached.
pub(super) fn unmount_on_signal(
    mut signals: signal_hook::iterator::Signals,
    mountpoint: &Path,
    lazy_after: Duration,
) -> std::io::Result<Arc<AtomicBool>> {
    let mount_display = mountpoint.display().to_string();
    let unmount_path = mountpoint.to_path_buf();
    let detached = Arc::new(AtomicBool::new(false));
    let detached_by_us = Arc::clone(&detached);
    std::thread::Builder::new()
        .name("kmsfs-signals".into())
        .spawn(move || {
            // A busy mount point cannot be unmounted yet: keep trying, once a
            // second, and at once on every further signal.
            let Some(sig) = signals.forever().next() else { return };
            log::info!("signal {sig}: unmounting {mount_display}");
            super::systemd::stopping(&format!("unmounting {mount_display}"));
            let asked = std::time::Instant::now();
            for attempt in 0u64.. {
                // Busy for too long: detached, so that a stop always ends
                // (the daemon exits once the last open file closes).
                let lazy = asked.elapsed() >= lazy_after;
                match unmount(&unmount_path, lazy) {
                    Ok(()) if lazy => {
                        detached_by_us.store(true, std::sync::atomic::Ordering::Relaxed);
                        log::warn!(
                            "{mount_display} was still busy after {lazy_after:?}: detached; \
                             the daemon exits once its last open file is closed"
                        );
                        super::systemd::status(&format!("detached {mount_display}; waiting for open files to close"));
                        return;
                    }
                    Ok(()) => return,
                    Err(e) if attempt % 60 == 0 => {
                        log::warn!("unmounting {mount_display} failed ({e}); retrying every second")
                    }
                    Err(_) => {}
                }
                let deadline = std::time::Instant::now() + Duration::from_secs(1);
                while std::time::Instant::now() < deadline && signals.pending().next().is_none() {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        })
        .map(|_| detached)
}

/// Unmounts once no request has named a file for `idle` (as gocryptfs's
/// `-idle`). The unmount is never lazy: while a file is open (or a process
/// has its working directory inside) the kernel refuses it, and the mount
/// stays until it is idle and free. Nor while file keys cannot be
/// committed: the daemon keeps them until it can (as `kmsfs umount` waits).
fn watch_idle(activity: Arc<kmsfs::fs::Activity>, idle: Duration, mountpoint: PathBuf, volume: Arc<Volume>) {
    let check_every = (idle / 4).clamp(Duration::from_millis(250), Duration::from_secs(10));
    let spawned = std::thread::Builder::new().name("kmsfs-idle".into()).spawn(move || {
        let mut said_busy = false;
        loop {
            std::thread::sleep(check_every);
            if activity.idle_for() < idle || volume.commit_error().is_some() {
                said_busy = false;
                continue;
            }
            match unmount_now(&mountpoint) {
                Ok(()) => {
                    log::info!("unmounted {} after {idle:?} without use", mountpoint.display());
                    return;
                }
                Err(e) if !said_busy => {
                    log::info!(
                        "idle, but {} is in use ({e}); unmounting once it is free",
                        mountpoint.display()
                    );
                    said_busy = true;
                }
                Err(_) => {}
            }
        }
    });
    if let Err(e) = spawned {
        log::error!("idle unmounting is off: cannot start its thread: {e}");
    }
}

/// Publishes the daemon's pid, provider-call count and commit failures in
/// the lock file, now and whenever they change; `status` and `umount` read
/// them. Returns the flag that stops the publishing thread, and the thread.
fn publish_status(
    lock: &Arc<VolumeLock>,
    volume: &Arc<Volume>,
) -> Result<(Arc<AtomicBool>, std::thread::JoinHandle<()>), CliError> {
    let current = {
        let volume = Arc::clone(volume);
        move || DaemonInfo {
            pid: std::process::id(),
            provider_calls: volume.total_provider_calls(),
            commit_error: volume.commit_error(),
            problem: volume.problems(),
            finishing: false,
            volume_key_version: volume.keys().active_version(),
            volume_key_error: volume.behind(),
            ..DaemonInfo::default()
        }
    };
    let mut published = current();
    lock.publish(&published);
    let stop = Arc::new(AtomicBool::new(false));
    let (lock, stopped) = (Arc::clone(lock), Arc::clone(&stop));
    std::thread::Builder::new()
        .name("kmsfs-status".into())
        .spawn(move || {
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(250));
                let now = current();
                if now != published {
                    lock.publish(&now);
                    if now.commit_error != published.commit_error {
                        super::systemd::status(&match &now.commit_error {
                            Some(e) => format!("file keys not committed, retrying: {e}"),
                            None => "serving; file keys committed again".to_string(),
                        });
                    }
                    published = now;
                }
            }
        })
        .map(|thread| (stop, thread))
        .map_err(|e| CliError::new(ExitCode::Internal, format!("status thread: {e}")))
}

/// The last commit of file keys, retried for a while (a provider or a disk
/// may come back); if it still fails, the keys are saved beside the DB for
/// the next open rather than lost.
fn commit_at_exit(volume: &Volume) -> Result<(), String> {
    let mut last = String::new();
    for attempt in 0..COMMIT_ATTEMPTS_AT_EXIT {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(500 << attempt.min(3)));
        }
        match volume.sync_keys() {
            Ok(()) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    let volume_name = volume.backing().display();
    match volume.save_pending_keys() {
        Ok((rows, saved_to)) => Err(format!(
            "committing file keys of volume {volume_name} failed at unmount ({last}); {rows} key change(s) \
             were saved to {} and are stored at the next mount or fsck: fix the cause, then run `kmsfs fsck {volume_name}`",
            saved_to.display()
        )),
        Err(e) => Err(format!(
            "committing file keys of volume {volume_name} failed at unmount ({last}), and saving them failed too \
             ({e}): files written since the last commit read as EIO; run `kmsfs fsck {volume_name}`"
        )),
    }
}

const COMMIT_ATTEMPTS_AT_EXIT: u32 = 5;
