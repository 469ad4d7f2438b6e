//! `tm/ublk_cache/monitor`: the system datastore's space, from `ceph df` of its
//! POOL_NAME, in the three lines oned expects (as `tm/ceph/monitor` prints).

use serde::Deserialize;

use crate::bundle::Bundle;
use crate::cmd::Tool;
use crate::disk::Ceph;
use crate::error::{Error, Result};
use crate::rbd::auth_args;

#[derive(Deserialize)]
struct Df {
    pools: Vec<Pool>,
}

#[derive(Deserialize)]
struct Pool {
    name: String,
    stats: Stats,
}

#[derive(Deserialize)]
struct Stats {
    #[serde(default)]
    stored: u64,
    #[serde(default)]
    bytes_used: u64,
    #[serde(default)]
    max_avail: u64,
    #[serde(default)]
    quota_bytes: u64,
}

/// `USED_MB=`, `TOTAL_MB=`, `FREE_MB=` for `pool` from `ceph df detail --format json`,
/// with ceph's rules: STORED (or BYTES USED before Nautilus) is used, a quota
/// smaller than MAX AVAIL caps the free space.
pub fn df_lines(json: &str, pool: &str) -> Result<String> {
    let df: Df = serde_json::from_str(json)
        .map_err(|e| Error::Server(format!("ceph df: unexpected output ({e})")))?;
    let p = df.pools.iter().find(|p| p.name == pool).ok_or_else(|| {
        Error::Refused(format!(
            "ceph df lists no pool '{pool}' (POOL_NAME of the datastore; {} pools listed)",
            df.pools.len()
        ))
    })?;
    let stored = if p.stats.stored == 0 {
        p.stats.bytes_used
    } else {
        p.stats.stored
    };
    let mut free = p.stats.max_avail;
    if p.stats.quota_bytes != 0 && p.stats.quota_bytes < free {
        free = p.stats.quota_bytes;
    }
    const MIB: u64 = 1 << 20;
    Ok(format!(
        "USED_MB={}\nTOTAL_MB={}\nFREE_MB={}\n",
        stored / MIB,
        (stored + free) / MIB,
        free / MIB
    ))
}

pub fn ds_monitor(
    ceph: &Tool,
    allowed: &[std::path::PathBuf],
    bundle: &Bundle,
    ds: u32,
) -> Result<String> {
    let d = bundle
        .datastore(ds)
        .ok_or_else(|| Error::Xml(format!("no DATASTORE {ds} in the XML")))?;
    let t = &d.template;
    let pool = t.get("POOL_NAME").unwrap_or("one");
    let path = |k: &str| {
        t.get(k)
            .filter(|v| v.starts_with('/'))
            .map(std::path::PathBuf::from)
    };
    let creds = Ceph {
        user: t.get("CEPH_USER").map(str::to_string),
        key: path("CEPH_KEY"),
        conf: path("CEPH_CONF"),
    };
    creds.check_paths(allowed)?;
    let mut a = auth_args(&creds);
    a.extend(["df", "detail", "--format", "json"].map(String::from));
    df_lines(&ceph.run(&a)?, pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_from_ceph_df() {
        let j = r#"{"stats":{},"pools":[{"name":"rbd","id":1,"stats":{"stored":10485760,"bytes_used":20971520,"max_avail":1073741824,"quota_bytes":0}}]}"#;
        assert_eq!(
            df_lines(j, "rbd").unwrap(),
            "USED_MB=10\nTOTAL_MB=1034\nFREE_MB=1024\n"
        );
        let q = j.replace("\"quota_bytes\":0", "\"quota_bytes\":104857600");
        assert_eq!(
            df_lines(&q, "rbd").unwrap(),
            "USED_MB=10\nTOTAL_MB=110\nFREE_MB=100\n"
        );
        let e = df_lines(j, "one").unwrap_err().to_string();
        assert!(e.contains("no pool 'one'"), "{e}");
        assert!(df_lines("{}", "rbd").is_err());
    }
}
