//! Human sizes on the command line: `512M`, `20G`, `64K`, `4096`, `1.5G`.

/// Parse a size with an optional binary suffix (K, M, G, T; `KiB`/`KB` forms and
/// lower case accepted; all are powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => {
            return Err(format!(
                "size '{s}': unknown unit '{other}' (use K, M, G or T)"
            ))
        }
    };
    if num.is_empty() {
        return Err(format!("size '{s}': no number"));
    }
    let bytes = if num.contains('.') {
        let v: f64 = num
            .parse()
            .map_err(|_| format!("size '{s}': bad number '{num}'"))?;
        let b = v * mult as f64;
        if !b.is_finite() || b >= u64::MAX as f64 {
            return Err(format!("size '{s}' is too large"));
        }
        b as u64
    } else {
        let v: u64 = num
            .parse()
            .map_err(|_| format!("size '{s}': bad number '{num}'"))?;
        v.checked_mul(mult)
            .ok_or_else(|| format!("size '{s}' is too large"))?
    };
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("20G").unwrap(), 20 << 30);
        assert_eq!(parse_size("1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_size("2 GiB").unwrap(), 2 << 30);
    }

    #[test]
    fn names_the_problem() {
        assert!(parse_size("12X").unwrap_err().contains("unknown unit"));
        assert!(parse_size("M").unwrap_err().contains("no number"));
        assert!(parse_size("99999999999T")
            .unwrap_err()
            .contains("too large"));
    }
}
