//! The generator of the framing tests' cases: a deterministic random source, LEB128 encodings
//! canonical, padded and broken, sections of every kind, whole modules, and broken framing.

use super::*;

/// xorshift64* : small, deterministic, good enough to generate test cases.
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    pub(super) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `0..n` (`n > 0`).
    pub(super) fn below(&mut self, n: usize) -> usize {
        ((self.next() >> 32) as usize) % n
    }

    /// True with probability `num / den`.
    pub(super) fn chance(&mut self, num: usize, den: usize) -> bool {
        self.below(den) < num
    }

    pub(super) fn byte(&mut self) -> u8 {
        (self.next() >> 56) as u8
    }

    pub(super) fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }

    /// A length: mostly small, sometimes past 127 (two-byte LEB128), rarely past 16383.
    pub(super) fn len(&mut self) -> usize {
        match self.below(20) {
            0 => 128 + self.below(300),
            1 if self.chance(1, 10) => 16_384 + self.below(100),
            _ => self.below(40),
        }
    }

    pub(super) fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Bytes needed by the minimal LEB128 encoding of `v`.
pub(super) fn leb_min_len(v: u32) -> usize {
    let mut n = 1;
    while n < 5 && v >> (7 * n) != 0 {
        n += 1;
    }
    n
}

/// `v` as unsigned LEB128 in exactly `len` bytes (`leb_min_len(v) <= len <= 5`): padded with
/// continuation bits, a valid (non-canonical) encoding of a wasm `u32`.
pub(super) fn leb_padded(v: u32, len: usize) -> Vec<u8> {
    assert!((leb_min_len(v)..=5).contains(&len));
    (0..len)
        .map(|i| {
            let b = ((u64::from(v) >> (7 * i)) & 0x7f) as u8;
            if i + 1 < len {
                b | 0x80
            } else {
                b
            }
        })
        .collect()
}

/// `v` as LEB128: minimal half of the time, otherwise padded to a random valid length.
pub(super) fn leb(rng: &mut Rng, v: u32) -> Vec<u8> {
    let min = leb_min_len(v);
    let len = if rng.chance(1, 2) {
        min
    } else {
        min + rng.below(6 - min)
    };
    leb_padded(v, len)
}

/// An encoding of `v` that is *not* a valid wasm `u32`: either longer than 5 bytes (the
/// fifth byte has its continuation bit set) or with a fifth byte whose unused high bits are
/// not zero.
pub(super) fn bad_leb(rng: &mut Rng, v: u32) -> Vec<u8> {
    let mut out = leb_padded(v, 5);
    if rng.chance(1, 2) {
        out[4] |= 0x80;
        for _ in 0..rng.below(4) {
            out.push(0x80 | rng.byte());
        }
        out.push(rng.byte() & 0x7f);
    } else {
        out[4] |= (1 + rng.below(7) as u8) << 4;
    }
    out
}

pub(super) const SIG: &str = SIGNATURE_SECTION_NAME;

/// Custom section names: the signature's, near misses, other common ones.
pub(super) const NAMES: &[&str] = &[
    SIG,
    SIG,
    SIG,
    "bridge.signaturE",
    "bridge.signature\0",
    "\0bridge.signature",
    "bridge.signatur",
    "bridge.signaturee",
    "bridge.signature ",
    " bridge.signature",
    "Bridge.signature",
    "bridge-signature",
    "bridge.signature.v1",
    "bridge.signaturé",
    "",
    "name",
    "producers",
    "target_features",
    "é€😀",
];

pub(super) fn custom_name(rng: &mut Rng) -> Vec<u8> {
    if rng.chance(1, 5) {
        // Random printable ASCII.
        let n = rng.below(20);
        (0..n).map(|_| 0x20 + rng.below(0x5f) as u8).collect()
    } else {
        rng.pick(NAMES).as_bytes().to_vec()
    }
}

/// A complete section: id, size (as generated LEB128), contents.
pub(super) fn section(rng: &mut Rng, id: u8, contents: &[u8]) -> Vec<u8> {
    let mut out = vec![id];
    out.extend(leb(rng, contents.len() as u32));
    out.extend_from_slice(contents);
    out
}

pub(super) fn custom_section(rng: &mut Rng) -> Vec<u8> {
    let name = custom_name(rng);
    let mut contents = leb(rng, name.len() as u32);
    contents.extend(&name);
    let n = rng.len();
    contents.extend(rng.bytes(n));
    section(rng, 0, &contents)
}

/// Contents for a vector section that `wasmparser::Parser` accepts: the item count (it reads
/// only that up front), then random bytes.
pub(super) fn vector_contents(rng: &mut Rng, count: u32) -> Vec<u8> {
    let mut c = leb(rng, count);
    let n = rng.len();
    c.extend(rng.bytes(n));
    c
}

/// The known non-custom section ids, in the order a module must have them.
pub(super) const ORDERED_IDS: &[u8] = &[1, 2, 3, 4, 5, 13, 6, 7, 8, 9, 12, 10, 11];

/// A module's sections as `wasmparser::Parser` accepts them: known ids in order, at most once
/// each, the function and code sections (and the data count and data sections) with matching
/// counts, custom sections anywhere.
pub(super) fn generate_sections(rng: &mut Rng) -> Vec<Vec<u8>> {
    let funcs = rng.below(4) as u32;
    let datas = rng.below(4) as u32;
    let with_code = rng.chance(1, 2);
    let with_data_count = rng.chance(1, 3);
    let with_data = with_data_count || rng.chance(1, 2);
    let mut known = Vec::new();
    for &id in ORDERED_IDS {
        let contents = match id {
            3 | 10 if !with_code => continue,
            12 if !with_data_count => continue,
            11 if !with_data => continue,
            3 => vector_contents(rng, funcs),
            10 => {
                let mut c = leb(rng, funcs);
                for _ in 0..funcs {
                    let n = rng.below(30);
                    c.extend(leb(rng, n as u32));
                    c.extend(rng.bytes(n));
                }
                c
            }
            12 => leb(rng, datas),
            11 => vector_contents(rng, datas),
            8 => {
                let f = rng.next() as u32 >> rng.below(32);
                leb(rng, f)
            }
            _ if rng.chance(1, 2) => continue,
            _ => {
                let count = rng.next() as u32 >> rng.below(32);
                vector_contents(rng, count)
            }
        };
        known.push(section(rng, id, &contents));
    }
    let mut out = Vec::new();
    for s in known {
        while rng.chance(1, 4) {
            out.push(custom_section(rng));
        }
        out.push(s);
    }
    while rng.chance(1, 3) {
        out.push(custom_section(rng));
    }
    out
}

pub(super) fn assemble(sections: &[Vec<u8>]) -> Vec<u8> {
    let mut m = WASM_HEADER.to_vec();
    for s in sections {
        m.extend(s);
    }
    m
}

/// Byte strings that make any string they are inserted into invalid UTF-8: bytes that never
/// occur, a lone continuation byte, a lone lead byte, a surrogate, a code point past U+10FFFF,
/// an overlong encoding.
pub(super) const BAD_UTF8: &[&[u8]] = &[
    &[0xff],
    &[0x80],
    &[0xc3],
    &[0xed, 0xa0, 0x80],
    &[0xf4, 0x90, 0x80, 0x80],
    &[0xc0, 0xaf],
];

/// Replaces (or appends) a section with one whose framing is broken, in one of several ways.
/// Returns the new sections; the module they make is invalid.
pub(super) fn break_framing(rng: &mut Rng, mut sections: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let i = rng.below(sections.len() + 1);
    let after: usize = sections
        .get(i + 1..)
        .unwrap_or(&[])
        .iter()
        .map(Vec::len)
        .sum();
    let id = if rng.chance(1, 2) {
        0
    } else {
        *rng.pick(ORDERED_IDS)
    };
    let n = rng.len();
    let body = rng.bytes(n);
    let broken = match rng.below(7) {
        // Size over 5 bytes, or with bits beyond 32.
        0 => {
            let mut s = vec![id];
            s.extend(bad_leb(rng, body.len() as u32));
            s.extend(&body);
            s
        }
        // Size running past the end of the module.
        1 => {
            let size = (body.len() + after + 1 + rng.below(3)) as u32;
            let size = if rng.chance(1, 8) { u32::MAX } else { size };
            let mut s = vec![id];
            s.extend(leb(rng, size));
            s.extend(&body);
            s
        }
        // Module ends inside the size (the id byte alone, or some continuation bytes).
        2 => {
            sections.truncate(i);
            let mut s = vec![id];
            for _ in 0..rng.below(5) {
                s.push(0x80 | rng.byte());
            }
            sections.push(s);
            return sections;
        }
        // Custom section whose name length runs past the end of the section.
        3 => {
            let name = custom_name(rng);
            let extra = 1 + rng.below(3);
            let mut c = leb(rng, (name.len() + extra) as u32);
            c.extend(&name);
            c.truncate(c.len() - rng.below(name.len() + 1));
            section(rng, 0, &c)
        }
        // Custom section too short to hold a name length: empty, or a cut-off LEB128.
        4 => {
            let mut c = Vec::new();
            for _ in 0..rng.below(5) {
                c.push(0x80 | rng.byte());
            }
            section(rng, 0, &c)
        }
        // Custom section whose name length is over 5 bytes or has bits beyond 32.
        5 => {
            let mut c = bad_leb(rng, 3);
            c.extend(b"abc");
            section(rng, 0, &c)
        }
        // Custom section whose name is not UTF-8.
        _ => {
            let mut name = rng.pick(NAMES).as_bytes().to_vec();
            let bad = *rng.pick(BAD_UTF8);
            let at = rng.below(name.len() + 1);
            name.splice(at..at, bad.iter().copied());
            let mut c = leb(rng, name.len() as u32);
            c.extend(&name);
            c.extend(&body);
            section(rng, 0, &c)
        }
    };
    if i < sections.len() {
        sections[i] = broken;
    } else {
        sections.push(broken);
    }
    sections
}
