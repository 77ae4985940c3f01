//! `kmsfs status`: what a volume is, without unlocking anything.

use std::path::Path;

use kmsfs::util::hex;
use kmsfs::volume::lock::VolumeLock;

use super::mounts::{MountEntry, mounts};
use super::{CliError, ExitCode, KeyOptions};

/// Where the volume in `backing` is mounted, as the mount table says: a
/// live mount first (a stale one of a dead daemon may linger beside it).
/// A user's mount counts only if that user owns the backing directory: any
/// user may name a FUSE mount of their own after any directory.
fn mounted_at(backing: &Path) -> Option<MountEntry> {
    let backing = std::fs::canonicalize(backing).ok()?;
    let backing_owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&backing).ok()?);
    let mut ours: Vec<MountEntry> = mounts()
        .ok()?
        .into_iter()
        .filter(|m| m.source == backing && m.is_kmsfs())
        .filter(|m| m.owner.is_none_or(|(uid, _)| uid == 0 || uid == backing_owner))
        .collect();
    ours.sort_by_cached_key(MountEntry::is_stale);
    ours.into_iter().next()
}

/// Where the volume in `backing` is mounted when the mount table's source
/// does not say (`fsname=`, or the directory renamed since), and its
/// daemon: the mount whose owner's daemon of this volume (its record is
/// named by the directory's device and inode, not its path) says it
/// serves there.
fn mounted_by_record(backing: &Path) -> Option<(MountEntry, kmsfs::volume::lock::DaemonInfo)> {
    let mut owners: Vec<u32> = mounts()
        .ok()?
        .into_iter()
        .filter(MountEntry::is_kmsfs)
        .filter_map(|m| m.owner.map(|(uid, _)| uid))
        .collect();
    owners.sort_unstable();
    owners.dedup();
    owners.into_iter().find_map(|owner| {
        let daemon = VolumeLock::daemon(backing, Some(owner))?;
        let at = daemon.mountpoint.clone()?;
        let mount = mounts()
            .ok()?
            .into_iter()
            .find(|m| m.mountpoint == at && m.owner.map(|(uid, _)| uid) == Some(owner))?;
        Some((mount, daemon))
    })
}

pub fn status(path: &Path, json: bool, check_key: bool, keys: &KeyOptions) -> Result<(), CliError> {
    // Used only with --check-key, but a bad one is said at once, not when it is used.
    if let Some(raw) = &keys.kms {
        kmsfs::kms::uri::ProviderUri::parse(raw)?;
    }
    let source = super::volumes::backing_of(path)?;
    // A reverse view's volume lives in PLAIN/.kmsfs-reverse; it is mounted as PLAIN.
    let (backing_dir, reverse) = super::volumes::volume_dir(&source);
    let backing = backing_dir.as_path();
    let summary = kmsfs::volume::read_info(backing)?;
    let key_state = if check_key {
        Some(super::volumes::provider_for(backing, &summary.volume, keys)?.key_state()?)
    } else {
        None
    };
    let provider = super::volumes::recorded_provider(backing, &summary.volume)?;
    // Counting reads every file-key row: damage there (which the schema check
    // before it cannot see) is reported beside the rest, and fails the command.
    let (counts, count_error) = match kmsfs::volume::file_key_counts(backing) {
        Ok(counts) => (Some(counts), None),
        Err(e) => (None, Some(CliError::from(e))),
    };
    let (row, keys) = (summary.volume, summary.volume_keys);
    let mount = mounted_at(&source);
    let daemon = VolumeLock::daemon(backing, mount.as_ref().and_then(|m| m.owner).map(|(uid, _)| uid));
    let (mount, daemon) = match (mount, daemon) {
        (None, daemon) => match mounted_by_record(backing) {
            Some((mount, daemon)) => (Some(mount), Some(daemon)),
            None => (None, daemon),
        },
        found => found,
    };
    // In the mount table, but no daemon holds the volume: it died, and
    // the mount point says so; or it runs but cannot be seen from here.
    let stale = daemon.is_none() && mount.as_ref().is_some_and(MountEntry::is_stale);
    let unseen = daemon.is_none() && mount.is_some() && !stale;
    // Unmounted, committing its last keys, about to exit.
    let finishing = daemon.as_ref().is_some_and(|d| d.finishing);
    // A stopped daemon holds up its mount, or, once that was detached, the
    // volume (its lock, its last keys); one finishing after an unmount has
    // nothing left to hold up.
    let stopped = !finishing && daemon.as_ref().is_some_and(|d| kmsfs::util::process_stopped(d.pid));
    let files_of = |v: u32| {
        counts
            .as_ref()
            .map(|counts| counts.iter().find(|(version, _)| *version == v).map_or(0, |(_, n)| *n))
    };
    let rotating = keys.iter().any(|k| k.state == "retiring");
    // The active volume key's age: how long since the volume was last rotated (or made).
    let days_since_rotation = keys
        .iter()
        .filter(|k| k.state == "active")
        .map(|k| (kmsfs::util::unix_now() as i64).saturating_sub(k.created_at).max(0) / 86_400)
        .next();
    let pending = kmsfs::volume::rescue::waiting(backing, &row.volume_id);
    let set_aside = kmsfs::volume::rescue::set_aside_files(backing, &row.volume_id);
    // Master-key versions wrapping live volume keys that the provider says it no longer decrypts.
    let mut too_old: Vec<u32> = keys
        .iter()
        .filter_map(|k| provider.wrapping_version(k.wrapped.as_ref()?))
        .filter(|v| {
            key_state
                .as_ref()
                .and_then(|k| k.decrypts_from)
                .is_some_and(|from| *v < from)
        })
        .collect();
    too_old.sort_unstable();
    too_old.dedup();
    // Versions wrapping live volume keys that the keystore does not hold.
    let mut unheld: Vec<u32> = match key_state.as_ref().and_then(|k| k.versions_held) {
        Some((oldest, newest)) => keys
            .iter()
            .filter_map(|k| provider.wrapping_version(k.wrapped.as_ref()?))
            .filter(|v| *v < oldest || *v > newest)
            .collect(),
        None => Vec::new(),
    };
    unheld.sort_unstable();
    unheld.dedup();
    if json {
        let verdict = failing(
            count_error.as_ref(),
            daemon.as_ref(),
            stopped,
            gone(stale, unseen, mount.as_ref()),
            &pending,
            &set_aside,
        )
        .and_then(|()| usable(key_state.as_ref(), &too_old, &unheld));
        let versions: Vec<_> = keys
            .iter()
            .map(|k| {
                serde_json::json!({
                    "version": k.version,
                    "state": k.state,
                    "created_at": k.created_at,
                    "files": files_of(k.version),
                    "master_key_version": k.wrapped.as_ref().and_then(|b| provider.wrapping_version(b)),
                })
            })
            .collect();
        let out = serde_json::json!({
            "backing": backing,
            "reverse_view_of": reverse.then_some(&source),
            "volume_id": hex(&row.volume_id),
            "format_version": row.format_version,
            "provider": provider.to_string(),
            "master_key_id": provider.key_label(),
            "created_at": row.created_at,
            "volume_keys": versions,
            "file_keys": counts.as_ref().map(|c| c.iter().map(|(_, n)| n).sum::<u64>()),
            "file_key_error": count_error.as_ref().map(|e| &e.message),
            "rotation_in_progress": rotating,
            "mounted": daemon.is_some() && !finishing || unseen,
            "daemon_finishing": finishing,
            "mountpoint": mount.as_ref().map(|m| &m.mountpoint),
            "stale_mount": stale,
            "daemon_unseen": unseen,
            "daemon_pid": daemon.as_ref().map(|d| d.pid),
            "daemon_stopped": stopped,
            "daemon_provider_calls": daemon.as_ref().map(|d| d.provider_calls),
            "daemon_volume_key_version": daemon.as_ref().map(|d| d.volume_key_version).filter(|v| *v != 0),
            "commit_error": daemon.as_ref().and_then(|d| d.commit_error.clone()),
            "problem": daemon.as_ref().and_then(|d| d.problem.clone()),
            // Why the command exits non-zero, whichever field above says it.
            "failing": verdict.as_ref().err().map(|e| &e.message),
            // A file-by-file copy of the backing directory holds every key
            // only when no daemon writes the DB meanwhile and no key waits
            // outside it.
            "safe_to_copy": daemon.is_none() && mount.is_none() && pending.is_empty() && set_aside.is_empty()
                && count_error.is_none() && !kmsfs::volume::lock::VolumeLock::is_held(backing),
            "pending_keys_file": !pending.is_empty(),
            "pending_keys_files": pending,
            "set_aside_keys_files": set_aside,
            "key_state": key_state.as_ref().map(|k| &k.state),
            "key_deletion_date": key_state.as_ref().and_then(|k| k.deletion_date).map(kmsfs::util::utc_date),
            "key_material_valid_to": key_state.as_ref().and_then(|k| k.material_valid_to).map(kmsfs::util::utc_date),
            "days_since_rotation": days_since_rotation,
        });
        outln!("{out}");
        return verdict;
    }
    outln!("volume:         {}", hex(&row.volume_id));
    outln!("backing:        {}", super::printable(&backing.display().to_string()));
    if reverse {
        outln!(
            "reverse view:   of {} (read-only, derived keys: `kmsfs mount --reverse {} MOUNTPOINT`)",
            super::printable(&source.display().to_string()),
            super::printable(&source.display().to_string())
        );
    }
    outln!("format:         {}", row.format_version);
    outln!("provider:       {}", super::printable(&provider.to_string()));
    outln!("master key:     {}", super::printable(provider.key_label()));
    // Retired versions (and rotations that were undone) on one line: they
    // have no key left, and a volume rotated for years has many.
    let retired: Vec<String> = keys
        .iter()
        .filter(|k| k.state == "retired" && files_of(k.version) == Some(0))
        .map(|k| format!("v{}", k.version))
        .collect();
    if !retired.is_empty() {
        outln!("retired keys:   {} (erased, no files)", retired.join(", "));
    }
    for k in keys
        .iter()
        .filter(|k| !(k.state == "retired" && files_of(k.version) == Some(0)))
    {
        let wrapped_by = k
            .wrapped
            .as_ref()
            .and_then(|b| provider.wrapping_version(b))
            .map(|v| format!(", wrapped by master-key version {v}"))
            .unwrap_or_default();
        let files = files_of(k.version).map_or_else(|| "? files".to_string(), |n| format!("{n} files"));
        outln!("volume key v{}:  {} ({files}{wrapped_by})", k.version, k.state);
    }
    if let Some(days) = days_since_rotation {
        outln!("last rotation:  {days} day(s) ago (`kmsfs rotate` makes a new volume key)");
    }
    if reverse {
        outln!(
            "                a rotation gives every file, name and directory IV of the view new \
             ciphertext: the next backup copies everything; copies made before keep the keys \
             they need in their own kmsfs.db"
        );
    }
    outln!(
        "rotation:       {}",
        if rotating {
            "in progress (run `kmsfs rotate` to finish it)"
        } else {
            "none in progress"
        }
    );
    let at = mount
        .as_ref()
        .map(|m| format!(" at {}", super::printable(&m.mountpoint.display().to_string())))
        .unwrap_or_default();
    match (&daemon, &mount) {
        (Some(d), _) if finishing => outln!(
            "mounted:        no (unmounted; its daemon, pid {}, is committing its last file keys)",
            d.pid
        ),
        (Some(d), Some(_)) if stopped => outln!(
            "mounted:        yes{at}, but {}: requests on the mount wait until then",
            kmsfs::util::stopped_daemon(d.pid)
        ),
        (Some(d), None) if stopped => outln!(
            "mounted:        no (unmounted), but {}: it holds the volume until it has committed its last \
             file keys and exited",
            kmsfs::util::stopped_daemon(d.pid)
        ),
        (Some(d), _) => outln!(
            "mounted:        yes{at} (daemon pid {}, {} key-provider call(s) since mount)",
            d.pid,
            d.provider_calls
        ),
        (None, Some(_)) if unseen => outln!(
            "mounted:        yes{at}, but its daemon cannot be seen from here (no record of it this user \
             can read, and no daemon holds kmsfs.lock: replaced?); run `kmsfs status` as the user who mounted it"
        ),
        (None, Some(m)) => outln!(
            "mounted:        STALE{at}: its daemon is gone; clear it with `kmsfs umount {}`",
            super::printable(&m.mountpoint.display().to_string())
        ),
        (None, None) => outln!("mounted:        no"),
    }
    let active = keys.iter().find(|k| k.state == "active").map(|k| k.version);
    if let (Some(d), Some(active)) = (&daemon, active)
        && d.volume_key_version != 0
        && d.volume_key_version < active
        && !finishing
    {
        outln!(
            "BEHIND:         the daemon has not loaded volume key version {active}, which a rotation made \
             active (its log says why; `kmsfs rotate` waits for it, else undoes the rotation)"
        );
    }
    if let Some(e) = &count_error {
        outln!(
            "FAILING:        counting file keys: {} (`kmsfs fsck` says more)",
            super::printable(&e.message)
        );
    }
    // What a daemon said may come from the lock file, which anyone who can
    // write the backing directory can forge: printed escaped.
    if let Some(e) = daemon.as_ref().and_then(|d| d.problem.as_ref()) {
        outln!("FAILING:        {} (umount will report it)", super::printable(e));
    }
    if let Some(e) = daemon.as_ref().and_then(|d| d.commit_error.as_ref()) {
        outln!(
            "FAILING:        committing file keys: {} (the daemon keeps retrying; fsync reports EIO meanwhile)",
            super::printable(e)
        );
    }
    for file in &pending {
        outln!(
            "pending keys:   {} holds file keys an unmount could not commit; the next mount or fsck stores them",
            super::printable(&file.display().to_string())
        );
    }
    for file in &set_aside {
        outln!(
            "set aside:      {} was set aside unstored (the log says why); look at it, then remove it",
            super::printable(&file.display().to_string())
        );
    }
    if let Some(key) = &key_state {
        outln!("key state:      {} (as the provider reports it)", key.state);
        if let Some(date) = key.deletion_date {
            outln!(
                "WARNING:        the master key is scheduled for deletion on {}: after that this volume \
                 can never be opened again ({} stops it)",
                kmsfs::util::utc_date(date),
                super::printable(&cancel_deletion(&provider))
            );
        }
        match key.material_valid_to {
            Some(date) if date <= kmsfs::util::unix_now() => outln!(
                "WARNING:        the imported key material expired on {}: this volume cannot be opened \
                 until the same material is imported again (`kmsfs key import-params`, `key import`)",
                kmsfs::util::utc_date(date)
            ),
            Some(date) => outln!(
                "key material:   imported; expires {} (then the key is unusable until imported again)",
                kmsfs::util::utc_date(date)
            ),
            None => {}
        }
    }
    failing(
        count_error.as_ref(),
        daemon.as_ref(),
        stopped,
        gone(stale, unseen, mount.as_ref()),
        &pending,
        &set_aside,
    )
    .and_then(|()| usable(key_state.as_ref(), &too_old, &unheld))
}

/// Exit code 5 when the provider says the master key cannot be used now
/// (disabled, pending deletion or import), or no longer decrypts the
/// master-key versions `too_old` (which wrap volume keys): mounting would fail.
fn usable(key_state: Option<&kmsfs::kms::KeyStatus>, too_old: &[u32], unheld: &[u32]) -> Result<(), CliError> {
    match key_state {
        Some(key) if !key.state.starts_with("Enabled") => Err(CliError::new(
            ExitCode::Provider,
            format!(
                "the master key is {}: this volume cannot be mounted until {}",
                super::printable(&key.state),
                match key.deletion_date {
                    Some(_) => "its deletion is cancelled and it is enabled again",
                    None => "it is usable again",
                }
            ),
        )),
        Some(key) if !too_old.is_empty() => Err(CliError::new(
            ExitCode::Provider,
            format!(
                "volume keys are wrapped under master-key version(s) {too_old:?}, which the provider no \
                 longer decrypts (it decrypts from version {}): this volume cannot be mounted; lower the \
                 key's minimum decryption version, mount, and run `kmsfs rewrap`",
                key.decrypts_from.unwrap_or_default()
            ),
        )),
        Some(key) if !unheld.is_empty() => {
            let (oldest, newest) = key.versions_held.unwrap_or_default();
            let why = if unheld.iter().any(|v| *v < oldest) {
                "destroyed by `kmsfs key trim`: a copy of the keystore from before the trim opens it"
            } else {
                "newer than the keystore: it is older than the one that wrapped them (restore its newest backup)"
            };
            Err(CliError::new(
                ExitCode::Provider,
                format!(
                    "volume keys are wrapped under master-key version(s) {unheld:?}, which the keystore does \
                     not hold (versions {oldest} to {newest}): {why}; this volume cannot be mounted with it"
                ),
            ))
        }
        _ => Ok(()),
    }
}

/// A mount whose daemon is gone (stale) or cannot be seen from here.
enum Gone<'a> {
    Stale(&'a Path),
    Unseen(&'a Path),
}

fn gone(stale: bool, unseen: bool, mount: Option<&MountEntry>) -> Option<Gone<'_>> {
    let at = mount?.mountpoint.as_path();
    match (stale, unseen) {
        (true, _) => Some(Gone::Stale(at)),
        (_, true) => Some(Gone::Unseen(at)),
        _ => None,
    }
}

/// The command fails when it reported something failing: a script that
/// checks only the exit status learns of it too.
fn failing(
    count_error: Option<&CliError>,
    daemon: Option<&kmsfs::volume::lock::DaemonInfo>,
    stopped: bool,
    gone: Option<Gone<'_>>,
    pending: &[std::path::PathBuf],
    set_aside: &[std::path::PathBuf],
) -> Result<(), CliError> {
    if let Some(e) = count_error {
        return Err(CliError::new(e.code, e.message.clone()));
    }
    if let Some(d) = daemon.filter(|_| stopped) {
        return Err(CliError::new(
            ExitCode::Mount,
            format!(
                "the volume is held by its daemon, but {}",
                kmsfs::util::stopped_daemon(d.pid)
            ),
        ));
    }
    match gone {
        Some(Gone::Stale(mountpoint)) => {
            return Err(CliError::new(
                ExitCode::Mount,
                format!(
                    "the mount at {} is stale: its daemon is gone (clear it with `kmsfs umount {}`)",
                    mountpoint.display(),
                    mountpoint.display()
                ),
            ));
        }
        Some(Gone::Unseen(mountpoint)) => {
            return Err(CliError::new(
                ExitCode::Io,
                format!(
                    "the daemon of the mount at {} cannot be seen from here: whether it commits its file \
                     keys is unknown",
                    mountpoint.display()
                ),
            ));
        }
        None => {}
    }
    if let Some(e) = daemon.and_then(|d| d.problem.as_ref().or(d.commit_error.as_ref())) {
        return Err(CliError::new(
            ExitCode::Io,
            format!("the mounted volume is failing: {}", super::printable(e)),
        ));
    }
    // Keys only there are missing from any copy of the backing directory
    // made meanwhile (a backup).
    if let Some(first) = pending.first() {
        return Err(CliError::new(
            ExitCode::Io,
            format!(
                "file keys an unmount could not commit are not in the volume's metadata DB yet but in {}: \
                 the next mount stores them, or `kmsfs fsck` while the volume is not mounted; until then a \
                 copy of the backing directory cannot read those files",
                super::printable(&first.display().to_string())
            ),
        ));
    }
    if let Some(first) = set_aside.first() {
        return Err(CliError::new(
            ExitCode::Io,
            format!(
                "{} is a pending-keys file set aside unstored: files whose keys it held read as EIO (`kmsfs \
                 fsck` of the unmounted volume lists them as missing_key); look at it, then remove it",
                super::printable(&first.display().to_string())
            ),
        ));
    }
    Ok(())
}

/// What stops the scheduled deletion of the master key `provider` names.
fn cancel_deletion(provider: &kmsfs::kms::identity::ProviderId) -> String {
    use kmsfs::kms::identity::ProviderId;
    match provider {
        ProviderId::Local { key } => format!("`kmsfs key cancel-deletion {key}`"),
        ProviderId::AwsKms { key } => format!("`aws kms cancel-key-deletion --key-id {key}`"),
        ProviderId::VaultTransit { .. } | ProviderId::Pkcs11 { .. } => "cancelling it in the key provider".into(),
    }
}
