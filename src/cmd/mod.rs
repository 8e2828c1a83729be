//! The subcommands, one module each.

pub mod bench;
pub mod dirty_log_test;
pub mod migrate;
pub mod run;
pub mod stress;
pub mod trace;
