//! The request vocabulary shared by the frontends, and running one request
//! against an [`AsyncTarget`] with the result as `-errno` for the kernel or the wire.

use rbd_backend::aio::DmaBuf;
use tracing::warn;

use crate::target::{AsyncTarget, TargetError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReqKind {
    Read,
    Write { fua: bool },
    Flush,
    Discard,
    WriteZeroes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Req {
    pub kind: ReqKind,
    pub offset: u64,
    pub len: u64,
}

/// `-errno` for the ublk edge; never 0 or positive for an error.
pub(crate) fn neg_errno(e: &TargetError) -> i32 {
    let n = e.errno();
    if n > 0 && n < 4096 {
        -n
    } else {
        -libc::EIO
    }
}

/// Run one request. READ fills, WRITE takes, the first `req.len` bytes of `buf`.
/// Returns bytes (READ/WRITE) or 0, or `-errno`.
pub(crate) async fn execute<T: AsyncTarget>(target: &T, req: &Req, buf: &DmaBuf) -> i32 {
    let len = req.len as usize;
    let r = match req.kind {
        ReqKind::Read => target
            .read(req.offset, buf.slice(0, len))
            .await
            .map(|_| len as i32),
        ReqKind::Write { fua } => target
            .write(req.offset, buf.slice(0, len), fua)
            .await
            .map(|_| len as i32),
        ReqKind::Flush => target.flush().await.map(|_| 0),
        ReqKind::Discard => target.discard(req.offset, req.len).await.map(|_| 0),
        ReqKind::WriteZeroes => target.write_zeroes(req.offset, req.len).await.map(|_| 0),
    };
    match r {
        Ok(v) => v,
        Err(e) => {
            warn!(?req, "target error: {e}");
            neg_errno(&e)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use rbd_backend::aio::BufSlice;

    use super::*;
    use crate::target::TargetResult;

    /// An in-memory target that logs what it is asked (frontend tests).
    pub(crate) struct Mem {
        pub data: Mutex<Vec<u8>>,
        pub log: Mutex<Vec<String>>,
        pub fail_errno: Option<i32>,
    }

    impl Mem {
        pub fn new(n: usize) -> Self {
            Self {
                data: Mutex::new(vec![0; n]),
                log: Mutex::default(),
                fail_errno: None,
            }
        }

        fn check(&self) -> TargetResult<()> {
            match self.fail_errno {
                Some(n) => Err(TargetError::new(n, "injected")),
                None => Ok(()),
            }
        }
    }

    impl AsyncTarget for Mem {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        async fn read(&self, off: u64, dst: BufSlice) -> TargetResult<()> {
            self.check()?;
            let d = self.data.lock().unwrap();
            // SAFETY: the request owns `dst` while it runs.
            unsafe { dst.request_bytes_mut() }
                .copy_from_slice(&d[off as usize..off as usize + dst.len()]);
            Ok(())
        }
        async fn write(&self, off: u64, src: BufSlice, fua: bool) -> TargetResult<()> {
            self.check()?;
            self.log
                .lock()
                .unwrap()
                .push(format!("write {off} {} fua={fua}", src.len()));
            let mut d = self.data.lock().unwrap();
            // SAFETY: the request owns `src` while it runs.
            d[off as usize..off as usize + src.len()]
                .copy_from_slice(unsafe { src.request_bytes() });
            Ok(())
        }
        async fn flush(&self) -> TargetResult<()> {
            self.check()
        }
        async fn discard(&self, _off: u64, _len: u64) -> TargetResult<()> {
            self.check()
        }
        async fn write_zeroes(&self, off: u64, len: u64) -> TargetResult<()> {
            self.check()?;
            self.data.lock().unwrap()[off as usize..(off + len) as usize].fill(0);
            Ok(())
        }
    }

    fn run(t: &Mem, req: Req, buf: &DmaBuf) -> i32 {
        rbd_backend::aio::block_on(execute(t, &req, buf)).unwrap()
    }

    #[test]
    fn execute_results_and_errno() {
        let t = Mem::new(1 << 16);
        let mut buf = DmaBuf::copy_of(&[7u8; 4096]);
        let w = Req {
            kind: ReqKind::Write { fua: true },
            offset: 4096,
            len: 4096,
        };
        assert_eq!(run(&t, w, &buf), 4096);
        let r = Req {
            kind: ReqKind::Read,
            offset: 4096,
            len: 4096,
        };
        buf.bytes_mut().unwrap().fill(0);
        assert_eq!(run(&t, r, &buf), 4096);
        assert!(buf.bytes().unwrap().iter().all(|&b| b == 7));
        let none = DmaBuf::new(4096);
        assert_eq!(
            run(
                &t,
                Req {
                    kind: ReqKind::Flush,
                    offset: 0,
                    len: 0
                },
                &none
            ),
            0
        );
        assert_eq!(
            run(
                &t,
                Req {
                    kind: ReqKind::Discard,
                    offset: 0,
                    len: 8192
                },
                &none
            ),
            0
        );
        assert_eq!(
            run(
                &t,
                Req {
                    kind: ReqKind::WriteZeroes,
                    offset: 4096,
                    len: 4096
                },
                &none
            ),
            0
        );
        assert_eq!(run(&t, r, &buf), 4096);
        assert!(buf.bytes().unwrap().iter().all(|&b| b == 0));
        assert_eq!(t.log.lock().unwrap()[0], "write 4096 4096 fua=true");
        let small = Req {
            kind: ReqKind::Read,
            offset: 0,
            len: 512,
        };
        for (errno, want) in [
            (libc::ENOSPC, -libc::ENOSPC),
            (0, -libc::EIO),
            (-5, -libc::EIO),
        ] {
            let mut bad = Mem::new(4096);
            bad.fail_errno = Some(errno);
            assert_eq!(run(&bad, small, &buf), want);
        }
    }
}
