//! A minimal blocking NBD client for tests: fixed newstyle handshake with
//! NBD_OPT_GO, simple replies, one request at a time (or pipelined by hand with
//! `send`/`recv`). Written from the protocol document independently of the
//! server's code (its own constants), so the two check each other.
//!
//! Used by the library's unit tests and the integration tests. Do not build it
//! on the server's `proto` module: its independence is the point.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub const READ: u16 = 0;
pub const WRITE: u16 = 1;
pub const DISC: u16 = 2;
pub const FLUSH: u16 = 3;
pub const TRIM: u16 = 4;
pub const WRITE_ZEROES: u16 = 6;
pub const FLAG_FUA: u16 = 1;
pub const FLAG_NO_HOLE: u16 = 2;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

pub trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

pub struct Client {
    s: Box<dyn Conn>,
    pub size: u64,
    pub flags: u16,
    /// (minimum, preferred, maximum) from NBD_INFO_BLOCK_SIZE.
    pub block_size: Option<(u32, u32, u32)>,
    next_handle: u64,
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes(b[i..i + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_be_bytes(b[i..i + 8].try_into().unwrap())
}

impl Client {
    pub fn connect_unix(path: &Path) -> io::Result<Self> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        Self::handshake(Box::new(s))
    }

    pub fn connect_tcp(addr: &str) -> io::Result<Self> {
        let s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        Self::handshake(Box::new(s))
    }

    /// `nbd+unix:///?socket=PATH` or `nbd://HOST:PORT/`.
    pub fn connect_uri(uri: &str) -> io::Result<Self> {
        if let Some(p) = uri.strip_prefix("nbd+unix:///?socket=") {
            return Self::connect_unix(Path::new(&unescape(p)));
        }
        if let Some(rest) = uri.strip_prefix("nbd://") {
            return Self::connect_tcp(rest.trim_end_matches('/'));
        }
        Err(bad(format!("unsupported URI {uri}")))
    }

    /// Fixed newstyle: client flags FIXED_NEWSTYLE|NO_ZEROES, then NBD_OPT_GO for
    /// the default export asking for NBD_INFO_BLOCK_SIZE.
    pub fn handshake(mut s: Box<dyn Conn>) -> io::Result<Self> {
        let mut g = [0u8; 18];
        s.read_exact(&mut g)?;
        if &g[..8] != b"NBDMAGIC" || &g[8..16] != b"IHAVEOPT" {
            return Err(bad(format!("bad greeting {g:02x?}")));
        }
        if u16_at(&g, 16) & 1 == 0 {
            return Err(bad("server is not fixed newstyle".into()));
        }
        s.write_all(&3u32.to_be_bytes())?;
        let mut opt = b"IHAVEOPT".to_vec();
        opt.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
        opt.extend_from_slice(&8u32.to_be_bytes()); // data length
        opt.extend_from_slice(&0u32.to_be_bytes()); // name length
        opt.extend_from_slice(&1u16.to_be_bytes()); // one info request
        opt.extend_from_slice(&3u16.to_be_bytes()); // NBD_INFO_BLOCK_SIZE
        s.write_all(&opt)?;
        let (mut size, mut flags, mut block_size) = (None, 0, None);
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h)?;
            if u64_at(&h, 0) != 0x0003_e889_0455_65a9 || u32_at(&h, 8) != 7 {
                return Err(bad(format!("bad option reply {h:02x?}")));
            }
            let kind = u32_at(&h, 12);
            let mut data = vec![0u8; u32_at(&h, 16) as usize];
            s.read_exact(&mut data)?;
            match kind {
                1 => break, // NBD_REP_ACK
                3 if data.len() >= 2 => match u16_at(&data, 0) {
                    0 if data.len() == 12 => {
                        size = Some(u64_at(&data, 2));
                        flags = u16_at(&data, 10);
                    }
                    3 if data.len() == 14 => {
                        block_size = Some((u32_at(&data, 2), u32_at(&data, 6), u32_at(&data, 10)))
                    }
                    _ => {}
                },
                k => {
                    return Err(bad(format!(
                        "NBD_OPT_GO failed: reply {k:#x} {}",
                        String::from_utf8_lossy(&data)
                    )))
                }
            }
        }
        let size = size.ok_or_else(|| bad("no NBD_INFO_EXPORT before ACK".into()))?;
        Ok(Self {
            s,
            size,
            flags,
            block_size,
            next_handle: 1,
        })
    }

    /// Send one request (and its data); returns its handle.
    pub fn send(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> io::Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut b = Vec::with_capacity(28 + data.len());
        b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b)?;
        Ok(handle)
    }

    /// Receive one simple reply: (handle, error). `read_len` says how many data
    /// bytes follow a successful reply to the handle (the caller knows).
    pub fn recv(&mut self, read_len: impl Fn(u64) -> usize) -> io::Result<(u64, u32, Vec<u8>)> {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        if u32_at(&h, 0) != 0x6744_6698 {
            return Err(bad(format!("bad reply magic {h:02x?}")));
        }
        let (error, handle) = (u32_at(&h, 4), u64_at(&h, 8));
        let mut data = Vec::new();
        if error == 0 {
            data = vec![0u8; read_len(handle)];
            self.s.read_exact(&mut data)?;
        }
        Ok((handle, error, data))
    }

    fn call(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> io::Result<Result<Vec<u8>, u32>> {
        let h = self.send(kind, flags, offset, len, data)?;
        let want = if kind == READ { len as usize } else { 0 };
        let (rh, error, data) = self.recv(|_| want)?;
        if rh != h {
            return Err(bad(format!("reply for handle {rh}, expected {h}")));
        }
        Ok(if error == 0 { Ok(data) } else { Err(error) })
    }

    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Result<Vec<u8>, u32>> {
        self.call(READ, 0, offset, len, &[])
    }

    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<Result<(), u32>> {
        let f = if fua { FLAG_FUA } else { 0 };
        Ok(self
            .call(WRITE, f, offset, data.len() as u32, data)?
            .map(|_| ()))
    }

    pub fn flush(&mut self) -> io::Result<Result<(), u32>> {
        Ok(self.call(FLUSH, 0, 0, 0, &[])?.map(|_| ()))
    }

    pub fn trim(&mut self, offset: u64, len: u32) -> io::Result<Result<(), u32>> {
        Ok(self.call(TRIM, 0, offset, len, &[])?.map(|_| ()))
    }

    pub fn write_zeroes(
        &mut self,
        offset: u64,
        len: u32,
        flags: u16,
    ) -> io::Result<Result<(), u32>> {
        Ok(self
            .call(WRITE_ZEROES, flags, offset, len, &[])?
            .map(|_| ()))
    }

    /// Any request, e.g. an unknown command; returns the error code.
    pub fn raw(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> io::Result<u32> {
        Ok(match self.call(kind, flags, offset, len, data)? {
            Ok(_) => 0,
            Err(e) => e,
        })
    }

    /// Write `data` at `offset` in 256 KiB requests; any error fails the test.
    pub fn write_all(&mut self, offset: u64, data: &[u8]) {
        for (i, chunk) in data.chunks(256 * 1024).enumerate() {
            let at = offset + (i * 256 * 1024) as u64;
            self.write(at, chunk, false)
                .unwrap_or_else(|e| panic!("write at {at}: {e}"))
                .unwrap_or_else(|e| panic!("write at {at}: NBD error {e}"));
        }
    }

    /// Read `len` bytes at `offset` in 256 KiB requests; any error fails the test.
    pub fn read_all(&mut self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let at = offset + out.len() as u64;
            let n = (len - out.len()).min(256 * 1024);
            out.extend(
                self.read(at, n as u32)
                    .unwrap_or_else(|e| panic!("read at {at}: {e}"))
                    .unwrap_or_else(|e| panic!("read at {at}: NBD error {e}")),
            );
        }
        out
    }

    /// NBD_CMD_DISC, then wait for the server to close.
    pub fn disconnect(mut self) -> io::Result<()> {
        self.send(DISC, 0, 0, 0, &[])?;
        let mut rest = Vec::new();
        self.s.read_to_end(&mut rest)?;
        if !rest.is_empty() {
            return Err(bad(format!("{} unexpected bytes after DISC", rest.len())));
        }
        Ok(())
    }
}

/// Undo %XX escapes.
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
