//! What the agent keeps on disk, counted: the files of a directory (the module store, the
//! compiled-module cache) and their bytes, read without following links and bounded in the
//! entries examined, so a status stays cheap whatever a directory holds.

use std::path::Path;

/// The most directory entries one count examines (a few milliseconds of `lstat`s). Past it the
/// count stops: the figures are then a lower bound, and [`Usage::complete`] says so.
pub const MAX_ENTRIES: usize = 4096;

/// Files of a kind in a directory, and their size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Regular files counted.
    pub files: u64,
    /// Their size, in bytes.
    pub bytes: u64,
    /// Whether every entry was examined (false: [`MAX_ENTRIES`] was reached first).
    pub complete: bool,
}

/// The regular files named `*.{extension}` in `dir` and, `depth` levels down, in its
/// subdirectories (depth 1: `dir` alone). Links are neither followed nor counted; a missing
/// or unreadable directory counts nothing.
pub fn usage(dir: &Path, extension: &str, depth: u8) -> Usage {
    let mut usage = Usage {
        complete: true,
        ..Usage::default()
    };
    let mut budget = MAX_ENTRIES;
    walk(dir, extension, depth, &mut budget, &mut usage);
    usage
}

fn walk(dir: &Path, extension: &str, depth: u8, budget: &mut usize, usage: &mut Usage) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if *budget == 0 {
            usage.complete = false;
            return;
        }
        *budget -= 1;
        // `DirEntry::metadata` does not follow a link.
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() && depth > 1 {
            walk(&entry.path(), extension, depth - 1, budget, usage);
            if !usage.complete {
                return;
            }
        } else if meta.is_file()
            && Path::new(&entry.file_name()).extension() == Some(extension.as_ref())
        {
            usage.files += 1;
            usage.bytes += meta.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_files_of_a_kind_without_following_links() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::write(root.join("a.wasm"), [0u8; 10]).unwrap();
        std::fs::write(root.join("b.wasm"), [0u8; 5]).unwrap();
        std::fs::write(root.join("notes.txt"), [0u8; 100]).unwrap();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/c.wasm"), [0u8; 7]).unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("big.wasm"), [0u8; 1000]).unwrap();
        std::os::unix::fs::symlink(outside.path().join("big.wasm"), root.join("l.wasm")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("ldir")).unwrap();
        let u = usage(root, "wasm", 1);
        assert_eq!((u.files, u.bytes, u.complete), (2, 15, true));
        let u = usage(root, "wasm", 2);
        assert_eq!((u.files, u.bytes, u.complete), (3, 22, true));
        let u = usage(&root.join("missing"), "wasm", 2);
        assert_eq!((u.files, u.bytes, u.complete), (0, 0, true));
    }

    #[test]
    fn a_count_stops_at_the_entry_bound_and_says_so() {
        let tmp = tempfile::tempdir().unwrap();
        for i in 0..MAX_ENTRIES + 5 {
            std::fs::File::create(tmp.path().join(format!("{i}.cwasm"))).unwrap();
        }
        let u = usage(tmp.path(), "cwasm", 1);
        assert_eq!(u.files, MAX_ENTRIES as u64);
        assert!(!u.complete);
    }
}
