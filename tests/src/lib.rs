//! Test tools that span crates. The main one is the crash-state harness
//! ([`harness`]), in the spirit of dm-log-writes replay and CrashMonkey: every
//! write and flush reaching the cache device and the backend is recorded in
//! completion order, crash images are rebuilt at many points of that history
//! (including torn and reordered writes in the window since the last device
//! flush), recovery runs on each, and the result is checked against the
//! guarantees of the README's durability contract.

pub mod check;
pub mod harness;
pub mod overlay;
pub mod recording;
pub mod workload;
