//! `UBLK_CACHE_IO_ENGINE` forces an engine. Alone in its own test binary because it
//! changes the process environment.

use rbd_backend::{
    open_engine, EngineChoice, EngineKind, ErrorKind, FileBackend, OpenOptions, ENGINE_ENV,
};

#[test]
fn env_var_forces_the_engine() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("dir");
    let path = dir.path().join("env.img");
    std::fs::write(&path, vec![0u8; 65536]).expect("create");

    std::env::set_var(ENGINE_ENV, "sync");
    assert_eq!(
        open_engine(EngineChoice::Auto).expect("sync").kind(),
        EngineKind::Sync
    );
    let b = FileBackend::open(&path, OpenOptions::default()).expect("open");
    assert_eq!(b.engine_kind(), EngineKind::Sync);
    // An explicit choice in code wins over the environment.
    if let Ok(u) = open_engine(EngineChoice::Force(EngineKind::Uring)) {
        assert_eq!(u.kind(), EngineKind::Uring);
    }

    std::env::set_var(ENGINE_ENV, "uring");
    match FileBackend::open(&path, OpenOptions::default()) {
        Ok(b) => assert_eq!(b.engine_kind(), EngineKind::Uring),
        // Forced but impossible: an error, not a silent fallback.
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::Unavailable);
            eprintln!("SKIP: io_uring unavailable: {e}");
        }
    }

    std::env::set_var(ENGINE_ENV, "posix-aio");
    let e = FileBackend::open(&path, OpenOptions::default()).expect_err("bad value");
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert!(e.to_string().contains(ENGINE_ENV), "{e}");

    std::env::remove_var(ENGINE_ENV);
    let b = FileBackend::open(&path, OpenOptions::default()).expect("auto");
    eprintln!("auto picked {}", b.engine_kind());
}
