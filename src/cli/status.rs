//! `kmsfs status`: what a volume is, without unlocking anything.

use std::path::Path;

use kmsfs::kms::hex;
use kmsfs::volume::lock::VolumeLock;

use super::{CliError, KeyOptions};

pub fn status(backing: &Path, json: bool, check_key: bool, keys: &KeyOptions) -> Result<(), CliError> {
    let summary = kmsfs::volume::read_info(backing)?;
    let key_state = if check_key {
        Some(super::volumes::provider_for(backing, &summary.volume, keys)?.key_state()?)
    } else {
        None
    };
    let provider = super::volumes::recorded_provider(backing, &summary.volume)?;
    let (row, keys, counts) = (summary.volume, summary.volume_keys, summary.file_keys);
    let daemon = VolumeLock::daemon(backing);
    let files_of = |v: u32| {
        counts
            .iter()
            .find(|(version, _)| *version == v)
            .map(|(_, n)| *n)
            .unwrap_or(0)
    };
    let rotating = keys.iter().any(|k| k.state == "retiring");
    let pending = kmsfs::volume::rescue::waiting(backing);
    if json {
        let versions: Vec<_> = keys
            .iter()
            .map(|k| {
                serde_json::json!({
                    "version": k.version,
                    "state": k.state,
                    "created_at": k.created_at,
                    "files": files_of(k.version),
                })
            })
            .collect();
        let out = serde_json::json!({
            "backing": backing,
            "volume_id": hex(&row.volume_id),
            "format_version": row.format_version,
            "provider": provider.to_string(),
            "master_key_id": provider.key_label(),
            "created_at": row.created_at,
            "volume_keys": versions,
            "file_keys": counts.iter().map(|(_, n)| n).sum::<u64>(),
            "rotation_in_progress": rotating,
            "mounted": daemon.is_some(),
            "daemon_pid": daemon.as_ref().map(|d| d.pid),
            "daemon_provider_calls": daemon.as_ref().map(|d| d.provider_calls),
            "commit_error": daemon.as_ref().and_then(|d| d.commit_error.clone()),
            "pending_keys_file": pending,
            "key_state": key_state,
        });
        println!("{out}");
        return Ok(());
    }
    println!("volume:         {}", hex(&row.volume_id));
    println!("backing:        {}", backing.display());
    println!("format:         {}", row.format_version);
    println!("provider:       {provider}");
    println!("master key:     {}", provider.key_label());
    for k in &keys {
        println!(
            "volume key v{}:  {} ({} files)",
            k.version,
            k.state,
            files_of(k.version)
        );
    }
    println!(
        "rotation:       {}",
        if rotating {
            "in progress (run `kmsfs rotate` to finish it)"
        } else {
            "none in progress"
        }
    );
    match daemon {
        Some(ref d) => println!(
            "mounted:        yes (daemon pid {}, {} key-provider call(s) since mount)",
            d.pid, d.provider_calls
        ),
        None => println!("mounted:        no"),
    }
    if let Some(e) = daemon.as_ref().and_then(|d| d.commit_error.as_ref()) {
        println!("FAILING:        committing file keys: {e} (the daemon keeps retrying; fsync reports EIO meanwhile)");
    }
    if pending {
        println!(
            "pending keys:   {} holds file keys an unmount could not commit; the next mount or fsck stores them",
            kmsfs::volume::rescue::PENDING_FILE
        );
    }
    if let Some(state) = key_state {
        println!("key state:      {state} (as the provider reports it)");
    }
    Ok(())
}
