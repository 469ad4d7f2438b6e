//! Backend specifications: `file:PATH`, `dev:/dev/X`, and `rbd:POOL/IMAGE[@SNAP]`
//! (in builds with the `rbd` feature, the default), and export specifications:
//! `ublk`, `nbd:unix:PATH`, `nbd:tcp:[HOST]:PORT`.

use std::fmt;
use std::path::PathBuf;

use crate::frontend::nbd::{ListenSpec, DEFAULT_PORT};
#[cfg(feature = "rbd")]
use rbd_backend::RbdSpec;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    File(PathBuf),
    Dev(PathBuf),
    #[cfg(feature = "rbd")]
    Rbd(RbdSpec),
    /// A backend the caller opened itself (`daemon::Devices`), by its label;
    /// never parsed from a command line or a config file.
    Given(String),
}

impl BackendSpec {
    /// Whether this is an RBD image (the Ceph options apply to it only).
    pub fn is_rbd(&self) -> bool {
        #[cfg(feature = "rbd")]
        if matches!(self, BackendSpec::Rbd(_)) {
            return true;
        }
        false
    }
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendSpec::File(p) => write!(f, "file:{}", p.display()),
            BackendSpec::Dev(p) => write!(f, "dev:{}", p.display()),
            #[cfg(feature = "rbd")]
            BackendSpec::Rbd(r) => write!(f, "rbd:{r}"),
            BackendSpec::Given(label) => write!(f, "given:{label}"),
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

/// Where `serve` makes the disk available.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportSpec {
    /// A `/dev/ublkbN` block device.
    Ublk,
    /// An NBD listener.
    Nbd(ListenSpec),
}

impl fmt::Display for ExportSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExportSpec::Ublk => f.write_str("ublk"),
            ExportSpec::Nbd(ListenSpec::Unix(p)) => write!(f, "nbd:unix:{}", p.display()),
            ExportSpec::Nbd(ListenSpec::Tcp { host, port }) if host.contains(':') => {
                write!(f, "nbd:tcp:[{host}]:{port}")
            }
            ExportSpec::Nbd(ListenSpec::Tcp { host, port }) => write!(f, "nbd:tcp:{host}:{port}"),
        }
    }
}

impl std::str::FromStr for ExportSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = "expected ublk, nbd:unix:PATH or nbd:tcp:[HOST]:PORT";
        if s == "ublk" {
            return Ok(ExportSpec::Ublk);
        }
        if let Some(path) = s.strip_prefix("nbd:unix:") {
            if path.is_empty() {
                return Err(format!("export '{s}': the socket path is empty"));
            }
            return Ok(ExportSpec::Nbd(ListenSpec::Unix(PathBuf::from(path))));
        }
        let Some(addr) = s.strip_prefix("nbd:tcp:") else {
            return Err(format!("export '{s}': {usage}"));
        };
        // HOST may be empty (loopback), a name, an IPv4 address or a bracketed
        // IPv6 address; PORT may be empty (the NBD port, 10809).
        let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
            let (h, p) = rest
                .split_once(']')
                .ok_or_else(|| format!("export '{s}': unclosed '[' in the IPv6 address"))?;
            let p = match p {
                "" => "",
                p => p
                    .strip_prefix(':')
                    .ok_or_else(|| format!("export '{s}': expected ':PORT' after ']'"))?,
            };
            (h, p)
        } else {
            match addr.rsplit_once(':') {
                Some((h, _)) if h.contains(':') => {
                    return Err(format!(
                        "export '{s}': put an IPv6 address in brackets, e.g. nbd:tcp:[::1]:10809"
                    ))
                }
                Some((h, p)) => (h, p),
                None => (addr, ""),
            }
        };
        let port = if port.is_empty() {
            DEFAULT_PORT
        } else {
            port.parse()
                .map_err(|_| format!("export '{s}': bad port '{port}'"))?
        };
        Ok(ExportSpec::Nbd(ListenSpec::Tcp {
            host: host.to_string(),
            port,
        }))
    }
}

/// An octal permission mode such as `0600` or `660`.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let m = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|_| format!("mode '{s}': expected an octal mode such as 0600"))?;
    if m > 0o777 {
        return Err(format!("mode '{s}': only permission bits (at most 0777)"));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_specs() {
        let tcp = |h: &str, port| {
            ExportSpec::Nbd(ListenSpec::Tcp {
                host: h.into(),
                port,
            })
        };
        for (s, want) in [
            ("ublk", ExportSpec::Ublk),
            (
                "nbd:unix:/run/x.sock",
                ExportSpec::Nbd(ListenSpec::Unix("/run/x.sock".into())),
            ),
            ("nbd:tcp::10809", tcp("", 10809)),
            ("nbd:tcp:", tcp("", 10809)),
            ("nbd:tcp:0.0.0.0:99", tcp("0.0.0.0", 99)),
            ("nbd:tcp:localhost", tcp("localhost", 10809)),
            ("nbd:tcp:[::1]:5", tcp("::1", 5)),
            ("nbd:tcp:[::]", tcp("::", 10809)),
        ] {
            assert_eq!(s.parse::<ExportSpec>().unwrap(), want, "{s}");
            // Display gives back something that parses to the same.
            assert_eq!(want.to_string().parse::<ExportSpec>().unwrap(), want);
        }
        for (s, err) in [
            ("nbd:unix:", "empty"),
            ("nbd:tcp::x", "bad port"),
            ("nbd:tcp::70000", "bad port"),
            ("nbd:tcp:::1:5", "brackets"),
            ("nbd:tcp:[::1", "unclosed"),
            ("nbd:tcp:[::1]5", "':PORT'"),
            ("nbd", "expected ublk"),
            ("iscsi:x", "expected ublk"),
        ] {
            let e = s.parse::<ExportSpec>().unwrap_err();
            assert!(e.contains(err), "{s}: {e}");
        }
        assert_eq!(parse_mode("0600").unwrap(), 0o600);
        assert_eq!(parse_mode("660").unwrap(), 0o660);
        assert!(parse_mode("0999").is_err());
        assert!(parse_mode("1777").is_err());
    }

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
