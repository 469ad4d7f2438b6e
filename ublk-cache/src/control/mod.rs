//! The control socket: one unix socket per server (`RUN_DIR/ID.ctl`, mode 0600),
//! spoken by `ublk-cache ctl`, `migrate-out` and `migrate-abort`.
//!
//! Protocol: the client sends one JSON request line; the server answers with
//! zero or more `{"progress": …}` lines and then one final line, either
//! `{"ok": true, "result": …}` or `{"ok": false, "error": "…"}`. One request per
//! connection. A malformed request gets an error line and never touches I/O.

pub mod client;
pub mod metrics;
pub mod server;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Requests longer than this are refused (a request is a verb and a few words).
pub const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "verb", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Stats,
    Mode {
        mode: String,
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
}

/// One line from the server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    Progress {
        progress: ublk_cache::engine::Progress,
    },
    Done {
        ok: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        result: Option<serde_json::Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
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
                mode: "through".into(),
            },
            Request::Preload {
                ranges: Some(vec![(0, 4096)]),
            },
            Request::Preload { ranges: None },
            Request::MigrateOut,
        ] {
            let s = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r, "{s}");
        }
        assert!(serde_json::from_str::<Request>(r#"{"verb":"mode","mode":"back","x":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"verb":"format-disk"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"verb":"mode"}"#).is_err());
    }
}
