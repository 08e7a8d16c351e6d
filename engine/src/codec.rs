//! Little-endian field writer/reader over fixed record buffers. Out-of-range
//! writes are dropped and reads past the end give zeros: the layouts are
//! constant, so that never happens, and if it did it must not panic.

use crate::sketch::{DistinctWindow, WideDistinct, DISTINCT_BYTES};
use crate::window::{SlidingWindow, WINDOW_BYTES};

pub struct Writer<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl<'a> Writer<'a> {
    pub fn new(buf: &'a mut [u8]) -> Writer<'a> {
        Writer { buf, at: 0 }
    }

    pub fn bytes(&mut self, bytes: &[u8]) {
        let end = self.at.saturating_add(bytes.len());
        if let Some(dst) = self.buf.get_mut(self.at..end) {
            dst.copy_from_slice(bytes);
        }
        self.at = end;
    }

    pub fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }

    pub fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }

    pub fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }

    pub fn f32(&mut self, v: f32) {
        self.bytes(&v.to_le_bytes());
    }

    pub fn window(&mut self, w: &SlidingWindow) {
        let mut buf = [0u8; WINDOW_BYTES];
        w.encode(&mut buf);
        self.bytes(&buf);
    }

    pub fn distinct(&mut self, d: &DistinctWindow) {
        self.bytes(&d.encode());
    }

    pub fn wide_distinct(&mut self, d: &WideDistinct) {
        self.u64(d.start_ms);
        for w in d.current.iter().chain(d.previous.iter()) {
            self.u64(*w);
        }
    }
}

pub struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, at: 0 }
    }

    pub fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let end = self.at.saturating_add(N);
        let available = self.buf.get(self.at..end.min(self.buf.len())).unwrap_or(&[]);
        for (dst, src) in out.iter_mut().zip(available) {
            *dst = *src;
        }
        self.at = end;
        out
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }

    pub fn f32(&mut self) -> f32 {
        f32::from_le_bytes(self.take())
    }

    pub fn window(&mut self) -> SlidingWindow {
        SlidingWindow::decode(&self.take::<WINDOW_BYTES>())
    }

    pub fn distinct(&mut self) -> DistinctWindow {
        DistinctWindow::decode(&self.take::<DISTINCT_BYTES>())
    }

    pub fn wide_distinct(&mut self) -> WideDistinct {
        let mut d = WideDistinct { start_ms: self.u64(), ..WideDistinct::default() };
        for w in d.current.iter_mut() {
            *w = self.u64();
        }
        for w in d.previous.iter_mut() {
            *w = self.u64();
        }
        d
    }
}
