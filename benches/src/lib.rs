//! Benchmarks. Each binary measures the thing and its peer in the same run,
//! interleaved, and prints ratios: on these noisy machines only numbers taken
//! side by side mean anything.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

pub mod replay;
pub mod synthetic_boot;

static SHADOW_DIR: OnceLock<PathBuf> = OnceLock::new();

/// Give this bench process's engines a private crash-shadow directory (the
/// caller owns and removes it); [`shadow_dir`] hands it out.
pub fn use_shadow_dir(dir: &Path) {
    let _ = SHADOW_DIR.set(dir.to_path_buf());
}

/// The directory set by [`use_shadow_dir`] (else the engine's default).
pub fn shadow_dir() -> PathBuf {
    SHADOW_DIR
        .get()
        .cloned()
        .unwrap_or_else(|| ublk_cache::engine::shadow::DEFAULT_DIR.into())
}

/// Median, min and max of a set of samples.
pub fn summary(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let med = if v.is_empty() { 0.0 } else { v[v.len() / 2] };
    (med, *v.first().unwrap_or(&0.0), *v.last().unwrap_or(&0.0))
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A size on a bench's command line: the server's one grammar (`64K`, `1G`).
pub use ublk_cache::daemon::size::parse_size;

/// A non-negative number of milliseconds (`--write-delay-ms 0.5`).
pub fn parse_millis(s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|x| x.is_finite() && *x >= 0.0)
        .ok_or_else(|| format!("{s}: not a number of milliseconds"))
}

/// [`parse_millis`] as a duration.
pub fn parse_ms(s: &str) -> Result<Duration, String> {
    parse_millis(s).map(|x| Duration::from_secs_f64(x / 1000.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds() {
        assert_eq!(parse_ms("2"), Ok(Duration::from_millis(2)));
        assert_eq!(parse_ms("0.5"), Ok(Duration::from_micros(500)));
        assert!(parse_ms("-1").is_err());
        assert!(parse_ms("soon").is_err());
    }

    #[test]
    fn summary_of_samples() {
        assert_eq!(summary(vec![3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(summary(vec![]), (0.0, 0.0, 0.0));
    }
}
