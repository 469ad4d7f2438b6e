//! The per-disk attributes of the feature request (CACHE_MODE, CACHE_SIZE,
//! PRELOAD_SIZE) and the ones ublk-cache adds (CACHE_WRITEBACK_ORDER,
//! CACHE_PRELOAD_RATE, CACHE_WRITEBACK_RATE, CACHE_WRITEBACK_LOW,
//! CACHE_BOOT_TRACE): their
//! values, parsed strictly. Sizes are in MB, the
//! OpenNebula convention (DISK/SIZE is MB too); a K/M/G/T suffix is accepted.

use crate::error::{Error, Result};

pub use policies::{BootTraceMode, CacheMode, WritebackOrder};

/// CACHE_MODE in OpenNebula's spelling, on ublk-cache's own mode type.
pub trait OneMode: Sized {
    /// NONE, AROUND, THRU (or THROUGH), BACK, OFFLINE; any case.
    fn parse(v: &str) -> std::result::Result<Self, String>;
    /// The word `ublk-cache serve --mode` takes.
    fn ublk(self) -> &'static str;
    /// The OpenNebula spelling.
    fn one(self) -> &'static str;
    /// Modes whose cache may hold writes the image does not have yet.
    fn holds_dirty(self) -> bool;
}

impl OneMode for CacheMode {
    fn parse(v: &str) -> std::result::Result<CacheMode, String> {
        Ok(match v.trim().to_ascii_uppercase().as_str() {
            "NONE" => CacheMode::None,
            "AROUND" => CacheMode::Around,
            "THRU" | "THROUGH" => CacheMode::Through,
            "BACK" => CacheMode::Back,
            "OFFLINE" => CacheMode::Offline,
            _ => {
                return Err(format!(
                    "'{v}' is not a cache mode; use NONE, AROUND, THRU, BACK or OFFLINE"
                ))
            }
        })
    }

    fn ublk(self) -> &'static str {
        self.as_str()
    }

    fn one(self) -> &'static str {
        match self {
            CacheMode::None => "NONE",
            CacheMode::Around => "AROUND",
            CacheMode::Through => "THRU",
            CacheMode::Back => "BACK",
            CacheMode::Offline => "OFFLINE",
        }
    }

    fn holds_dirty(self) -> bool {
        matches!(self, CacheMode::Back | CacheMode::Offline)
    }
}

/// CACHE_WRITEBACK_ORDER on ublk-cache's `--writeback-order` type.
pub trait OneOrder: Sized {
    fn parse(v: &str) -> std::result::Result<Self, String>;
    fn ublk(self) -> String;
}

impl OneOrder for WritebackOrder {
    fn parse(v: &str) -> std::result::Result<WritebackOrder, String> {
        match v.trim().to_ascii_uppercase().as_str() {
            "ORDERED" => Ok(WritebackOrder::Ordered),
            "RELAXED" => Ok(WritebackOrder::Relaxed),
            _ => Err(format!(
                "'{v}' is not a write-back order; use ORDERED or RELAXED"
            )),
        }
    }

    fn ublk(self) -> String {
        self.to_string()
    }
}

/// A mode in a record, as ublk-cache spells it.
pub mod mode_serde {
    use super::CacheMode;

    pub fn serialize<S: serde::Serializer>(m: &CacheMode, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(m.as_str())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<CacheMode, D::Error> {
        let v = <String as serde::Deserialize>::deserialize(d)?;
        v.parse().map_err(serde::de::Error::custom)
    }
}

/// A size attribute in MB: `512`, `512M`, `20G`, `1T` (also `512MB`, `20GB`).
/// `allow_zero`: whether 0 means something (PRELOAD_SIZE=0: no preload).
pub fn parse_mb(name: &str, v: &str, allow_zero: bool) -> Result<u64> {
    let t = v.trim();
    let upper = t.to_ascii_uppercase();
    let (digits, mult) = match upper.trim_end_matches('B') {
        s if s.ends_with('T') => (&s[..s.len() - 1], 1024 * 1024),
        s if s.ends_with('G') => (&s[..s.len() - 1], 1024),
        s if s.ends_with('M') => (&s[..s.len() - 1], 1),
        s => (s, 1),
    };
    let bad = || {
        Error::Attribute(format!(
            "{name}='{v}' is not a size in MB (a whole number, optionally with M, G or T)"
        ))
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 15 {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let mb = n.checked_mul(mult).ok_or_else(bad)?;
    if mb == 0 && !allow_zero {
        return Err(Error::Attribute(format!(
            "{name}='{v}' is zero; give a size in MB (for no cache at all use CACHE_MODE=NONE)"
        )));
    }
    Ok(mb)
}

/// CACHE_PRELOAD_RATE or CACHE_WRITEBACK_RATE in MB/s (0: unlimited).
pub fn parse_rate(name: &str, v: &str) -> Result<u64> {
    let t = v.trim().to_ascii_uppercase();
    let t = t.strip_suffix("/S").unwrap_or(&t);
    parse_mb(name, t, true)
}

/// The high watermark the driver leaves at ublk-cache's default: a
/// CACHE_WRITEBACK_LOW must be below it.
pub const WRITEBACK_HIGH_PCT: u8 = 70;

/// CACHE_WRITEBACK_LOW: `OFF` (write-back as fast as CACHE_WRITEBACK_RATE
/// lets it) or a percentage of the cache below the high watermark, `10` or
/// `10%` (ublk-cache's `--writeback-low`: write-back paced by the dirty level).
pub fn parse_writeback_low(name: &str, v: &str) -> Result<Option<u8>> {
    let t = v.trim();
    if t.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let n = t.strip_suffix('%').unwrap_or(t).trim();
    match n.parse::<u8>() {
        Ok(p) if p < WRITEBACK_HIGH_PCT => Ok(Some(p)),
        _ => Err(Error::Attribute(format!(
            "{name}='{v}' is not OFF or a percentage of the cache below {WRITEBACK_HIGH_PCT} \
             (the high watermark), as 10 or 10%"
        ))),
    }
}

/// CACHE_BOOT_TRACE: `OFF`, `RECORD`, `REPLAY` or `AUTO`, any case
/// (`--boot-trace`).
pub fn parse_boot_trace(name: &str, v: &str) -> Result<BootTraceMode> {
    v.trim()
        .to_ascii_lowercase()
        .parse()
        .map_err(|_| Error::Attribute(format!("{name}='{v}' is not OFF, RECORD, REPLAY or AUTO")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_trace() {
        assert_eq!(
            parse_boot_trace("X", " Auto ").unwrap(),
            BootTraceMode::Auto
        );
        assert_eq!(parse_boot_trace("X", "OFF").unwrap(), BootTraceMode::Off);
        let e = parse_boot_trace("X", "on").unwrap_err().to_string();
        assert!(
            e.contains("X='on' is not OFF, RECORD, REPLAY or AUTO"),
            "{e}"
        );
    }

    #[test]
    fn writeback_low() {
        assert_eq!(parse_writeback_low("X", "OFF").unwrap(), None);
        assert_eq!(parse_writeback_low("X", " off ").unwrap(), None);
        assert_eq!(parse_writeback_low("X", "10").unwrap(), Some(10));
        assert_eq!(parse_writeback_low("X", "25%").unwrap(), Some(25));
        assert_eq!(parse_writeback_low("X", "0").unwrap(), Some(0));
        for bad in ["70", "100%", "-1", "ten", ""] {
            let e = parse_writeback_low("CACHE_WRITEBACK_LOW", bad)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("CACHE_WRITEBACK_LOW='{bad}'")) && e.contains("below 70"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn modes() {
        for (v, m) in [
            ("NONE", CacheMode::None),
            ("around", CacheMode::Around),
            ("THRU", CacheMode::Through),
            ("through", CacheMode::Through),
            (" Back ", CacheMode::Back),
            ("OFFLINE", CacheMode::Offline),
        ] {
            assert_eq!(CacheMode::parse(v), Ok(m));
        }
        let e = CacheMode::parse("WRITEBACK").unwrap_err();
        assert!(e.contains("'WRITEBACK' is not a cache mode"), "{e}");
        assert_eq!(CacheMode::Through.ublk(), "through");
        assert!(WritebackOrder::parse("sloppy").is_err());
        assert_eq!(
            WritebackOrder::parse("relaxed"),
            Ok(WritebackOrder::Relaxed)
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_mb("CACHE_SIZE", "10240", false).unwrap(), 10240);
        assert_eq!(parse_mb("CACHE_SIZE", "20G", false).unwrap(), 20480);
        assert_eq!(parse_mb("CACHE_SIZE", "20gb", false).unwrap(), 20480);
        assert_eq!(parse_mb("CACHE_SIZE", "1T", false).unwrap(), 1 << 20);
        assert_eq!(parse_mb("CACHE_SIZE", "512M", false).unwrap(), 512);
        assert_eq!(parse_mb("PRELOAD_SIZE", "0", true).unwrap(), 0);
        for bad in ["", "-1", "1.5G", "ten", "10 G", "G", "99999999999999999999"] {
            let e = parse_mb("CACHE_SIZE", bad, false).unwrap_err().to_string();
            assert!(e.contains("CACHE_SIZE="), "{bad}: {e}");
        }
        let e = parse_mb("CACHE_SIZE", "0", false).unwrap_err().to_string();
        assert!(e.contains("CACHE_MODE=NONE"), "{e}");
        assert_eq!(parse_rate("CACHE_PRELOAD_RATE", "100M/s").unwrap(), 100);
        assert_eq!(parse_rate("CACHE_PRELOAD_RATE", "0").unwrap(), 0);
    }
}
