//! Byte ranges on the command line and in `--preload-ranges` files:
//! `LEN` (from the start) or `OFFSET+LEN`, with size suffixes.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::size::parse_size;

/// `LEN` or `OFFSET+LEN` (e.g. `512M`, `1G+256M`).
pub fn parse_range(s: &str) -> Result<(u64, u64)> {
    let (off, len) = match s.split_once('+') {
        Some((o, l)) => (
            parse_size(o).map_err(anyhow::Error::msg)?,
            parse_size(l).map_err(anyhow::Error::msg)?,
        ),
        None => (0, parse_size(s).map_err(anyhow::Error::msg)?),
    };
    if len == 0 {
        bail!("range '{s}' is empty");
    }
    if off.checked_add(len).is_none() {
        bail!("range '{s}' reaches past 2^64");
    }
    Ok((off, len))
}

/// A ranges file: one `OFFSET LEN` or `OFFSET+LEN` per line; `#` starts a comment.
pub fn parse_ranges_file(path: &Path) -> Result<Vec<(u64, u64)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--preload-ranges {}: cannot read it", path.display()))?;
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
            _ => Err(anyhow::anyhow!("expected `OFFSET LEN` or `OFFSET+LEN`")),
        };
        out.push(r.with_context(|| {
            format!(
                "--preload-ranges {} line {}: '{raw}'",
                path.display(),
                i + 1
            )
        })?);
    }
    if out.is_empty() {
        bail!("--preload-ranges {}: no ranges in it", path.display());
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
        let e = format!("{:#}", parse_ranges_file(f.path()).unwrap_err());
        assert!(e.contains("line 2"), "{e}");
    }
}
