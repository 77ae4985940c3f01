use super::verify::verify;
use super::*;

fn log_with(records: usize) -> (tempfile::TempDir, AuditLog) {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(&dir.path().join("audit.jsonl"), "test").unwrap();
    for i in 0..records {
        log.append(
            Event::new("Decrypt")
                .provider("local", "mk-1")
                .key_version(Some(1))
                .details(serde_json::json!({ "n": i })),
        )
        .unwrap();
    }
    (dir, log)
}

fn lines(log: &AuditLog) -> Vec<String> {
    std::fs::read_to_string(log.path())
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn rewrite(log: &AuditLog, lines: &[String]) {
    std::fs::write(log.path(), lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

fn problems(log: &AuditLog) -> Vec<(usize, String)> {
    verify(log.path())
        .unwrap()
        .problems
        .into_iter()
        .map(|p| (p.line, p.what))
        .collect()
}

#[test]
fn an_untouched_log_verifies_and_reads_back() {
    let (_dir, log) = log_with(5);
    let v = verify(log.path()).unwrap();
    assert!(v.intact(), "{:?}", v.problems);
    assert_eq!((v.valid_records, v.anchored_records), (5, 5));
    let records = verify::read(log.path()).unwrap();
    assert_eq!(records.len(), 5);
    assert_eq!(records[2].record.seq, 3);
    assert_eq!(records[2].record.action, "Decrypt");
    assert_eq!(records[2].record.command, "test");
    assert_eq!(records[2].record.result, "ok");
    assert_eq!(records[2].record.prev, split_line(&lines(&log)[1]).unwrap().1);
}

#[test]
fn each_kind_of_tampering_is_found_where_it_is() {
    let (_dir, log) = log_with(5);
    let original = lines(&log);

    let mut edited = original.clone();
    edited[2] = edited[2].replace("\"Decrypt\"", "\"Encrypt\"");
    rewrite(&log, &edited);
    assert_eq!(problems(&log)[0].0, 3, "edited");
    assert!(problems(&log)[0].1.contains("MAC mismatch"));

    let mut removed = original.clone();
    removed.remove(1);
    rewrite(&log, &removed);
    let found = problems(&log);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].0, 2, "removed");
    assert!(found[0].1.contains("record 2 was"), "{found:?}");

    let mut reordered = original.clone();
    reordered.swap(1, 2);
    rewrite(&log, &reordered);
    let found = problems(&log);
    assert!(
        found.iter().any(|(line, what)| *line == 2 && what.contains("removed")),
        "{found:?}"
    );
    assert!(
        found
            .iter()
            .any(|(line, what)| *line == 3 && what.contains("reordered")),
        "{found:?}"
    );

    let mut inserted = original.clone();
    inserted.insert(3, original[0].clone());
    rewrite(&log, &inserted);
    let found = problems(&log);
    assert_eq!(found[0].0, 4, "inserted copy: {found:?}");

    let mut forged = original.clone();
    forged.insert(2, original[1].replace("\"seq\":2", "\"seq\":3"));
    rewrite(&log, &forged);
    assert_eq!(problems(&log)[0].0, 3, "inserted forgery");

    rewrite(&log, &original[..4]);
    let found = problems(&log);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].0, 0, "truncated");
    assert!(found[0].1.contains("ends at record 4 but 5 were written"), "{found:?}");

    let mut crlf = original.clone();
    crlf[1].push('\r');
    rewrite(&log, &crlf);
    assert_eq!(problems(&log)[0].0, 2, "a carriage return is a change");

    rewrite(&log, &original);
    assert!(problems(&log).is_empty());
}

#[test]
fn an_edited_record_is_reported_once() {
    let (_dir, log) = log_with(4);
    let mut edited = lines(&log);
    edited[1] = edited[1].replace("\"ok\"", "\"error\"");
    rewrite(&log, &edited);
    let found = problems(&log);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].0, 2);
}

#[test]
fn the_log_is_never_written_through_a_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let precious = dir.path().join("precious");
    std::fs::write(&precious, "keep").unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&path, "test").unwrap();
    log.append(Event::new("Mount")).unwrap();
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(&precious, &path).unwrap();
    assert!(log.append(Event::new("Unmount")).is_err());
    assert!(AuditLog::open(&path, "test").is_err());
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep");
}

#[test]
fn a_record_written_before_a_crash_is_adopted_and_a_torn_one_is_cut_off_on_record() {
    let (_dir, log) = log_with(2);
    let before = std::fs::read(state::state_path(log.path())).unwrap();
    log.append(Event::new("Mount")).unwrap();
    // The crash: the third record is in the log, the anchor still at the second.
    std::fs::write(state::state_path(log.path()), &before).unwrap();
    log.append(Event::new("Unmount")).unwrap();
    let v = verify(log.path()).unwrap();
    assert!(v.intact(), "{:?}", v.problems);
    assert_eq!(v.anchored_records, 4);

    let mut file = OpenOptions::new().append(true).open(log.path()).unwrap();
    file.write_all(b"{\"seq\":5,\"time\":\"20").unwrap();
    log.append(Event::new("Mount")).unwrap();
    let v = verify(log.path()).unwrap();
    assert!(v.intact(), "the torn line is cut off: {:?}", v.problems);
    let records = verify::read(log.path()).unwrap();
    let discarded = &records[4].record;
    assert_eq!(discarded.action, "DiscardedTail");
    assert_eq!(discarded.details.as_ref().unwrap()["bytes"], 19);
    assert_eq!(records[5].record.action, "Mount");
    assert_eq!(lines(&log).len(), 6);
}

#[test]
fn failures_are_recorded_and_a_lost_state_file_restarts_the_chain_visibly() {
    let (dir, log) = log_with(1);
    let failed: Result<(), String> = Err("key mk-1 is Disabled and cannot be used".into());
    log.append(Event::new("Decrypt").outcome(&failed)).unwrap();
    let records = verify::read(log.path()).unwrap();
    assert_eq!(records[1].record.result, "error");
    assert_eq!(
        records[1].record.error.as_deref(),
        Some("key mk-1 is Disabled and cannot be used")
    );

    std::fs::remove_file(state::state_path(log.path())).unwrap();
    assert!(verify(log.path()).is_err(), "no key, no verification");
    let log = AuditLog::open(log.path(), "test").unwrap();
    let records = verify::read(log.path()).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].record.action, "AuditLogRestarted");
    assert!(verify(log.path()).unwrap().intact());
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("audit.jsonl.unverifiable-"))
        .collect();
    assert_eq!(aside.len(), 1, "the old log is kept");
}

#[test]
fn the_state_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let (_dir, log) = log_with(1);
    for path in [log.path().to_path_buf(), state::state_path(log.path())] {
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o077,
            0,
            "{path:?}"
        );
    }
}
