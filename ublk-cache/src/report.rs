//! How an error reaches the operator: the message with its causes, and the
//! ways forward the engine named, spelled as this binary's options (the
//! libraries name problems and remedies, never flags).

use ublk_cache::daemon::DaemonError;
use ublk_cache::{EngineError, Remedy};

/// What the operator does for `r`, with this binary's options.
pub fn remedy(r: Remedy) -> &'static str {
    match r {
        Remedy::Format => "pass --format to initialize it anew (this destroys what it holds)",
        Remedy::DiscardDirty => {
            "drop the dirty data with --discard-dirty (the writes it holds are lost)"
        }
        Remedy::AcceptBackendChange => {
            "write the dirty data back anyway with --accept-backend-change (the backend's newer \
             data in those ranges is overwritten)"
        }
        Remedy::StartOffline => "restart the server with --mode offline",
        Remedy::WriteBackFirst => "write it back first (`ublk-cache ctl ID flush`), then try again",
        Remedy::ShadowDir => "point UBLK_CACHE_SHADOW_DIR at a writable tmpfs directory",
    }
}

/// `remedies` as the end of a sentence: `; A`, or `; either A, or B`.
pub fn remedies(remedies: &[Remedy]) -> String {
    match remedies {
        [] => String::new(),
        [one] => format!("; {}", remedy(*one)),
        [first, rest @ ..] => {
            let mut s = format!("; either {}", remedy(*first));
            for r in rest {
                s.push_str(", or ");
                s.push_str(remedy(*r));
            }
            s
        }
    }
}

/// The whole error for stderr: every cause once, then the remedies.
pub fn error(e: &anyhow::Error) -> String {
    let mut s = String::new();
    for c in e.chain() {
        let t = c.to_string();
        if s.ends_with(&t) {
            continue;
        }
        if !s.is_empty() {
            s.push_str(": ");
        }
        s.push_str(&t);
    }
    let named = e.chain().find_map(|c| {
        c.downcast_ref::<DaemonError>()
            .map(|d| d.remedies())
            .filter(|r| !r.is_empty())
            .or_else(|| c.downcast_ref::<EngineError>().map(|e| e.remedies()))
    });
    if let Some(r) = named {
        s.push_str(&remedies(r));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remedies_read_as_one_sentence_naming_the_options() {
        assert_eq!(remedies(&[]), "");
        assert!(remedies(&[Remedy::Format]).starts_with("; pass --format"));
        let two = remedies(&[Remedy::AcceptBackendChange, Remedy::DiscardDirty]);
        assert!(
            two.contains("either write the dirty data back anyway with --accept-backend-change")
                && two.contains(", or drop the dirty data with --discard-dirty"),
            "{two}"
        );
        let e = anyhow::Error::new(DaemonError::Remote {
            message: "3 lines hold dirty data".into(),
            remedies: vec![Remedy::WriteBackFirst],
        });
        assert!(error(&e).contains("hold dirty data; write it back first (`ublk-cache ctl"));
    }
}
