//! Fixed-layout big-endian byte codec for APDU data fields. Reading past the end is an
//! error, never a panic.

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("field data ends early or has {0} trailing bytes")]
pub struct LayoutError(pub usize);

#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

pub struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self(bytes)
    }
    pub fn take<const N: usize>(&mut self) -> Result<[u8; N], LayoutError> {
        let (head, rest) = self.0.split_first_chunk::<N>().ok_or(LayoutError(0))?;
        self.0 = rest;
        Ok(*head)
    }
    pub fn u8(&mut self) -> Result<u8, LayoutError> {
        Ok(self.take::<1>()?[0])
    }
    pub fn u16(&mut self) -> Result<u16, LayoutError> {
        Ok(u16::from_be_bytes(self.take()?))
    }
    pub fn u32(&mut self) -> Result<u32, LayoutError> {
        Ok(u32::from_be_bytes(self.take()?))
    }
    pub fn u64(&mut self) -> Result<u64, LayoutError> {
        Ok(u64::from_be_bytes(self.take()?))
    }
    /// The next `n` bytes (a variable-length field whose length came before it).
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], LayoutError> {
        if n > self.0.len() {
            return Err(LayoutError(0));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    /// The bytes not read yet (the last field of a layout: read to the end).
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
    /// Succeeds only if every byte was consumed: a longer field is malformed, not ignored.
    pub fn end(&self) -> Result<(), LayoutError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(LayoutError(self.0.len()))
        }
    }
}
