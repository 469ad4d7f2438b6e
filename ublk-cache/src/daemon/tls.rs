//! TLS on the NBD exports (`tls`, `tls-cert`, `tls-key`, `tls-ca`) into the
//! NBD server's options.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::config::ServeConfig;
use super::error::{DaemonError, DaemonResult};
use crate::frontend::nbd::{NbdOptions, TlsConfig, TlsFiles, TlsPolicy};

/// Whether NBD clients must upgrade to TLS (`NBD_OPT_STARTTLS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// Refuse clients that do not upgrade (the default with a certificate).
    Require,
    /// Let each client choose.
    Optional,
    /// No TLS.
    Off,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Require => "require",
            TlsMode::Optional => "optional",
            TlsMode::Off => "off",
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "require" => Ok(TlsMode::Require),
            "optional" => Ok(TlsMode::Optional),
            "off" => Ok(TlsMode::Off),
            _ => Err(format!(
                "TLS mode {s:?}: expected \"require\", \"optional\" or \"off\""
            )),
        }
    }
}

/// The NBD options for the configured TLS; the credentials are loaded (and
/// checked) here, before any data is touched.
pub fn nbd_options(cfg: &ServeConfig) -> DaemonResult<NbdOptions> {
    let files = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: cfg.tls_ca.clone(),
        }),
        (None, None) => None,
        _ => return Err(DaemonError::config("--tls-cert and --tls-key go together")),
    };
    if files.is_none() && cfg.tls_ca.is_some() {
        return Err(DaemonError::config(
            "--tls-ca checks client certificates, which needs TLS: give --tls-cert and --tls-key",
        ));
    }
    let policy = match (cfg.tls, &files) {
        (Some(TlsMode::Off), Some(_)) => {
            return Err(DaemonError::config(
                "--tls off contradicts --tls-cert: drop one of them",
            ))
        }
        (Some(TlsMode::Off) | None, None) => TlsPolicy::Off,
        (Some(m), None) => {
            return Err(DaemonError::config(format!(
                "--tls {m} needs a certificate: give --tls-cert and --tls-key"
            )))
        }
        (Some(TlsMode::Optional), Some(_)) => TlsPolicy::Optional,
        (Some(TlsMode::Require) | None, Some(_)) => TlsPolicy::Require,
    };
    let tls = files
        .as_ref()
        .map(TlsConfig::load)
        .transpose()
        .map_err(|e| DaemonError::nbd("NBD TLS", e))?;
    Ok(NbdOptions {
        tls,
        tls_policy: policy,
        ..NbdOptions::default()
    })
}
