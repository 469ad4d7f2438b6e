//! Backend specifications: `file:PATH`, `dev:/dev/X`, and `rbd:POOL/IMAGE[@SNAP]`
//! (in builds with the `rbd` feature, the default).

use std::fmt;
use std::path::PathBuf;

#[cfg(feature = "rbd")]
use rbd_backend::RbdSpec;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    File(PathBuf),
    Dev(PathBuf),
    #[cfg(feature = "rbd")]
    Rbd(RbdSpec),
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendSpec::File(p) => write!(f, "file:{}", p.display()),
            BackendSpec::Dev(p) => write!(f, "dev:{}", p.display()),
            #[cfg(feature = "rbd")]
            BackendSpec::Rbd(r) => write!(f, "rbd:{r}"),
        }
    }
}

#[cfg(feature = "rbd")]
const KINDS: &str = "file:PATH, dev:/dev/X or rbd:POOL/IMAGE[@SNAP]";
#[cfg(not(feature = "rbd"))]
const KINDS: &str = "file:PATH or dev:/dev/X";

impl std::str::FromStr for BackendSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, rest) = s
            .split_once(':')
            .ok_or_else(|| format!("backend '{s}': expected {KINDS}"))?;
        if rest.is_empty() {
            return Err(format!("backend '{s}': the path is empty"));
        }
        match kind {
            "file" => Ok(BackendSpec::File(PathBuf::from(rest))),
            "dev" => Ok(BackendSpec::Dev(PathBuf::from(rest))),
            #[cfg(feature = "rbd")]
            "rbd" => RbdSpec::parse(rest).map(BackendSpec::Rbd),
            #[cfg(not(feature = "rbd"))]
            "rbd" => Err(format!(
                "backend '{s}': this build has no RBD backend (built without the `rbd` feature)"
            )),
            other => Err(format!(
                "backend '{s}': unknown kind '{other}' (expected {KINDS})"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        assert_eq!(
            "file:/a/b.img".parse::<BackendSpec>().unwrap(),
            BackendSpec::File("/a/b.img".into())
        );
        assert_eq!(
            "dev:/dev/rbd0".parse::<BackendSpec>().unwrap(),
            BackendSpec::Dev("/dev/rbd0".into())
        );
        assert!("/a/b.img"
            .parse::<BackendSpec>()
            .unwrap_err()
            .contains("expected file:PATH"));
        assert!("nfs:/x"
            .parse::<BackendSpec>()
            .unwrap_err()
            .contains("unknown kind 'nfs'"));
        assert!("file:"
            .parse::<BackendSpec>()
            .unwrap_err()
            .contains("empty"));
    }

    #[cfg(feature = "rbd")]
    #[test]
    fn rbd_specs() {
        let s: BackendSpec = "rbd:one/one-7-42-0".parse().unwrap();
        assert_eq!(s.to_string(), "rbd:one/one-7-42-0");
        let s: BackendSpec = "rbd:one/one-7@snap".parse().unwrap();
        assert!(matches!(&s, BackendSpec::Rbd(r) if r.snap.as_deref() == Some("snap")));
        assert!("rbd:justimage"
            .parse::<BackendSpec>()
            .unwrap_err()
            .contains("expected rbd:POOL/IMAGE"));
    }

    #[cfg(not(feature = "rbd"))]
    #[test]
    fn rbd_refused_without_the_feature() {
        assert!("rbd:a/b"
            .parse::<BackendSpec>()
            .unwrap_err()
            .contains("no RBD backend"));
    }
}
