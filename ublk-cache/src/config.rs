//! `serve --config FILE`: serve options in a TOML file, for systemd units and
//! drivers that keep one file per disk. Keys are the long option names; a key
//! also given on the command line is taken from the command line.

use std::ffi::OsString;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// The `--config FILE` of a `serve`/`recover` command line, found before
/// clap parses it (the file may supply options clap requires).
pub fn config_path(argv: &[OsString]) -> Option<std::path::PathBuf> {
    let is_serve = argv.iter().skip(1).any(|a| a == "serve" || a == "recover");
    if !is_serve {
        return None;
    }
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        if a == "--config" {
            return it.next().map(std::path::PathBuf::from);
        }
        if let Some(v) = a.to_str().and_then(|s| s.strip_prefix("--config=")) {
            return Some(std::path::PathBuf::from(v));
        }
    }
    None
}

/// The command-line words a config file stands for, leaving out options that
/// `given` (the real command line) already has.
pub fn config_args(path: &Path, given: &[OsString]) -> Result<Vec<OsString>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("config {}: cannot read it", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("config {}: not valid TOML", path.display()))?;
    let on_cli = |key: &str| {
        let flag = format!("--{key}");
        given.iter().any(|a| {
            let a = a.to_string_lossy();
            a == flag || a.starts_with(&format!("{flag}="))
        })
    };
    let mut out = Vec::new();
    for (key, value) in table {
        if key == "config" {
            bail!(
                "config {}: a config file cannot name another (`config` key)",
                path.display()
            );
        }
        if key.starts_with('-') || key.contains('_') || key.is_empty() {
            bail!(
                "config {}: key '{key}' is not an option name; write it as on the command line without \
                 the dashes, e.g. cache-size",
                path.display()
            );
        }
        if on_cli(&key) {
            continue;
        }
        let flag = OsString::from(format!("--{key}"));
        let word = |v: &toml::Value| -> Result<Option<String>> {
            Ok(match v {
                toml::Value::String(s) => Some(s.clone()),
                toml::Value::Integer(i) => Some(i.to_string()),
                toml::Value::Float(f) => Some(f.to_string()),
                toml::Value::Boolean(_) => None,
                other => bail!(
                    "config {}: key '{key}' has a {} value; use a string, number or boolean",
                    path.display(),
                    other.type_str()
                ),
            })
        };
        match &value {
            toml::Value::Boolean(true) => out.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                for v in items {
                    match word(v)? {
                        Some(w) => {
                            out.push(flag.clone());
                            out.push(w.into());
                        }
                        None => bail!(
                            "config {}: key '{key}': a list of booleans means nothing",
                            path.display()
                        ),
                    }
                }
            }
            v => {
                if let Some(w) = word(v)? {
                    out.push(flag);
                    out.push(w.into());
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args_of(text: &str, given: &[&str]) -> Result<Vec<String>> {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        let given: Vec<OsString> = given.iter().map(OsString::from).collect();
        Ok(config_args(f.path(), &given)?
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect())
    }

    #[test]
    fn keys_become_options_and_the_command_line_wins() {
        let a = args_of(
            "backend = \"file:/b\"\ncache-size = \"1G\"\nexport = [\"ublk\", \"nbd:unix:/s\"]\nformat = true\nwait = false\ndepth = 64\n",
            &["serve", "--cache-size=2G"],
        )
        .unwrap();
        assert_eq!(
            a,
            [
                "--backend",
                "file:/b",
                "--depth",
                "64",
                "--export",
                "ublk",
                "--export",
                "nbd:unix:/s",
                "--format"
            ]
        );
    }

    #[test]
    fn the_config_path_is_found_before_parsing() {
        let v = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            config_path(&v(&["ublk-cache", "serve", "--config", "/etc/x.toml"])),
            Some("/etc/x.toml".into())
        );
        assert_eq!(
            config_path(&v(&["ublk-cache", "recover", "3", "--config=/c"])),
            Some("/c".into())
        );
        assert_eq!(config_path(&v(&["ublk-cache", "list", "--json"])), None);
        assert_eq!(
            config_path(&v(&["ublk-cache", "serve", "--backend", "file:/b"])),
            None
        );
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let e = args_of("backend = [1, [2]]", &[]).unwrap_err().to_string();
        assert!(e.contains("'backend'"), "{e}");
        let e = args_of("cache_size = \"1G\"", &[]).unwrap_err().to_string();
        assert!(e.contains("cache-size"), "{e}");
        let e = args_of("this is not toml", &[]).unwrap_err();
        assert!(format!("{e:#}").contains("TOML"), "{e:#}");
        let e = args_of("[ceph]\nid = 1", &[]).unwrap_err().to_string();
        assert!(e.contains("table"), "{e}");
    }
}

#[cfg(all(test, feature = "rbd"))]
mod example_tests {
    use clap::Parser;

    use crate::cli::{Cli, Command};

    /// The example shipped for the systemd unit must stay valid.
    #[test]
    fn the_shipped_example_config_parses() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            f.path(),
            include_str!("../../contrib/systemd/ublk-cache.toml.example"),
        )
        .unwrap();
        let given: Vec<std::ffi::OsString> = vec!["ublk-cache".into(), "serve".into()];
        let mut argv = given.clone();
        argv.extend(super::config_args(f.path(), &given).unwrap());
        let cli = Cli::try_parse_from(&argv).unwrap();
        let Command::Serve(a) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(a.id, Some(42));
        assert_eq!(a.preload, Some(512 << 20));
        assert_eq!(a.mode, policies::CacheMode::Back);
        assert_eq!(a.metrics.as_deref(), Some("127.0.0.1:9842"));
    }
}
