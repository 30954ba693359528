//! Walking the top-level section structure of a wasm module, finding and removing the
//! `bridge.signature` custom sections, and appending a new one.
//!
//! Only the *framing* is checked here (header, section ids and sizes, custom section names);
//! whether the module's contents are valid wasm is for the runtime (wasmtime) to decide when
//! it compiles the module.

use std::borrow::Cow;
use std::ops::Range;

use sha2::{Digest, Sha256};

/// The name of the custom section that carries a signature envelope.
pub const SIGNATURE_SECTION_NAME: &str = "bridge.signature";

/// The 8-byte header every core wasm module starts with: `\0asm` then version 1 (u32 LE).
pub const WASM_HEADER: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00];

/// The module's section structure is broken (or it is not a core wasm module at all).
///
/// This is *not* a signature problem: an agent reports it as `invalid_module`, whatever the
/// module's signature might have said.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid wasm module: {reason} (at byte {offset})")]
pub struct InvalidModule {
    /// Byte offset in the module where the problem was found.
    pub offset: usize,
    /// What is wrong, in words.
    pub reason: String,
}

impl InvalidModule {
    fn new(offset: usize, reason: impl Into<String>) -> Self {
        InvalidModule {
            offset,
            reason: reason.into(),
        }
    }
}

/// One top-level section of a module, as the walker framed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Section<'a> {
    /// The section id byte (not interpreted, except that 0 is a custom section).
    pub(crate) id: u8,
    /// The whole section: id byte through end of contents.
    pub(crate) range: Range<usize>,
    /// The contents: the `size` bytes after the size LEB128.
    pub(crate) contents: Range<usize>,
    /// For a custom section: its name and where its data (the contents after the name) is.
    pub(crate) custom: Option<(&'a str, Range<usize>)>,
}

/// The walker over a module's top-level sections: yields each section in order, or an error
/// where the framing breaks (after which it yields nothing more).
#[derive(Debug, Clone)]
pub(crate) struct Sections<'a> {
    bytes: &'a [u8],
    pos: usize,
    failed: bool,
}

impl<'a> Sections<'a> {
    /// Checks the header and starts walking after it.
    pub(crate) fn new(bytes: &'a [u8]) -> Result<Self, InvalidModule> {
        if bytes.len() < 8 || bytes[0..4] != WASM_HEADER[0..4] {
            return Err(InvalidModule::new(0, "missing the \\0asm magic number"));
        }
        if bytes[4..8] != WASM_HEADER[4..8] {
            return Err(InvalidModule::new(
                4,
                format!(
                    "unsupported wasm version {:02x?} (only core modules, version 1, are accepted)",
                    &bytes[4..8]
                ),
            ));
        }
        Ok(Sections {
            bytes,
            pos: 8,
            failed: false,
        })
    }

    fn section_at(&self, start: usize) -> Result<Section<'a>, InvalidModule> {
        let bytes = self.bytes;
        let mut pos = start;
        let id = bytes[pos];
        pos += 1;
        let size = read_u32_leb(bytes, &mut pos)
            .map_err(|r| InvalidModule::new(pos, format!("section size: {r}")))?;
        let contents_start = pos;
        let end = contents_start
            .checked_add(size as usize)
            .filter(|&end| end <= bytes.len())
            .ok_or_else(|| {
                InvalidModule::new(
                    start,
                    format!(
                        "section (id {id}) of {size} bytes runs past the end of the module ({} bytes)",
                        bytes.len()
                    ),
                )
            })?;
        let mut custom = None;
        if id == 0 {
            let contents = &bytes[contents_start..end];
            let mut p = 0;
            let name_len = read_u32_leb(contents, &mut p).map_err(|r| {
                InvalidModule::new(contents_start + p, format!("custom section name: {r}"))
            })? as usize;
            let name_end = p
                .checked_add(name_len)
                .filter(|&e| e <= contents.len())
                .ok_or_else(|| {
                    InvalidModule::new(
                        contents_start,
                        "custom section name runs past the end of its section",
                    )
                })?;
            let name = std::str::from_utf8(&contents[p..name_end]).map_err(|_| {
                InvalidModule::new(contents_start + p, "custom section name is not UTF-8")
            })?;
            custom = Some((name, contents_start + name_end..end));
        }
        Ok(Section {
            id,
            range: start..end,
            contents: contents_start..end,
            custom,
        })
    }
}

impl<'a> Iterator for Sections<'a> {
    type Item = Result<Section<'a>, InvalidModule>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.bytes.len() {
            return None;
        }
        let section = self.section_at(self.pos);
        match &section {
            Ok(s) => self.pos = s.range.end,
            Err(_) => self.failed = true,
        }
        Some(section)
    }
}

/// The result of walking a module: where its signature sections are.
#[derive(Debug)]
pub(crate) struct ModuleLayout<'a> {
    bytes: &'a [u8],
    /// Byte ranges of each whole `bridge.signature` section (id byte through end of payload).
    signature_sections: Vec<Range<usize>>,
    /// Byte ranges of each of those sections' payloads (the envelopes).
    signature_payloads: Vec<Range<usize>>,
}

impl<'a> ModuleLayout<'a> {
    /// Walks `bytes`' top-level sections.
    pub(crate) fn parse(bytes: &'a [u8]) -> Result<Self, InvalidModule> {
        let mut signature_sections = Vec::new();
        let mut signature_payloads = Vec::new();
        for section in Sections::new(bytes)? {
            let section = section?;
            if let Some((SIGNATURE_SECTION_NAME, payload)) = section.custom {
                signature_sections.push(section.range);
                signature_payloads.push(payload);
            }
        }
        Ok(ModuleLayout {
            bytes,
            signature_sections,
            signature_payloads,
        })
    }

    /// How many `bridge.signature` sections the module has.
    pub(crate) fn signature_count(&self) -> usize {
        self.signature_sections.len()
    }

    /// The payload (envelope bytes) of each `bridge.signature` section, in module order.
    pub(crate) fn signature_payloads(&self) -> impl Iterator<Item = &'a [u8]> + '_ {
        self.signature_payloads
            .iter()
            .map(|r| &self.bytes[r.clone()])
    }

    /// The pieces of the module that remain once every signature section is removed.
    fn stripped_pieces(&self) -> impl Iterator<Item = &'a [u8]> + '_ {
        let bytes = self.bytes;
        let mut kept = Vec::with_capacity(self.signature_sections.len() + 1);
        let mut from = 0;
        for r in &self.signature_sections {
            kept.push(from..r.start);
            from = r.end;
        }
        kept.push(from..bytes.len());
        kept.into_iter()
            .filter(|r| !r.is_empty())
            .map(move |r| &bytes[r])
    }

    /// The module without its signature sections (borrowed when it has none).
    pub(crate) fn stripped(&self) -> Cow<'a, [u8]> {
        if self.signature_sections.is_empty() {
            Cow::Borrowed(self.bytes)
        } else {
            Cow::Owned(self.stripped_pieces().collect::<Vec<_>>().concat())
        }
    }

    /// SHA-256 and length of the module without its signature sections.
    pub(crate) fn stripped_digest(&self) -> ([u8; 32], usize) {
        let mut hasher = Sha256::new();
        let mut len = 0;
        for piece in self.stripped_pieces() {
            hasher.update(piece);
            len += piece.len();
        }
        (hasher.finalize().into(), len)
    }
}

/// Reads an unsigned LEB128 integer of at most 32 bits (at most 5 bytes) at `*pos`.
fn read_u32_leb(bytes: &[u8], pos: &mut usize) -> Result<u32, &'static str> {
    let mut result: u32 = 0;
    for i in 0..5 {
        let Some(&b) = bytes.get(*pos) else {
            return Err("truncated LEB128 integer");
        };
        *pos += 1;
        if i == 4 && b & 0xf0 != 0 {
            return Err("LEB128 integer too large for u32");
        }
        result |= u32::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(result);
        }
    }
    unreachable!("the fifth byte either ends the integer or is rejected")
}

/// Appends `value` as a minimal unsigned LEB128 integer.
fn write_u32_leb(out: &mut Vec<u8>, mut value: u32) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Encodes a complete `bridge.signature` custom section (id 0, size, name, payload) holding
/// `envelope`.
pub(crate) fn signature_section(envelope: &[u8]) -> Vec<u8> {
    let mut name = Vec::with_capacity(1 + SIGNATURE_SECTION_NAME.len());
    write_u32_leb(&mut name, SIGNATURE_SECTION_NAME.len() as u32);
    name.extend_from_slice(SIGNATURE_SECTION_NAME.as_bytes());
    let size = u32::try_from(name.len() + envelope.len()).expect("envelope size is bounded");
    let mut out = Vec::with_capacity(6 + name.len() + envelope.len());
    out.push(0);
    write_u32_leb(&mut out, size);
    out.extend_from_slice(&name);
    out.extend_from_slice(envelope);
    out
}

/// Returns `module` with every `bridge.signature` custom section removed (the whole section:
/// id byte, size, name and payload); every other byte is kept as it is.
///
/// This is the byte string whose SHA-256 a signature covers. It borrows `module` when there is
/// nothing to remove. A runtime may run either form: custom sections do not affect execution.
pub fn strip_signatures(module: &[u8]) -> Result<Cow<'_, [u8]>, InvalidModule> {
    Ok(ModuleLayout::parse(module)?.stripped())
}

/// Checks that `module` has a well-formed core wasm section structure (header, section sizes,
/// custom section names) without looking at anything else.
pub fn check_structure(module: &[u8]) -> Result<(), InvalidModule> {
    ModuleLayout::parse(module).map(|_| ())
}

#[cfg(test)]
mod framing_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn module_with(sections: &[&[u8]]) -> Vec<u8> {
        let mut m = WASM_HEADER.to_vec();
        for s in sections {
            m.extend_from_slice(s);
        }
        m
    }

    const TYPE_SECTION: &[u8] = &[0x01, 0x04, 0x01, 0x60, 0x00, 0x00];

    #[test]
    fn header_only_is_valid() {
        let m = module_with(&[]);
        let l = ModuleLayout::parse(&m).unwrap();
        assert_eq!(l.signature_count(), 0);
        assert!(matches!(l.stripped(), Cow::Borrowed(_)));
    }

    #[test]
    fn bad_headers() {
        assert!(ModuleLayout::parse(b"").is_err());
        assert!(ModuleLayout::parse(b"\0asm").is_err());
        assert!(ModuleLayout::parse(b"\0ASM\x01\0\0\0").is_err());
        // A component (layer 1) is not a core module.
        let e = ModuleLayout::parse(b"\0asm\x0d\0\x01\0").unwrap_err();
        assert!(e.reason.contains("version"), "{e}");
    }

    #[test]
    fn truncated_and_oversized_sections() {
        let mut m = module_with(&[TYPE_SECTION]);
        m.pop();
        assert!(ModuleLayout::parse(&m).is_err());
        // Size LEB128 cut off.
        assert!(ModuleLayout::parse(&module_with(&[&[0x01, 0x80]])).is_err());
        // Size LEB128 with more than 32 bits.
        assert!(
            ModuleLayout::parse(&module_with(&[&[0x01, 0xff, 0xff, 0xff, 0xff, 0x7f]])).is_err()
        );
        // Custom section whose name overruns the section.
        assert!(ModuleLayout::parse(&module_with(&[&[0x00, 0x02, 0x05, b'a']])).is_err());
        // Custom section with an empty body (no name length at all).
        assert!(ModuleLayout::parse(&module_with(&[&[0x00, 0x00]])).is_err());
        // Non-UTF-8 name.
        assert!(ModuleLayout::parse(&module_with(&[&[0x00, 0x02, 0x01, 0xff]])).is_err());
    }

    #[test]
    fn padded_leb_is_accepted() {
        // Size 4 written as a 5-byte LEB128.
        let m = module_with(&[&[0x01, 0x84, 0x80, 0x80, 0x80, 0x00, 0x01, 0x60, 0x00, 0x00]]);
        ModuleLayout::parse(&m).unwrap();
    }

    #[test]
    fn strip_and_append_roundtrip() {
        let base = module_with(&[TYPE_SECTION]);
        let section = signature_section(b"payload");
        assert_eq!(section[0], 0);
        let mut signed = base.clone();
        signed.extend_from_slice(&section);
        // And one in the middle, before the type section.
        let mut middle = WASM_HEADER.to_vec();
        middle.extend_from_slice(&section);
        middle.extend_from_slice(TYPE_SECTION);
        for m in [&signed, &middle] {
            let l = ModuleLayout::parse(m).unwrap();
            assert_eq!(l.signature_count(), 1);
            assert_eq!(l.signature_payloads().next().unwrap(), b"payload");
            assert_eq!(&*l.stripped(), &base[..]);
            let (digest, len) = l.stripped_digest();
            assert_eq!(len, base.len());
            assert_eq!(digest, <[u8; 32]>::from(Sha256::digest(&base)));
        }
        // Other custom sections are kept.
        let other = [0x00, 0x04, 0x03, b'a', b'b', b'c'];
        let m = module_with(&[TYPE_SECTION, &other]);
        let l = ModuleLayout::parse(&m).unwrap();
        assert_eq!(l.signature_count(), 0);
        assert_eq!(&*l.stripped(), &m[..]);
    }

    #[test]
    fn leb_writer_is_minimal() {
        for (v, enc) in [
            (0u32, vec![0u8]),
            (127, vec![0x7f]),
            (128, vec![0x80, 0x01]),
            (624485, vec![0xe5, 0x8e, 0x26]),
            (u32::MAX, vec![0xff, 0xff, 0xff, 0xff, 0x0f]),
        ] {
            let mut out = Vec::new();
            write_u32_leb(&mut out, v);
            assert_eq!(out, enc);
            let mut p = 0;
            assert_eq!(read_u32_leb(&out, &mut p), Ok(v));
            assert_eq!(p, out.len());
        }
    }
}
