//! Bounds-checked little-endian encoding for on-disk structures. The decoder never
//! panics: every read past the end is a [`FormatError::Truncated`].

use super::FormatError;

pub struct Encoder<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Encoder<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub fn bytes(&mut self, b: &[u8]) {
        // Encoders only ever write fixed layouts that fit by construction; a
        // failure here is a programming error caught by the format tests.
        self.buf[self.pos..self.pos + b.len()].copy_from_slice(b);
        self.pos += b.len();
    }

    pub fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes())
    }

    pub fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes())
    }

    pub fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes())
    }

    /// A string in a fixed field of `cap` bytes: u16 length then the bytes, zero padded.
    pub fn fixed_str(&mut self, s: &str, cap: usize) {
        let b = s.as_bytes();
        let n = b.len().min(cap - 2);
        self.u16(n as u16);
        self.bytes(&b[..n]);
        self.pos += cap - 2 - n;
    }

    pub fn pos(&self) -> usize {
        self.pos
    }
}

pub struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let end = self.pos.checked_add(n).ok_or(FormatError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(FormatError::Truncated)?;
        self.pos = end;
        Ok(s)
    }

    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn u16(&mut self) -> Result<u16, FormatError> {
        let b = self.bytes(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Result<u32, FormatError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.bytes(4)?);
        Ok(u32::from_le_bytes(a))
    }

    pub fn u64(&mut self) -> Result<u64, FormatError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.bytes(8)?);
        Ok(u64::from_le_bytes(a))
    }

    pub fn fixed_str(&mut self, cap: usize, field: &'static str) -> Result<String, FormatError> {
        let n = self.u16()? as usize;
        if n > cap - 2 {
            return Err(FormatError::Field {
                field,
                problem: format!("length {n} exceeds its {cap}-byte field"),
            });
        }
        let b = self.bytes(cap - 2)?;
        String::from_utf8(b[..n].to_vec()).map_err(|_| FormatError::Field {
            field,
            problem: "not UTF-8".into(),
        })
    }
}
