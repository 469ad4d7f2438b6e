//! The client side: send one request to a server's control socket, pass the
//! progress lines on, return the typed result (and the JSON the server sent,
//! for `--json`) or the server's refusal with its remedies.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::{Line, Reply, Request};
use crate::daemon::error::{DaemonError, DaemonResult};
use crate::engine::Progress;

/// What the server answered.
#[derive(Debug, Clone)]
pub struct Answer {
    pub reply: Reply,
    /// The result exactly as sent.
    pub json: serde_json::Value,
}

pub fn call(
    path: &Path,
    req: &Request,
    mut on_progress: impl FnMut(&Progress),
) -> DaemonResult<Answer> {
    let mut conn = UnixStream::connect(path).map_err(|e| {
        DaemonError::io(
            format!(
                "cannot reach the server's control socket {} (is the server running? see `ublk-cache list`)",
                path.display()
            ),
            e,
        )
    })?;
    let mut line = serde_json::to_string(req).map_err(|e| DaemonError::config(e.to_string()))?;
    line.push('\n');
    conn.write_all(line.as_bytes())
        .map_err(|e| DaemonError::io(format!("sending the request to {}", path.display()), e))?;
    for l in BufReader::new(conn).lines() {
        let l = l.map_err(|e| {
            DaemonError::io(format!("reading the reply from {}", path.display()), e)
        })?;
        if l.trim().is_empty() {
            continue;
        }
        let malformed =
            |e: serde_json::Error| DaemonError::refused(format!("malformed reply line: {l}: {e}"));
        match serde_json::from_str::<Line>(&l).map_err(malformed)? {
            Line::Progress { progress } => on_progress(&progress),
            Line::Done {
                ok: true, result, ..
            } => {
                let json = result.unwrap_or(serde_json::Value::Null);
                let reply = Reply::decode(req, json.clone()).map_err(malformed)?;
                return Ok(Answer { reply, json });
            }
            Line::Done {
                error, remedies, ..
            } => {
                return Err(DaemonError::Remote {
                    message: error
                        .unwrap_or_else(|| "the server refused without saying why".into()),
                    remedies,
                })
            }
        }
    }
    Err(DaemonError::refused(
        "the server closed the control connection without an answer (did it stop?)",
    ))
}
