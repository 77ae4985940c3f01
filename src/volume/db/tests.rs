use super::*;

/// SQLITE_FULL can come from any statement (storing pending keys, a
/// rotation's writes), not only from opening: it says what to do.
#[test]
fn a_full_filesystem_is_named_as_such_whatever_the_statement() {
    let full = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL), None);
    let said = DbError::Sqlite {
        path: "/v/kmsfs.db".into(),
        source: full,
    }
    .to_string();
    assert!(said.contains("is full: free space there"), "{said}");
    let busy = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY), None);
    let said = DbError::Sqlite {
        path: "/v/kmsfs.db".into(),
        source: busy,
    }
    .to_string();
    assert!(!said.contains("full"), "{said}");
}
