//! Benchmarks. Each binary measures the thing and its peer in the same run,
//! interleaved, and prints ratios: on these noisy machines only numbers taken
//! side by side mean anything.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

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

/// `4096`, `64K`, `256M`, `1G`, `1T` (binary units) as bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("size {s:?}: unknown unit {c:?} (use K, M, G or T)")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("size {s:?}: not a number of bytes (e.g. 4096, 64K, 1G)"))
}

/// A minimal `--name value` argument reader for the bench binaries: every
/// option must be consumed, unknown ones are errors that name the option.
pub struct Args {
    usage: &'static str,
    rest: Vec<String>,
}

impl Args {
    pub fn from_env(usage: &'static str) -> Result<Self, String> {
        let rest: Vec<String> = std::env::args().skip(1).collect();
        if rest.iter().any(|a| a == "-h" || a == "--help") {
            return Err(format!("usage: {usage}"));
        }
        Ok(Self { usage, rest })
    }

    /// The value after `name`, removing both; `None` if absent.
    pub fn optional(&mut self, name: &str) -> Result<Option<String>, String> {
        let Some(i) = self.rest.iter().position(|a| a == name) else {
            return Ok(None);
        };
        if i + 1 >= self.rest.len() {
            return Err(format!("{name} needs a value\nusage: {}", self.usage));
        }
        let v = self.rest.remove(i + 1);
        self.rest.remove(i);
        Ok(Some(v))
    }

    pub fn required(&mut self, name: &str) -> Result<String, String> {
        self.optional(name)?
            .ok_or_else(|| format!("{name} is required\nusage: {}", self.usage))
    }

    /// Whether the flag `name` was given (removing it).
    pub fn flag(&mut self, name: &str) -> bool {
        match self.rest.iter().position(|a| a == name) {
            Some(i) => {
                self.rest.remove(i);
                true
            }
            None => false,
        }
    }

    /// Fails on anything left over.
    pub fn finish(self) -> Result<(), String> {
        match self.rest.first() {
            None => Ok(()),
            Some(a) => Err(format!("unknown argument {a:?}\nusage: {}", self.usage)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn summary_of_samples() {
        assert_eq!(summary(vec![3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(summary(vec![]), (0.0, 0.0, 0.0));
    }
}
