//! `--boot-trace`: what learned boot preload does with one start (the server's
//! option, and the OpenNebula driver's CACHE_BOOT_TRACE).

/// What `--boot-trace` does with this start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootTraceMode {
    /// Nothing is recorded.
    #[default]
    Off,
    /// Record what the guest reads in its boot window and merge it into
    /// the disk's trace.
    Record,
    /// Prefetch the disk's trace ahead of the guest; record nothing.
    Replay,
    /// Both: prefetch the trace there is, and record this boot into it.
    Auto,
}

impl BootTraceMode {
    pub fn records(self) -> bool {
        matches!(self, BootTraceMode::Record | BootTraceMode::Auto)
    }

    pub fn replays(self) -> bool {
        matches!(self, BootTraceMode::Replay | BootTraceMode::Auto)
    }
}

impl std::fmt::Display for BootTraceMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BootTraceMode::Off => "off",
            BootTraceMode::Record => "record",
            BootTraceMode::Replay => "replay",
            BootTraceMode::Auto => "auto",
        })
    }
}

impl std::str::FromStr for BootTraceMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "off" => Ok(BootTraceMode::Off),
            "record" => Ok(BootTraceMode::Record),
            "replay" => Ok(BootTraceMode::Replay),
            "auto" => Ok(BootTraceMode::Auto),
            other => Err(format!(
                "boot-trace mode '{other}': expected off, record, replay or auto"
            )),
        }
    }
}
