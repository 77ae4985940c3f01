//! The integration tests, one binary with a module per feature (one link
//! of kmsfs and its dependencies instead of one per file). Tests that mount
//! hold a `common::Mount`, which unmounts on drop, even on panic.
//! `cargo test --test it -- MODULE::` runs one module.

mod common;

mod acl_atime;
mod audit;
mod backups;
mod byok;
mod cli;
mod cold_io;
mod crash;
mod empty_checks;
mod faults;
mod format_interop;
mod fsck;
mod fsck_walk;
mod fsx;
mod generated;
mod golden;
mod host_records;
mod hostile_files;
mod hostile_listing;
mod hostile_provider;
mod keys;
mod leak;
mod operator;
mod posix;
mod posix_details;
mod provider_outage;
mod providers;
mod removals;
mod reverse;
mod rotation;
mod service;
mod stress;
mod tamper;
mod tree;
