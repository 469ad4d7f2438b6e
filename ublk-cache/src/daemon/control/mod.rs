//! The control socket: one unix socket per server (`RUN_DIR/ID.ctl`, mode 0600),
//! spoken by `ublk-cache ctl`, `migrate-out` and `migrate-abort`.
//!
//! Protocol: the client sends one JSON request line; the server answers with
//! zero or more `{"progress": …}` lines and then one final line, either
//! `{"ok": true, "result": …}` or `{"ok": false, "error": "…", "remedies": […]}`.
//! One request per connection. A malformed request gets an error line and
//! never touches I/O. The request, the result of each verb and the error are
//! typed here, once, for the server and the client.

pub mod client;
pub mod metrics;
pub mod server;

use std::path::{Path, PathBuf};

use policies::CacheMode;
use serde::{Deserialize, Serialize};

use super::config::text;
use crate::engine::{Progress, StatsSnapshot};
use crate::error::Remedy;

/// Requests longer than this are refused (a request is a verb and a few words).
pub const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "verb", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Stats,
    Mode {
        #[serde(with = "text")]
        mode: CacheMode,
    },
    Flush,
    /// Preload `ranges` (offset, length); `None` preloads what the server was
    /// configured to preload at start.
    Preload {
        ranges: Option<Vec<(u64, u64)>>,
    },
    Invalidate,
    MigrateOut,
    MigrateAbort,
    /// Change the write-back limit while serving: a given part replaces the
    /// one in effect (0: no limit), an absent one stays. Until the server
    /// stops (the config keeps it across restarts).
    WritebackLimit {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bytes_per_sec: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        writes_per_sec: Option<u64>,
    },
}

/// One line from the server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Line {
    Progress {
        progress: Progress,
    },
    Done {
        ok: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        result: Option<serde_json::Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        /// Ways forward from a refusal (the client says how to take them).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        remedies: Vec<Remedy>,
    },
}

/// Bytes per second over the last second, from the server's sampler.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rates {
    pub writeback_bps: u64,
    pub backend_read_bps: u64,
    pub backend_write_bps: u64,
    pub read_bps: u64,
    pub write_bps: u64,
}

/// `ctl stats`: the engine's counters plus what only the server knows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatsReply {
    pub id: u32,
    pub backend: String,
    pub cache: String,
    pub uptime_s: u64,
    pub migrated_out: bool,
    pub hydrated: bool,
    #[serde(flatten)]
    pub engine: StatsSnapshot,
    pub rates: Rates,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeReply {
    #[serde(with = "text")]
    pub previous: CacheMode,
    #[serde(with = "text")]
    pub mode: CacheMode,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlushReply {
    pub dirty_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreloadReply {
    pub total: u64,
    pub fetched: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvalidateReply {
    pub dropped_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateOutReply {
    pub ready: bool,
    /// The mode to return to on abort.
    #[serde(with = "text")]
    pub previous: CacheMode,
    /// A retried migrate-out: the disk was migrated out already.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub already: bool,
}

/// The write-back limit now in effect (0: no limit).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WritebackLimitReply {
    pub bytes_per_sec: u64,
    pub writes_per_sec: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateAbortReply {
    #[serde(with = "text")]
    pub mode: CacheMode,
}

/// The result of a request, one type per verb.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Reply {
    Stats(Box<StatsReply>),
    Mode(ModeReply),
    Flush(FlushReply),
    Preload(PreloadReply),
    Invalidate(InvalidateReply),
    MigrateOut(MigrateOutReply),
    MigrateAbort(MigrateAbortReply),
    WritebackLimit(WritebackLimitReply),
}

impl Reply {
    /// The result of `req` as the server sent it.
    pub fn decode(req: &Request, v: serde_json::Value) -> serde_json::Result<Reply> {
        use serde_json::from_value as from;
        Ok(match req {
            Request::Stats => Reply::Stats(Box::new(from(v)?)),
            Request::Mode { .. } => Reply::Mode(from(v)?),
            Request::Flush => Reply::Flush(from(v)?),
            Request::Preload { .. } => Reply::Preload(from(v)?),
            Request::Invalidate => Reply::Invalidate(from(v)?),
            Request::MigrateOut => Reply::MigrateOut(from(v)?),
            Request::MigrateAbort => Reply::MigrateAbort(from(v)?),
            Request::WritebackLimit { .. } => Reply::WritebackLimit(from(v)?),
        })
    }
}

/// Where server `id`'s control socket lives.
pub fn socket_path(run_dir: &Path, id: u32) -> PathBuf {
    run_dir.join(format!("{id}.ctl"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_unknown_verbs_and_fields_are_refused() {
        for r in [
            Request::Stats,
            Request::Mode {
                mode: CacheMode::Through,
            },
            Request::Preload {
                ranges: Some(vec![(0, 4096)]),
            },
            Request::Preload { ranges: None },
            Request::MigrateOut,
            Request::WritebackLimit {
                bytes_per_sec: Some(50 << 20),
                writes_per_sec: None,
            },
        ] {
            let s = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r, "{s}");
        }
        assert_eq!(
            serde_json::to_string(&Request::Mode {
                mode: CacheMode::Back
            })
            .unwrap(),
            r#"{"verb":"mode","mode":"back"}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"verb":"mode","mode":"back","x":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"verb":"format-disk"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"verb":"mode"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"verb":"mode","mode":"fast"}"#).is_err());
    }

    #[test]
    fn replies_decode_by_verb_and_keep_their_wire_names() {
        let r = Reply::MigrateOut(MigrateOutReply {
            ready: true,
            previous: CacheMode::Back,
            already: false,
        });
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v, serde_json::json!({"ready": true, "previous": "back"}));
        let Reply::MigrateOut(m) = Reply::decode(&Request::MigrateOut, v).unwrap() else {
            panic!("not a migrate-out reply")
        };
        assert_eq!(m.previous, CacheMode::Back);
        assert!(Reply::decode(&Request::Flush, serde_json::json!({"x": 1})).is_err());
    }
}
