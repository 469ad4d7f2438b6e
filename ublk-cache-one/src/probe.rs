//! The host/system probe's output: OpenNebula template lines that land in
//! HOST/TEMPLATE, for SCHED_REQUIREMENTS and SCHED_RANK. The names are the
//! feature request's (LC_MAD, LS_MAD, LS_PATH, LS_MAX) plus the space figures.
//! Whatever fails, the probe prints what it can and an LC_ERROR line: a
//! non-zero exit of any probe would put the whole host in error.

use crate::conf::HostConf;
use crate::ops::Host;

/// A template value: numbers bare, strings quoted (quotes and backslashes
/// dropped, as they cannot be escaped in probe output).
fn q(s: &str) -> String {
    format!("\"{}\"", s.replace(['"', '\\', '\n'], " "))
}

pub fn probe_lines(conf: Result<HostConf, String>) -> Vec<String> {
    let mut out = vec![
        format!("LC_MAD={}", q("ublk-cache")),
        format!("LC_VERSION={}", q(env!("CARGO_PKG_VERSION"))),
        format!(
            "LC_UBLK={}",
            q(if std::path::Path::new("/dev/ublk-control").exists() {
                "YES"
            } else {
                "NO"
            })
        ),
    ];
    let conf = match conf {
        Ok(c) => c,
        Err(e) => {
            out.push(format!("LS_MAD={}", q("none")));
            out.push(format!("LC_ERROR={}", q(&e)));
            return out;
        }
    };
    out.push(format!("LS_MAD={}", q(conf.ls_mad.as_str())));
    out.push(format!("LS_PATH={}", q(&conf.ls_path)));
    out.push(format!(
        "LC_EXPORT={}",
        q(match conf.export {
            crate::conf::Export::Ublk => "ublk",
            crate::conf::Export::Nbd => "nbd",
        })
    ));
    let ls_max = conf.ls_max_mb;
    let host = match Host::new(conf) {
        Ok(h) => h,
        Err(e) => {
            out.push(format!("LC_ERROR={}", q(&e.to_string())));
            return out;
        }
    };
    match host.space() {
        Ok((total, used, parked, free)) => {
            let max = if ls_max == 0 {
                total
            } else {
                ls_max.min(total)
            };
            out.push(format!("LS_MAX={max}"));
            out.push(format!("LS_TOTAL_MB={total}"));
            out.push(format!("LS_USED_MB={used}"));
            out.push(format!("LS_PARKED_MB={parked}"));
            out.push(format!("LS_FREE_MB={free}"));
        }
        Err(e) => out.push(format!("LC_ERROR={}", q(&e.to_string()))),
    }
    if let Ok(n) = host.disks() {
        out.push(format!("LC_DISKS={n}"));
    }
    if let Ok(n) = host.stale() {
        out.push(format!("LC_STALE={n}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_config_it_still_answers() {
        let l = probe_lines(Err(
            "config /etc/ublk-cache/one.conf: cannot read \"it\"".into()
        ));
        assert_eq!(l[0], "LC_MAD=\"ublk-cache\"");
        assert!(l.iter().any(|x| x == "LS_MAD=\"none\""));
        let e = l.iter().find(|x| x.starts_with("LC_ERROR=")).unwrap();
        assert_eq!(e.matches('"').count(), 2, "{e}");
    }

    #[test]
    fn figures_for_a_file_store() {
        let d = tempfile::tempdir().unwrap();
        let conf = HostConf::parse(
            std::path::Path::new("/t"),
            &format!(
                "LS_MAD=file\nLS_PATH={}/ls\nSTATE_DIR={}/state\nLS_TOTAL_MAX_MB=100\nLS_MAX=40\n",
                d.path().display(),
                d.path().display()
            ),
        )
        .unwrap();
        std::fs::create_dir_all(d.path().join("ls")).unwrap();
        let l = probe_lines(Ok(conf));
        for want in [
            "LS_MAD=\"file\"",
            "LS_MAX=40",
            "LS_TOTAL_MB=100",
            "LS_USED_MB=0",
            "LS_FREE_MB=100",
            "LC_DISKS=0",
        ] {
            assert!(l.iter().any(|x| x == want), "{want} in {l:?}");
        }
    }
}
