//! `--tls`, `--tls-cert`, `--tls-key`, `--tls-ca` into the NBD server's options.

use anyhow::{bail, Result};
use ublk_cache::frontend::nbd::{NbdOptions, TlsConfig, TlsFiles, TlsPolicy};

use crate::cli::{TlsArgs, TlsMode};

/// The NBD options for these TLS arguments; the credentials are loaded (and
/// checked) here, before any data is touched.
pub fn nbd_options(args: &TlsArgs) -> Result<NbdOptions> {
    let files = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: args.tls_ca.clone(),
        }),
        (None, None) => None,
        _ => bail!("--tls-cert and --tls-key go together"),
    };
    let policy = match (args.tls, &files) {
        (Some(TlsMode::Off), Some(_)) => {
            bail!("--tls off contradicts --tls-cert: drop one of them")
        }
        (Some(TlsMode::Off) | None, None) => TlsPolicy::Off,
        (Some(m), None) => bail!(
            "--tls {} needs a certificate: give --tls-cert and --tls-key",
            if m == TlsMode::Require {
                "require"
            } else {
                "optional"
            }
        ),
        (Some(TlsMode::Optional), Some(_)) => TlsPolicy::Optional,
        (Some(TlsMode::Require) | None, Some(_)) => TlsPolicy::Require,
    };
    let tls = files.as_ref().map(TlsConfig::load).transpose()?;
    Ok(NbdOptions {
        tls,
        tls_policy: policy,
        ..NbdOptions::default()
    })
}
