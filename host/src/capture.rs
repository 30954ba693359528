//! Bounded output capture: the first half of the cap, a ring of the last half, and a count of
//! everything. Memory never exceeds the cap, whatever the command writes.

/// A capped capture of one stream: head and tail kept, the middle counted.
#[derive(Debug, Clone)]
pub struct HeadTail {
    head_cap: usize,
    tail_cap: usize,
    head: Vec<u8>,
    /// A ring buffer once full: `tail[start..]` then `tail[..start]` are the last bytes in order.
    tail: Vec<u8>,
    start: usize,
    total: u64,
}

impl HeadTail {
    /// A capture keeping at most `cap` bytes: `cap / 2` from the start, the rest from the end.
    pub fn new(cap: usize) -> HeadTail {
        let head_cap = cap / 2;
        HeadTail {
            head_cap,
            tail_cap: cap - head_cap,
            head: Vec::new(),
            tail: Vec::new(),
            start: 0,
            total: 0,
        }
    }

    /// Appends what the stream produced.
    pub fn push(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if self.head.len() < self.head_cap {
            let n = data.len().min(self.head_cap - self.head.len());
            if self.head.capacity() == 0 {
                self.head.reserve_exact(self.head_cap.min(64 << 10).max(n));
            }
            self.head.extend_from_slice(&data[..n]);
            data = &data[n..];
        }
        if data.is_empty() || self.tail_cap == 0 {
            return;
        }
        if data.len() >= self.tail_cap {
            // The chunk alone fills the ring: keep its end.
            self.tail.clear();
            self.tail
                .extend_from_slice(&data[data.len() - self.tail_cap..]);
            self.start = 0;
            return;
        }
        if self.tail.len() < self.tail_cap {
            let n = data.len().min(self.tail_cap - self.tail.len());
            self.tail.extend_from_slice(&data[..n]);
            data = &data[n..];
        }
        // The ring is full: overwrite the oldest bytes.
        while !data.is_empty() {
            let n = data.len().min(self.tail_cap - self.start);
            self.tail[self.start..self.start + n].copy_from_slice(&data[..n]);
            self.start = (self.start + n) % self.tail_cap;
            data = &data[n..];
        }
    }

    /// Everything the stream produced, kept or not.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes dropped between head and tail.
    pub fn omitted(&self) -> u64 {
        self.total - (self.head.len() + self.tail.len()) as u64
    }

    /// Whether bytes were dropped.
    pub fn truncated(&self) -> bool {
        self.omitted() > 0
    }

    /// Bytes held in memory now (head + tail); never more than the cap.
    pub fn held(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    /// The kept bytes in order, without any marker: the whole stream when nothing was dropped.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.held());
        out.extend_from_slice(&self.head);
        out.extend_from_slice(&self.tail[self.start..]);
        out.extend_from_slice(&self.tail[..self.start]);
        out
    }

    /// The capture as text (lossy UTF-8): the whole stream, or, when bytes were dropped,
    /// `head + "\n…[N bytes omitted]…\n" + tail`.
    pub fn render(&self) -> String {
        if !self.truncated() {
            return String::from_utf8_lossy(&self.bytes()).into_owned();
        }
        let mut tail = Vec::with_capacity(self.tail.len());
        tail.extend_from_slice(&self.tail[self.start..]);
        tail.extend_from_slice(&self.tail[..self.start]);
        format!(
            "{}\n…[{} bytes omitted]…\n{}",
            String::from_utf8_lossy(&self.head),
            self.omitted(),
            String::from_utf8_lossy(&tail)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_output_is_kept_whole() {
        let mut c = HeadTail::new(16);
        c.push(b"hello ");
        c.push(b"world");
        assert_eq!(c.render(), "hello world");
        assert!(!c.truncated());
        assert_eq!(c.total(), 11);
        let mut exact = HeadTail::new(4);
        exact.push(b"abcd");
        assert_eq!(exact.render(), "abcd");
        assert!(!exact.truncated());
    }

    #[test]
    fn head_and_tail_survive_any_chunking() {
        let data: Vec<u8> = (0..10_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        for chunk in [1, 3, 7, 10, 11, 64, 9999, 10_000] {
            let mut c = HeadTail::new(21);
            for part in data.chunks(chunk) {
                c.push(part);
                assert!(c.held() <= 21);
            }
            assert_eq!(c.total(), 10_000);
            assert_eq!(c.omitted(), 10_000 - 21);
            let kept = c.bytes();
            assert_eq!(&kept[..10], &data[..10], "chunk {chunk}");
            assert_eq!(&kept[10..], &data[10_000 - 11..], "chunk {chunk}");
            assert_eq!(
                c.render(),
                format!(
                    "{}\n…[9979 bytes omitted]…\n{}",
                    String::from_utf8_lossy(&data[..10]),
                    String::from_utf8_lossy(&data[10_000 - 11..])
                )
            );
        }
    }

    #[test]
    fn a_cap_of_one_keeps_the_last_byte() {
        let mut c = HeadTail::new(1);
        c.push(b"abc");
        c.push(b"d");
        assert_eq!(c.bytes(), b"d");
        assert_eq!(c.omitted(), 3);
    }
}
