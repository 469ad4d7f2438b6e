//! Links librbd and librados when the `rbd` feature is on, and says clearly what
//! to install when they are missing (instead of a bare linker error).

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CEPH_LIB_DIR");
    if std::env::var_os("CARGO_FEATURE_RBD").is_none() {
        return;
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("CEPH_LIB_DIR") {
        dirs.push(d.into());
    }
    let triple_dir = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => Some("x86_64-linux-gnu"),
        Ok("aarch64") => Some("aarch64-linux-gnu"),
        _ => None,
    };
    for base in ["/usr/lib", "/usr/local/lib"] {
        if let Some(t) = triple_dir {
            dirs.push(Path::new(base).join(t));
        }
        dirs.push(base.into());
    }
    dirs.push("/usr/lib64".into());
    let has = |lib: &str| dirs.iter().any(|d| d.join(format!("lib{lib}.so")).exists());
    let missing: Vec<&str> = ["rbd", "rados"].into_iter().filter(|l| !has(l)).collect();
    if !missing.is_empty() {
        panic!(
            "\n\nThe `rbd` feature (on by default) links librbd and librados, but lib{}.so was not \
             found in {}.\nInstall Debian's librbd-dev and librados-dev (scripts/install-deps.sh does), \
             set CEPH_LIB_DIR to where they are, or build without the RBD backend: \
             cargo build --no-default-features\n\n",
            missing.join(".so and lib"),
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for d in dirs.iter().filter(|d| d.join("librbd.so").exists()).take(1) {
        println!("cargo:rustc-link-search=native={}", d.display());
    }
    println!("cargo:rustc-link-lib=dylib=rbd");
    println!("cargo:rustc-link-lib=dylib=rados");
}
