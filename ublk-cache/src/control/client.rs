//! The client side: send one request to a server's control socket, pass the
//! progress lines on, return the final result or the server's error.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use ublk_cache::engine::Progress;

use super::{Reply, Request};

pub fn call(
    path: &Path,
    req: &Request,
    mut on_progress: impl FnMut(&Progress),
) -> Result<serde_json::Value> {
    let mut conn = UnixStream::connect(path).with_context(|| {
        format!(
            "cannot reach the server's control socket {} (is the server running? see `ublk-cache list`)",
            path.display()
        )
    })?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    conn.write_all(line.as_bytes())
        .with_context(|| format!("sending the request to {}", path.display()))?;
    for l in BufReader::new(conn).lines() {
        let l = l.with_context(|| format!("reading the reply from {}", path.display()))?;
        if l.trim().is_empty() {
            continue;
        }
        let reply: Reply =
            serde_json::from_str(&l).with_context(|| format!("malformed reply line: {l}"))?;
        match reply {
            Reply::Progress { progress } => on_progress(&progress),
            Reply::Done {
                ok: true, result, ..
            } => return Ok(result.unwrap_or(serde_json::Value::Null)),
            Reply::Done { error, .. } => {
                return Err(anyhow!(
                    error.unwrap_or_else(|| "the server refused without saying why".into())
                ))
            }
        }
    }
    bail!("the server closed the control connection without an answer (did it stop?)")
}
