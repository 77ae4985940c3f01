//! `-o` mount options, as `kmsfs mount -o`, mount(8) and fstab give them.

use std::path::PathBuf;

use kmsfs::fs::MountOptions;

use super::{CliError, ExitCode, KeyOptions};

/// Takes the reverse-view options out of `-o` options: whether `reverse`
/// is there, the `exclude_from=` files, and the other options.
pub fn take_reverse_options(raw: &[String]) -> Result<(bool, Vec<PathBuf>, Vec<String>), CliError> {
    let (mut reverse, mut files, mut rest) = (false, Vec::new(), Vec::new());
    for opt in raw.iter().flat_map(|o| o.split(',')).filter(|o| !o.is_empty()) {
        match opt {
            "reverse" => reverse = true,
            o if o.starts_with("exclude_from=") => files.push(PathBuf::from(value(o)?)),
            o => rest.push(o.to_string()),
        }
    }
    Ok((reverse, files, rest))
}

/// Parses `-o` options for a volume or, with `view`, a reverse view (their
/// default `attr_timeout` differs). Key options (`keystore=`,
/// `passphrase_file=`, `key_file=`) are accepted too, so that an fstab line
/// can carry them.
pub fn parse(raw: &[String], keys: &mut KeyOptions, view: bool) -> Result<MountOptions, CliError> {
    use fuser::MountOption as K;
    let mut opts = MountOptions {
        threads: 16,
        sync_threads: 4,
        ..MountOptions::default()
    };
    let mut ttl = None;
    let mut force_open_requests = false;
    let mut acl = None;
    let mut nodiratime = false;
    // `sync` and `dirsync` ask for directory changes done when they return.
    let mut synchronous = false;
    for opt in raw.iter().flat_map(|o| o.split(',')).filter(|o| !o.is_empty()) {
        match opt {
            "ro" => opts.read_only = true,
            "rw" => opts.read_only = false,
            "allow_other" => opts.allow_other = true,
            "nonempty" => opts.nonempty = true,
            "default_permissions" => opts.default_permissions = true,
            "noexec" => opts.kernel.push(K::NoExec),
            "exec" => opts.kernel.push(K::Exec),
            "nosuid" => opts.kernel.push(K::NoSuid),
            "suid" => opts.kernel.push(K::Suid),
            "nodev" => opts.kernel.push(K::NoDev),
            "dev" => opts.kernel.push(K::Dev),
            // The backing filesystem's own mount options say how often a
            // read moves an access time (see fs/atime.rs).
            "noatime" => opts.fs.file_atime = false,
            "atime" | "relatime" | "strictatime" => opts.fs.file_atime = true,
            "nodiratime" => nodiratime = true,
            "diratime" => nodiratime = false,
            "acl" => acl = Some(true),
            "noacl" => acl = Some(false),
            "sync" => {
                opts.kernel.push(K::Sync);
                synchronous = true;
            }
            "async" => opts.kernel.push(K::Async),
            "dirsync" => {
                opts.kernel.push(K::DirSync);
                synchronous = true;
            }
            "deferred_unlink" => opts.fs.deferred_removal = true,
            "sync_unlink" => opts.fs.deferred_removal = false,
            o if o.starts_with("keystore=") => keys.keystore = Some(PathBuf::from(value(o)?)),
            o if o.starts_with("passphrase_file=") => keys.passphrase_file = Some(PathBuf::from(value(o)?)),
            o if o.starts_with("key_file=") => keys.key_file = Some(PathBuf::from(value(o)?)),
            o if o.starts_with("audit_log=") => keys.audit_log = Some(PathBuf::from(value(o)?)),
            // Accepted for fstab compatibility; handled by mount(8) or meaningless here.
            "defaults" | "auto" | "noauto" | "user" | "nouser" | "_netdev" | "nofail" => {}
            o if o.starts_with("fsname=") => opts.fsname = Some(value(o)?.to_string()),
            o if o.starts_with("idle=") => opts.idle = Some(duration(o)?).filter(|d| !d.is_zero()),
            o if o.starts_with("lazy_unmount_after=") => opts.lazy_unmount_after = Some(duration(o)?),
            o if o.starts_with("threads=") => opts.threads = number(o, 1, 64)? as usize,
            o if o.starts_with("sync_threads=") => opts.sync_threads = number(o, 1, 64)? as usize,
            "bdi_defaults" => {
                opts.bdi = kmsfs::fs::bdi::BdiTuning {
                    max_ratio: None,
                    strict_limit: None,
                    read_ahead_kb: None,
                }
            }
            o if o.starts_with("bdi_max_ratio=") => opts.bdi.max_ratio = Some(number(o, 1, 100)?),
            o if o.starts_with("bdi_strict_limit=") => opts.bdi.strict_limit = Some(number(o, 0, 1)? == 1),
            o if o.starts_with("read_ahead_kb=") => opts.bdi.read_ahead_kb = Some(number(o, 0, 65536)?),
            "writeback_cache" => opts.fs.writeback = true,
            "no_writeback_cache" => opts.fs.writeback = false,
            "open_requests" => force_open_requests = true,
            "noxattr" => opts.fs.xattrs = false,
            o if o.starts_with("prefetch=") => opts.fs.prefetch_files = number(o, 0, 64)? as usize,
            o if o.starts_with("write_through_below=") => {
                opts.fs.write_through_below = u64::from(number(o, 0, 1 << 20)?) << 20
            }
            "keep_cache" => opts.fs.keep_cache = true,
            "no_keep_cache" => opts.fs.keep_cache = false,
            "cache_dir" => opts.fs.cache_dir = true,
            "no_cache_dir" => opts.fs.cache_dir = false,
            o if o.starts_with("attr_timeout=") => {
                ttl = o["attr_timeout=".len()..]
                    .parse::<f64>()
                    .ok()
                    .filter(|s| (0.0..=86400.0).contains(s))
                    .map(std::time::Duration::from_secs_f64)
                    .map(Some)
                    .ok_or_else(|| {
                        CliError::new(
                            ExitCode::Usage,
                            format!("bad mount option {o}: attr_timeout must be 0 to 86400 seconds"),
                        )
                    })?;
            }
            o if o.starts_with("x-") || o.starts_with("comment=") => {}
            o => {
                return Err(CliError::new(ExitCode::Usage, format!("unknown mount option {o}")));
            }
        }
    }
    opts.fs.ttl = ttl.unwrap_or(if view {
        kmsfs::fs::VIEW_ATTR_TIMEOUT
    } else {
        kmsfs::fs::VOLUME_ATTR_TIMEOUT
    });
    // Without OPEN requests only the kernel checks a file's access mode:
    // see FsOptions::open_requests.
    let kernel_or_root_checks = opts.allow_other || opts.default_permissions || rustix::process::geteuid().is_root();
    opts.fs.open_requests = force_open_requests || !kernel_or_root_checks;
    opts.fs.dir_atime = opts.fs.file_atime && !nodiratime;
    opts.fs.set_id_exec = opts.kernel.contains(&K::Suid) && !opts.kernel.contains(&K::NoSuid);
    if opts.fs.deferred_removal && synchronous {
        log::warn!("deferred_unlink is off on this mount: sync and dirsync ask for every unlink done when it returns");
    }
    opts.fs.deferred_removal &= !synchronous;
    if !opts.fs.file_atime {
        opts.kernel.push(K::NoAtime);
    }
    // ACLs need the kernel's permission checks (FUSE_POSIX_ACL turns them
    // on): on by default where those are on anyway.
    opts.fs.posix_acl = acl.unwrap_or((opts.allow_other || opts.default_permissions) && opts.fs.xattrs);
    if opts.fs.posix_acl && !opts.fs.xattrs {
        return Err(CliError::new(
            ExitCode::Usage,
            "mount options acl and noxattr conflict: ACLs are stored as extended attributes",
        ));
    }
    Ok(opts)
}

/// The text after `name=` in a mount option, which must not be empty.
fn value(option: &str) -> Result<&str, CliError> {
    match option.split_once('=') {
        Some((_, v)) if !v.is_empty() => Ok(v),
        _ => Err(CliError::new(
            ExitCode::Usage,
            format!("bad mount option {option}: it needs a value"),
        )),
    }
}

/// A duration after `name=`: `90`/`90s`, `30m`, `2h`, or a sum such as
/// `1h30m` (as gocryptfs's `-idle` takes them); at most a week.
fn duration(option: &str) -> Result<std::time::Duration, CliError> {
    let text = value(option)?;
    let bad = || {
        CliError::new(
            ExitCode::Usage,
            format!("bad mount option {option}: give a duration such as 90s, 30m, 2h or 1h30m, at most a week (168h)"),
        )
    };
    let mut total = 0u64;
    let mut digits = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => return Err(bad()),
        };
        total += digits
            .parse::<u64>()
            .map_err(|_| bad())?
            .checked_mul(unit)
            .ok_or_else(bad)?;
        digits.clear();
    }
    if !digits.is_empty() {
        total = total
            .checked_add(digits.parse::<u64>().map_err(|_| bad())?)
            .ok_or_else(bad)?;
    }
    if total > 7 * 24 * 3600 {
        return Err(bad());
    }
    Ok(std::time::Duration::from_secs(total))
}

/// The number after `name=` in a mount option, within `min..=max`.
fn number(option: &str, min: u32, max: u32) -> Result<u32, CliError> {
    let (name, value) = option.split_once('=').unwrap_or((option, ""));
    value
        .parse::<u32>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| {
            CliError::new(
                ExitCode::Usage,
                format!("bad mount option {option}: {name} must be a number from {min} to {max}"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fuser::MountOption as K;

    fn keys() -> KeyOptions {
        KeyOptions {
            keystore: None,
            passphrase_file: None,
            key_file: None,
            extpass: None,
            kms: None,
            config: None,
            audit_log: None,
            env_passphrase: None,
        }
    }

    fn parse_one(raw: &str) -> Result<MountOptions, CliError> {
        parse(&[raw.to_string()], &mut keys(), false)
    }

    #[test]
    fn options_set_what_they_name() {
        let mut k = keys();
        let o = parse(
            &[
                "ro,allow_other,noexec,dev,suid,threads=8,prefetch=0".into(),
                "keystore=/k,key_file=/f".into(),
            ],
            &mut k,
            false,
        )
        .unwrap();
        assert!(o.read_only && o.allow_other);
        assert_eq!(o.threads, 8);
        assert_eq!(o.fs.prefetch_files, 0);
        assert!(o.kernel.contains(&K::NoExec) && o.kernel.contains(&K::Dev) && o.kernel.contains(&K::Suid));
        assert_eq!(k.keystore, Some(PathBuf::from("/k")));
        assert_eq!(k.key_file, Some(PathBuf::from("/f")));
        assert!(parse_one("defaults,noauto,x-systemd.automount,nofail").is_ok());
        assert!(parse_one("nonempty").unwrap().nonempty);
        let acl = |raw| parse_one(raw).unwrap().fs.posix_acl;
        assert!(acl("acl") && acl("allow_other") && acl("default_permissions"));
        assert!(!acl("noacl,allow_other") && !acl("allow_other,noxattr"));
        let quiet = parse_one("noatime").unwrap().fs;
        assert!(!quiet.file_atime && !quiet.dir_atime);
        let idle = |raw| parse_one(raw).unwrap().idle;
        assert_eq!(idle("idle=90"), Some(std::time::Duration::from_secs(90)));
        assert_eq!(idle("idle=1h30m"), Some(std::time::Duration::from_secs(5400)));
        assert_eq!(idle("idle=0"), None, "0 turns it off");
        for bad in [
            "idle=",
            "idle=5d",
            "idle=h",
            "idle=9999h",
            "idle=18446744073709551615h1",
        ] {
            assert_eq!(parse_one(bad).err().unwrap().code, ExitCode::Usage, "{bad}");
        }
        let conflict = parse_one("noxattr,acl").err().unwrap();
        assert_eq!(conflict.code, ExitCode::Usage);
        assert!(conflict.message.contains("acl and noxattr"), "{}", conflict.message);
        let nodir = parse_one("nodiratime,relatime").unwrap().fs;
        assert!(nodir.file_atime && !nodir.dir_atime);
        let deferred = |raw| parse_one(raw).unwrap().fs.deferred_removal;
        assert!(!deferred("rw"), "off by default");
        assert!(deferred("deferred_unlink"));
        assert!(!deferred("deferred_unlink,sync_unlink"));
        assert!(
            !deferred("deferred_unlink,dirsync") && !deferred("sync,deferred_unlink"),
            "sync and dirsync win"
        );
        assert_eq!(
            parse_one("attr_timeout=2.5").unwrap().fs.ttl,
            std::time::Duration::from_millis(2500)
        );
        let ttl = |raw: &str, view| parse(&[raw.to_string()], &mut keys(), view).unwrap().fs.ttl;
        assert_eq!(
            ttl("rw", false),
            std::time::Duration::from_secs(30),
            "a volume's default"
        );
        assert_eq!(ttl("rw", true), std::time::Duration::from_secs(1), "a view's default");
        assert_eq!(ttl("attr_timeout=0", true), std::time::Duration::ZERO);
        assert_eq!(ttl("attr_timeout=2", false), std::time::Duration::from_secs(2));
        assert_eq!(
            ttl("suid", false),
            std::time::Duration::from_secs(30),
            "set-ID bits need no short TTL"
        );
    }

    #[test]
    fn bad_options_are_usage_errors_naming_the_option() {
        for bad in [
            "threads=0",
            "threads=65",
            "prefetch=x",
            "attr_timeout=-1",
            "bogus",
            "read_ahead_kb=70000",
            "fsname=",
            "keystore=",
        ] {
            let err = parse_one(bad).err().unwrap_or_else(|| panic!("{bad} accepted"));
            assert_eq!(err.code, ExitCode::Usage, "{bad}");
            assert!(
                err.message.contains(bad.split('=').next().unwrap()),
                "{bad}: {}",
                err.message
            );
        }
    }
}
