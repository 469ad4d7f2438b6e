//! Write-back ordering: how dirty data may reach the backend.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WritebackOrder {
    /// The backend always holds the disk as the guest saw it at one of its FLUSH
    /// points (plus any subset of the writes of the epoch being written back).
    /// Epochs reach the backend in order, each followed by a backend flush, and an
    /// overwrite of a line still dirty from an earlier epoch waits for that epoch.
    #[default]
    Ordered,
    /// Dirty data is written back in any order and overwritten in place. Faster for
    /// rewrite-heavy loads, but if the cache device is lost the backend may hold a
    /// state the guest never saw.
    Relaxed,
}

impl WritebackOrder {
    /// Whether a write into a line that is dirty from an older epoch must wait until
    /// that epoch has been written back.
    pub fn overwrite_waits_for_older_epoch(self) -> bool {
        self == WritebackOrder::Ordered
    }

    /// Pick the epoch whose lines the flusher may write next. `oldest_dirty` is the
    /// oldest epoch with dirty lines; `oldest_open` the oldest epoch that still has
    /// writes being applied. In ordered mode nothing of a later epoch may go while
    /// an earlier one can still gain data.
    pub fn next_epoch(self, oldest_dirty: Option<u64>, oldest_open: Option<u64>) -> Option<u64> {
        match self {
            WritebackOrder::Relaxed => oldest_dirty,
            WritebackOrder::Ordered => match (oldest_dirty, oldest_open) {
                (Some(d), Some(o)) if o < d => None,
                (d, _) => d,
            },
        }
    }
}

impl fmt::Display for WritebackOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WritebackOrder::Ordered => "ordered",
            WritebackOrder::Relaxed => "relaxed",
        })
    }
}

impl FromStr for WritebackOrder {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ordered" => Ok(WritebackOrder::Ordered),
            "relaxed" => Ok(WritebackOrder::Relaxed),
            other => Err(format!(
                "unknown write-back order '{other}' (expected ordered or relaxed)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordered_never_skips_past_an_epoch_still_being_written() {
        let o = WritebackOrder::Ordered;
        assert_eq!(o.next_epoch(Some(5), Some(3)), None);
        assert_eq!(o.next_epoch(Some(5), Some(5)), Some(5));
        assert_eq!(o.next_epoch(Some(5), Some(7)), Some(5));
        assert_eq!(o.next_epoch(Some(5), None), Some(5));
        assert_eq!(o.next_epoch(None, Some(2)), None);
        assert_eq!(
            WritebackOrder::Relaxed.next_epoch(Some(5), Some(3)),
            Some(5)
        );
    }

    #[test]
    fn parses() {
        assert_eq!(
            "Ordered".parse::<WritebackOrder>().unwrap(),
            WritebackOrder::Ordered
        );
        assert_eq!(
            "relaxed".parse::<WritebackOrder>().unwrap(),
            WritebackOrder::Relaxed
        );
        assert!("fast"
            .parse::<WritebackOrder>()
            .unwrap_err()
            .contains("fast"));
    }
}
