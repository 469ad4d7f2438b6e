//! Byte ranges on the command line and in `--preload-ranges` files:
//! `LEN` (from the start) or `OFFSET+LEN`, with size suffixes.

use std::path::Path;

use super::error::{DaemonError, DaemonResult};
use super::size::parse_size;

/// `LEN` or `OFFSET+LEN` (e.g. `512M`, `1G+256M`).
pub fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (off, len) = match s.split_once('+') {
        Some((o, l)) => (parse_size(o)?, parse_size(l)?),
        None => (0, parse_size(s)?),
    };
    if len == 0 {
        return Err(format!("range '{s}' is empty"));
    }
    if off.checked_add(len).is_none() {
        return Err(format!("range '{s}' reaches past 2^64"));
    }
    Ok((off, len))
}

/// A ranges file: one `OFFSET LEN` or `OFFSET+LEN` per line; `#` starts a comment.
pub fn parse_ranges_file(path: &Path) -> DaemonResult<Vec<(u64, u64)>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        DaemonError::io(
            format!("--preload-ranges {}: cannot read it", path.display()),
            e,
        )
    })?;
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let r = match words.as_slice() {
            [one] if one.contains('+') => parse_range(one),
            [off, len] => parse_range(&format!("{off}+{len}")),
            _ => Err("expected `OFFSET LEN` or `OFFSET+LEN`".to_string()),
        };
        out.push(r.map_err(|e| {
            DaemonError::config(format!(
                "--preload-ranges {} line {}: '{raw}': {e}",
                path.display(),
                i + 1
            ))
        })?);
    }
    if out.is_empty() {
        return Err(DaemonError::config(format!(
            "--preload-ranges {}: no ranges in it",
            path.display()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_bad_ones_name_the_problem() {
        assert_eq!(parse_range("512M").unwrap(), (0, 512 << 20));
        assert_eq!(parse_range("1G+4K").unwrap(), (1 << 30, 4096));
        assert!(parse_range("0").is_err());
        assert!(parse_range("1Q").is_err());
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), "# boot\n0 1M\n4M+64K  # kernel\n\n").unwrap();
        assert_eq!(
            parse_ranges_file(f.path()).unwrap(),
            vec![(0, 1 << 20), (4 << 20, 65536)]
        );
        std::fs::write(f.path(), "0 1M\n1 2 3\n").unwrap();
        let e = parse_ranges_file(f.path()).unwrap_err().chain();
        assert!(e.contains("line 2"), "{e}");
    }
}
