//! Running the external tools the helper drives (rbd, ceph, lvcreate, vgs,
//! systemctl, journalctl, ublk-cache). A tool is named in one.conf by one or
//! more words (`RBD=rbd`, `RBD=/opt/ceph/bin/rbd --cluster x`); arguments are
//! passed as separate words, never through a shell.

use std::process::{Command, Stdio};

use crate::error::{Error, Result};

/// A program and its leading arguments, from one.conf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tool(pub Vec<String>);

impl Tool {
    pub fn new(words: &str) -> Self {
        Tool(words.split_whitespace().map(str::to_string).collect())
    }

    pub fn name(&self) -> &str {
        self.0.first().map(String::as_str).unwrap_or("")
    }

    /// The command with `args` appended, stdin closed.
    pub fn command<S: AsRef<str>>(&self, args: &[S]) -> Command {
        let mut c = Command::new(self.name());
        c.args(&self.0[1..]);
        c.args(args.iter().map(|a| a.as_ref()));
        c.stdin(Stdio::null());
        c
    }

    /// Run and return stdout; a non-zero exit is an error naming the command
    /// and the last lines of its stderr.
    pub fn run<S: AsRef<str>>(&self, args: &[S]) -> Result<String> {
        let out = self.output(args)?;
        if !out.status.success() {
            return Err(self.failure(args, &out));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Run and return the whole output whatever the exit status.
    pub fn output<S: AsRef<str>>(&self, args: &[S]) -> Result<std::process::Output> {
        let mut c = self.command(args);
        c.output().map_err(|e| Error::Command {
            cmd: self.shown(args),
            status: "not started".into(),
            detail: e.to_string(),
        })
    }

    /// The error for a finished, failed run.
    pub fn failure<S: AsRef<str>>(&self, args: &[S], out: &std::process::Output) -> Error {
        Error::Command {
            cmd: self.shown(args),
            status: match out.status.code() {
                Some(c) => format!("exit {c}"),
                None => "killed by a signal".into(),
            },
            detail: one_line(&String::from_utf8_lossy(&out.stderr), 6),
        }
    }

    /// The command line as shown in messages.
    pub fn shown<S: AsRef<str>>(&self, args: &[S]) -> String {
        let mut w: Vec<&str> = self.0.iter().map(String::as_str).collect();
        w.extend(args.iter().map(|a| a.as_ref()));
        w.join(" ")
    }
}

/// The last `max` non-empty lines of `text`, joined with " | ": error text for
/// oned, which shows the TM's stderr as one line.
pub fn one_line(text: &str, max: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let start = lines.len().saturating_sub(max);
    let s = lines[start..].join(" | ");
    if s.is_empty() {
        "(no error output)".into()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_keeps_the_last_lines() {
        assert_eq!(one_line("a\n\n b \nc\n", 2), "b | c");
        assert_eq!(one_line("", 3), "(no error output)");
    }

    #[test]
    fn a_failing_tool_is_named_with_its_stderr() {
        let t = Tool::new("sh -c");
        let e = t.run(&["echo oops >&2; exit 3"]).unwrap_err().to_string();
        assert!(
            e.contains("exit 3") && e.contains("oops") && e.contains("sh -c"),
            "{e}"
        );
        assert_eq!(t.run(&["echo hi"]).unwrap(), "hi\n");
    }
}
