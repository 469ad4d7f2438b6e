//! Lines for oned. On stderr, `INFO:`/`WARN:`/`ERROR:` lines go to the VM log
//! (`one_tm`'s `get_info_from_execution`), every other line becomes the
//! action's error message; so the helper prints progress with a prefix and at
//! most one plain line: the error, at the end.

pub fn info(msg: &str) {
    eprintln!("INFO: ublk_cache: {msg}");
}

pub fn warn(msg: &str) {
    eprintln!("WARN: ublk_cache: {msg}");
}
