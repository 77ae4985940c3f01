//! The bursts' arithmetic, without a worker or a filesystem.

use super::*;

fn names(inos: std::ops::Range<u64>) -> Vec<OsString> {
    inos.map(|i| OsString::from(format!("b{i}"))).collect()
}

fn entries(inos: std::ops::Range<u64>) -> Vec<(u64, OsString)> {
    inos.clone().zip(names(inos)).collect()
}

fn ask_for(inos: std::ops::Range<u64>) -> Ahead {
    Ahead::Ask(names(inos))
}

fn held(ahead: &ChecksAhead) -> usize {
    crate::util::lock(&ahead.dirs).held
}

#[test]
fn a_second_check_reads_the_directory_and_bursts_follow_the_checks() {
    let ahead = ChecksAhead::default();
    assert_eq!(ahead.checked(7, 0, false), Ahead::Nothing, "one check says nothing yet");
    assert_eq!(ahead.checked(7, 0, false), Ahead::Read { from: 0 });
    assert_eq!(
        ahead.checked(7, 0, false),
        Ahead::Nothing,
        "being read (counted: 1 check)"
    );
    assert_eq!(ahead.swept(7, entries(0..1000), None), ask_for(0..LEAD as u64));
    assert_eq!(held(&ahead), 1000 - LEAD, "asked-for names are let go");
    // Each check makes room for PER_CHECK more, asked for in bursts,
    // and the rest once a sixteenth of the files were checked.
    let room = |check: usize| match check * WHOLE_AFTER >= 1000 {
        true => 1000,
        false => (LEAD + PER_CHECK * check).min(1000),
    };
    let mut asked = LEAD;
    for check in 1..=999 {
        match ahead.checked(7, 0, false) {
            Ahead::Ask(burst) => {
                assert!(burst.len() >= MIN_BURST || asked + burst.len() == 1000, "a trickle");
                assert_eq!(burst, names(asked as u64..(asked + burst.len()) as u64));
                asked += burst.len();
            }
            other => assert_eq!(other, Ahead::Nothing),
        }
        assert!(asked <= room(check), "more than the checks allow");
        assert!(asked + MIN_BURST > room(check), "fell behind");
    }
    assert_eq!(asked, 1000, "every entry, once");
    assert_eq!(held(&ahead), 0);
    // More checks in the pass than entries: files were made since, so
    // the directory is read again.
    assert_eq!(ahead.checked(7, 0, false), Ahead::Read { from: 0 }, "read again");
    assert_eq!(
        ahead.checked(8, 0, false),
        Ahead::Nothing,
        "another directory has its own"
    );
}

#[test]
fn a_sixteenth_of_a_directory_checked_asks_for_the_rest_and_fewer_checks_do_not() {
    let ahead = ChecksAhead::default();
    ahead.checked(7, 0, false);
    ahead.checked(7, 0, false);
    let len = 16_000;
    assert_eq!(ahead.swept(7, entries(0..len as u64), None), ask_for(0..LEAD as u64));
    let mut asked = LEAD;
    for check in 1..len / WHOLE_AFTER {
        if let Ahead::Ask(burst) = ahead.checked(7, 0, false) {
            asked += burst.len();
        }
        assert!(
            asked <= LEAD + PER_CHECK * check,
            "a few files looked at cost a few more"
        );
    }
    match ahead.checked(7, 0, false) {
        Ahead::Ask(burst) => assert_eq!(burst, names(asked as u64..len as u64), "the rest, at once"),
        other => panic!("the rest was not asked for: {other:?}"),
    }
    assert_eq!(held(&ahead), 0);
}

#[test]
fn checks_out_of_inode_order_ask_for_the_rest_soon() {
    // At least 32 such checks, and one per 128 files of the reading.
    for (len, after) in [(2_000, OUT_OF_ORDER_AFTER), (10_000, 78)] {
        let ahead = ChecksAhead::default();
        ahead.checked(7, 0, false);
        ahead.checked(7, 0, false);
        assert_eq!(ahead.swept(7, entries(0..len), None), ask_for(0..LEAD as u64));
        // Checks within what was asked for, then past it (the program
        // goes its own way): the rest once those are most of the checks.
        let (mut asked, mut beyond) = (LEAD as u64, 0);
        for check in 0..len {
            let ino = if check < 8 { check } else { len - 1 - check };
            beyond += usize::from(check >= 8);
            match ahead.checked(7, ino, false) {
                Ahead::Ask(burst) if asked + burst.len() as u64 == len => {
                    assert_eq!(beyond, after, "asked for the rest too early or late");
                    assert_eq!(burst, names(asked..len));
                    break;
                }
                Ahead::Ask(burst) => {
                    assert_eq!(burst, names(asked..asked + burst.len() as u64), "a burst in order");
                    asked += burst.len() as u64;
                }
                other => assert_eq!(other, Ahead::Nothing),
            }
            assert!(beyond < after, "the rest was not asked for");
        }
        assert_eq!(held(&ahead), 0);
    }
}

#[test]
fn checks_that_take_results_of_the_worker_make_room_faster() {
    let ahead = ChecksAhead::default();
    ahead.checked(7, 0, false);
    ahead.checked(7, 0, false);
    assert_eq!(ahead.swept(7, entries(0..2000), None), ask_for(0..LEAD as u64));
    let mut asked = LEAD;
    for check in 1..=120 {
        if let Ahead::Ask(burst) = ahead.checked(7, 0, true) {
            asked += burst.len();
        }
        let room = LEAD + (PER_CHECK + PER_TAKEN) * check;
        assert!(asked <= room, "more than the checks allow");
        assert!(asked + MIN_BURST > room.min(2000), "fell behind");
    }
    assert_eq!(asked, 2000);
}

#[test]
fn a_reading_that_stopped_goes_on_and_failures_start_over() {
    let ahead = ChecksAhead::default();
    ahead.checked(3, 0, false);
    ahead.checked(3, 0, false);
    assert_eq!(
        ahead.swept(3, entries(12..20), Some(77)),
        ask_for(12..20),
        "a short last burst"
    );
    assert_eq!(
        ahead.checked(3, 0, false),
        Ahead::Read { from: 77 },
        "on from where it stopped"
    );
    // The last piece holds 2 files: only more checks than the 10 of
    // the whole pass mean files were made since.
    assert_eq!(ahead.swept(3, entries(20..22), None), ask_for(20..22));
    for check in 2..=10 {
        assert_eq!(ahead.checked(3, 0, false), Ahead::Nothing, "check {check} of the pass");
    }
    assert_eq!(ahead.checked(3, 0, false), Ahead::Read { from: 0 }, "a new pass");
    ahead.abandoned(3);
    assert_eq!(ahead.checked(3, 0, false), Ahead::Nothing, "starts over");
    assert_eq!(ahead.checked(3, 0, false), Ahead::Read { from: 0 });
    assert_eq!(ahead.swept(3, Vec::new(), None), Ahead::Nothing, "an empty directory");
    assert_eq!(ahead.checked(3, 0, false), Ahead::Read { from: 0 }, "a file made since");
}

#[test]
fn a_directory_forgotten_while_read_stays_forgotten() {
    let ahead = ChecksAhead::default();
    ahead.checked(5, 0, false);
    assert_eq!(ahead.checked(5, 0, false), Ahead::Read { from: 0 });
    ahead.abandoned(5); // the kernel forgot it; the number may be another's now
    assert_eq!(ahead.swept(5, entries(0..10), None), Ahead::Nothing);
    assert_eq!(held(&ahead), 0);
    assert_eq!(ahead.checked(5, 0, false), Ahead::Nothing, "a first check again");
}

#[test]
fn names_held_and_directories_are_bounded() {
    let ahead = ChecksAhead::default();
    for dir in [1, 2] {
        ahead.checked(dir, 0, false);
        ahead.checked(dir, 0, false);
    }
    ahead.swept(1, entries(0..(MAX_HELD - 100) as u64), None);
    assert_eq!(held(&ahead), MAX_HELD - 100 - LEAD);
    ahead.swept(2, entries(0..1000), None); // over the bound: the others go
    assert_eq!(held(&ahead), 1000 - LEAD);
    assert_eq!(
        ahead.checked(1, 0, false),
        Ahead::Nothing,
        "forgotten: a first check again"
    );
    let ahead = ChecksAhead::default();
    for dir in 0..MAX_DIRS as u64 {
        ahead.checked(dir, 0, false);
    }
    assert_eq!(ahead.checked(0, 0, false), Ahead::Read { from: 0 });
    ahead.checked(MAX_DIRS as u64, 0, false); // one too many: all forgotten
    assert_eq!(
        ahead.checked(1, 0, false),
        Ahead::Nothing,
        "forgotten: a first check again"
    );
}
