//! Backend specifications: `file:PATH`, `dev:/dev/X` (and `rbd:POOL/IMAGE` once the
//! RBD backend is built in).

use std::fmt;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    File(PathBuf),
    Dev(PathBuf),
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendSpec::File(p) => write!(f, "file:{}", p.display()),
            BackendSpec::Dev(p) => write!(f, "dev:{}", p.display()),
        }
    }
}

impl std::str::FromStr for BackendSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, rest) = s
            .split_once(':')
            .ok_or_else(|| format!("backend '{s}': expected file:PATH or dev:/dev/X"))?;
        if rest.is_empty() {
            return Err(format!("backend '{s}': the path is empty"));
        }
        match kind {
            "file" => Ok(BackendSpec::File(PathBuf::from(rest))),
            "dev" => Ok(BackendSpec::Dev(PathBuf::from(rest))),
            "rbd" => Err(format!(
                "backend '{s}': this build has no RBD backend (librbd support is not built in)"
            )),
            other => Err(format!(
                "backend '{s}': unknown kind '{other}' (expected file or dev)"
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
}
