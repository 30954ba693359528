//! Unpacking a release served as a gzip archive (manifest format 2): the archive, already
//! checked against the manifest's `archive_size` and `archive_sha256`, is decompressed into
//! the staged binary with its output capped at the manifest's `size`.
//!
//! Guarantees: at most `size + 1` bytes are ever decompressed (the one byte more is how an
//! archive that unpacks to more is told apart: a gzip bomb relative to the manifest costs its
//! reader `size` bytes of disk, no more); the output is accepted only if it is exactly `size`
//! bytes with the manifest's SHA-256, the gzip stream is whole (its CRC and length trailer
//! check out) and nothing follows it. Blocking file I/O: call it from `spawn_blocking`.

use std::io::{BufRead, BufReader, Read, Write};

use sha2::{Digest, Sha256};

/// Why an archive was not unpacked.
#[derive(Debug)]
pub enum UnpackError {
    /// The archive is not what the manifest describes (not gzip, cut short, more or fewer
    /// bytes than `size`, another SHA-256).
    Invalid(String),
    /// Reading the archive or writing the binary failed.
    Storage(std::io::Error),
}

/// Decompresses the gzip `archive` into `out`, which must then be `size` bytes with SHA-256
/// `sha256` (lowercase hex).
pub fn gunzip_capped(
    archive: impl Read,
    out: &mut impl Write,
    size: u64,
    sha256: &str,
) -> Result<(), UnpackError> {
    let invalid = |why: String| Err(UnpackError::Invalid(why));
    let mut decoder = flate2::bufread::GzDecoder::new(BufReader::with_capacity(64 << 10, archive));
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        // Never more than one byte past `size`, whatever the archive unpacks to.
        let want = (size + 1 - total).min(buf.len() as u64) as usize;
        let n = match decoder.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return invalid(format!(
                    "the archive is cut short: it ends inside its gzip stream after {total} bytes of the binary"
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput
                || e.kind() == std::io::ErrorKind::InvalidData =>
            {
                return invalid(format!("the archive is not a valid gzip stream: {e}"))
            }
            Err(e) => return Err(UnpackError::Storage(e)),
        };
        total += n as u64;
        if total > size {
            return invalid(format!(
                "the archive unpacks to more than the manifest's {size} bytes"
            ));
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(UnpackError::Storage)?;
    }
    let mut rest = decoder.into_inner();
    match rest.fill_buf() {
        Ok([]) => {}
        Ok(_) => return invalid("the archive has data after its gzip stream".to_string()),
        Err(e) => return Err(UnpackError::Storage(e)),
    }
    if total != size {
        return invalid(format!(
            "the archive unpacks to {total} bytes; the manifest says {size}"
        ));
    }
    let got = hex::encode(hasher.finalize());
    if got != sha256 {
        return invalid(format!(
            "the unpacked binary hashes to {got}; the manifest says {sha256}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use flate2::Compression;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::best());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn sha(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    fn unpack(archive: &[u8], size: u64, sha256: &str) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        match gunzip_capped(archive, &mut out, size, sha256) {
            Ok(()) => Ok(out),
            Err(UnpackError::Invalid(why)) => Err(why),
            Err(UnpackError::Storage(e)) => panic!("{e}"),
        }
    }

    #[test]
    fn an_archive_unpacks_to_the_binary_of_the_manifest() {
        let binary: Vec<u8> = (0..300_000u32).map(|i| (i % 7 * i % 251) as u8).collect();
        let archive = gzip(&binary);
        assert_eq!(
            unpack(&archive, binary.len() as u64, &sha(&binary)),
            Ok(binary)
        );
        assert_eq!(unpack(&gzip(b""), 0, &sha(b"")), Ok(Vec::new()));
    }

    #[test]
    fn an_archive_that_unpacks_to_more_stops_one_byte_past_the_size() {
        // 64 MiB of zeros in about 64 KiB: a bomb relative to a manifest of 1000 bytes.
        let bomb = {
            let mut e = GzEncoder::new(Vec::new(), Compression::best());
            let zeros = vec![0u8; 1 << 20];
            for _ in 0..64 {
                e.write_all(&zeros).unwrap();
            }
            e.finish().unwrap()
        };
        let mut out = Vec::new();
        let err = gunzip_capped(&bomb[..], &mut out, 1000, &sha(&[0; 1000])).unwrap_err();
        assert!(
            matches!(&err, UnpackError::Invalid(w) if w.contains("more than the manifest's 1000 bytes")),
            "{err:?}"
        );
        assert!(out.len() <= 1000, "{} bytes written", out.len());
        // Exactly the size is fine when it is the binary.
        let small = gzip(&[0; 1000]);
        assert!(unpack(&small, 1000, &sha(&[0; 1000])).is_ok());
    }

    #[test]
    fn a_cut_corrupt_padded_or_different_archive_is_refused_with_the_reason() {
        let binary: Vec<u8> = (0..50_000u32).map(|i| (i * 31 % 253) as u8).collect();
        let (size, good) = (binary.len() as u64, sha(&binary));
        let archive = gzip(&binary);
        let cut = &archive[..archive.len() / 2];
        let why = unpack(cut, size, &good).unwrap_err();
        assert!(why.contains("cut short"), "{why}");
        // Without its trailer (CRC and length).
        let why = unpack(&archive[..archive.len() - 4], size, &good).unwrap_err();
        assert!(why.contains("cut short"), "{why}");
        let mut flipped = archive.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0xff;
        let why = unpack(&flipped, size, &good).unwrap_err();
        assert!(
            why.contains("not a valid gzip") || why.contains("hashes to") || why.contains("bytes"),
            "{why}"
        );
        let why = unpack(b"not gzip at all", size, &good).unwrap_err();
        assert!(why.contains("not a valid gzip"), "{why}");
        let mut padded = archive.clone();
        padded.extend_from_slice(b"more");
        let why = unpack(&padded, size, &good).unwrap_err();
        assert!(why.contains("data after its gzip stream"), "{why}");
        let why = unpack(&archive, size + 1, &good).unwrap_err();
        assert!(why.contains(&format!("unpacks to {size} bytes")), "{why}");
        let why = unpack(&archive, size, &sha(b"other")).unwrap_err();
        assert!(why.contains("hashes to"), "{why}");
    }
}
