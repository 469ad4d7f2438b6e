//! Human sizes on the command line, in config files and in range lists:
//! `512M`, `20G`, `64K`, `4096`, `1.5G`, `2 GiB`. One grammar everywhere
//! (the `parse-size` crate, exact for decimals); every unit is a power of
//! 1024, as operators of disks mean it.

use parse_size::Config;

const SIZES: Config = Config::new().with_binary();

/// Parse a size with an optional binary suffix (K, M, G, T, P; `KiB`/`KB` forms
/// and lower case accepted). Errors name the input and the problem.
pub fn parse_size(s: &str) -> Result<u64, String> {
    SIZES.parse_size(s.trim()).map_err(|e| match e {
        parse_size::Error::Empty => format!("size '{s}': no number"),
        parse_size::Error::InvalidDigit => format!(
            "size '{s}': unknown unit or stray character (a number with K, M, G or T, e.g. 512M)"
        ),
        parse_size::Error::PosOverflow => format!("size '{s}' is too large"),
        _ => format!("size '{s}': {e}"),
    })
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
        assert_eq!(parse_size("1kb").unwrap(), 1024);
        assert_eq!(parse_size(" 8T ").unwrap(), 8 << 40);
    }

    #[test]
    fn names_the_problem() {
        assert!(parse_size("12X").unwrap_err().contains("unknown unit"));
        assert!(parse_size("M").unwrap_err().contains("no number"));
        assert!(parse_size("").unwrap_err().contains("no number"));
        assert!(parse_size("99999999999T")
            .unwrap_err()
            .contains("too large"));
    }
}
