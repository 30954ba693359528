//! Giving memory back while the agent is idle.
//!
//! An agent sits idle on thousands of servers most of the time, so what it holds while idle is
//! what it costs. Two things stay resident after work that the agent no longer needs:
//!
//! - free heap memory the allocator keeps for the next burst: `malloc_trim` returns it;
//! - the code and read-only data pages of the executable and its shared libraries that the last
//!   burst touched (wasmtime and Cranelift are most of a 20 MB text segment, and the kernel maps
//!   code in 64 KiB runs around each page fault). They are clean copies of the files: the page
//!   cache keeps them, the process only holds mappings to them. Unmapping them
//!   (`madvise(MADV_DONTNEED)`) takes them out of the agent's resident set, and the next use
//!   maps them again from the page cache (a minor fault per 64 KiB, not a disk read, unless the
//!   kernel evicted them meanwhile). This is what the kernel does to an idle process under
//!   memory pressure, done before the pressure; Windows agents do the same with
//!   `EmptyWorkingSet`.
//!
//! Only mappings that can hold nothing but file contents are unmapped: file-backed, without
//! write permission, of the executable itself or a shared library (whose protections never
//! change after the loader's relocation), and with no private (copy-on-write) pages, which
//! `MADV_DONTNEED` would throw away. The relocated read-only data (RELRO) has such pages and is
//! left alone.

use std::path::Path;

/// Caps glibc's malloc arenas at two. By default glibc gives threads arenas of their own (up to
/// eight per core) so they do not contend for one lock; each arena keeps its own free space and
/// fragments on its own. Measured on this agent after 2000 warm tasks, idle: 8.7 MiB resident
/// with the default, 7.7 MiB with two arenas, 7.3 MiB with one; tasks per second (32 in flight):
/// about the same with two, 10-15 % fewer with one (the workers and the journal writer then
/// queue for one lock). Call it first thing in `main`, before any thread starts.
pub fn limit_arenas() {
    // SAFETY: mallopt only changes allocator tuning; M_ARENA_MAX is a documented parameter.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
}

/// What a [`trim`] released.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Trimmed {
    /// Mappings unmapped.
    pub mappings: usize,
    /// Their resident size before, in KiB.
    pub kib: u64,
}

/// Returns free heap memory to the system and unmaps the clean file-backed code and read-only
/// data pages of the executable and its libraries. Blocking (reads `/proc/self/smaps`, a few
/// milliseconds): call it from a blocking thread, when the agent is idle.
pub fn trim() -> Trimmed {
    // SAFETY: malloc_trim only returns free heap memory to the system.
    unsafe { libc::malloc_trim(0) };
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return Trimmed::default();
    };
    let exe = std::fs::read_link("/proc/self/exe").ok();
    let mut trimmed = Trimmed::default();
    for m in parse_smaps(&smaps) {
        if !m.releasable(exe.as_deref()) {
            continue;
        }
        // SAFETY: the range is one whole mapping of this process, read-only, backed by a file
        // that the loader mapped at start and never remaps, with no private pages: every
        // resident page is a clean page-cache page, so dropping the mapping's page table
        // entries loses nothing; the next access faults the same bytes back in. A failure
        // (e.g. a locked mapping) leaves the mapping as it was.
        let r = unsafe {
            libc::madvise(
                m.start as *mut libc::c_void,
                m.end - m.start,
                libc::MADV_DONTNEED,
            )
        };
        if r == 0 {
            trimmed.mappings += 1;
            trimmed.kib += m.rss_kib;
        }
    }
    trimmed
}

/// One mapping of `/proc/self/smaps`, the fields [`trim`] looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
    perms: String,
    inode: u64,
    path: String,
    rss_kib: u64,
    anonymous_kib: u64,
    locked_kib: u64,
}

impl Mapping {
    /// Whether unmapping this mapping's pages can lose nothing (see the module docs).
    fn releasable(&self, exe: Option<&Path>) -> bool {
        let object =
            exe.is_some_and(|e| Path::new(&self.path) == e) || is_shared_library(&self.path);
        self.inode != 0
            && object
            && self.perms.starts_with('r')
            && !self.perms.contains('w')
            && self.anonymous_kib == 0
            && self.locked_kib == 0
            && self.rss_kib > 0
    }
}

/// `libc.so.6`, `ld-linux-x86-64.so.2`, `libfoo.so` (a path, with or without version suffix).
fn is_shared_library(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or("");
    path.starts_with('/') && (name.ends_with(".so") || name.contains(".so."))
}

/// Parses `/proc/<pid>/smaps`. Lines it does not understand are skipped.
fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        if let Some(m) = parse_header(line) {
            out.push(m);
            continue;
        }
        let Some(current) = out.last_mut() else {
            continue;
        };
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let kib = || -> u64 {
            rest.split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        match key {
            "Rss" => current.rss_kib = kib(),
            "Anonymous" => current.anonymous_kib = kib(),
            "Locked" => current.locked_kib = kib(),
            _ => {}
        }
    }
    out
}

/// `start-end perms offset dev inode [path]`, or `None` for a field line (`Rss:   12 kB`).
fn parse_header(line: &str) -> Option<Mapping> {
    let mut fields = line.split_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    let perms = fields.next()?;
    if perms.len() != 4 {
        return None;
    }
    let _offset = fields.next()?;
    let _dev = fields.next()?;
    let inode = fields.next()?.parse().ok()?;
    // The path may contain spaces; a deleted file ends in " (deleted)", which no path compares
    // equal to and no library name ends with, so such a mapping is left alone.
    let path = fields.collect::<Vec<_>>().join(" ");
    Some(Mapping {
        start,
        end,
        perms: perms.to_string(),
        inode,
        path,
        rss_kib: 0,
        anonymous_kib: 0,
        locked_kib: 0,
    })
}

/// The process's resident set size in KiB (`VmRSS`), or 0 if unknown.
pub fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
55c9248b4000-55c924e0a000 r--p 00000000 fe:00 5417673                    /opt/bridge/bridge-daemon
Size:               5464 kB
Rss:                2196 kB
Anonymous:             0 kB
Locked:                0 kB
55c924e0a000-55c925da9000 r-xp 00555000 fe:00 5417673                    /opt/bridge/bridge-daemon
Size:              16000 kB
Rss:                7996 kB
Anonymous:             0 kB
Locked:                0 kB
55c925da9000-55c925e5f000 r--p 014f3000 fe:00 5417673                    /opt/bridge/bridge-daemon
Rss:                 728 kB
Anonymous:           728 kB
Locked:                0 kB
55c925e5f000-55c925e60000 rw-p 015a9000 fe:00 5417673                    /opt/bridge/bridge-daemon
Rss:                   4 kB
Anonymous:             4 kB
7f3d5760d000-7f3d57763000 r-xp 00026000 fe:00 326279                     /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                 908 kB
Anonymous:             0 kB
Locked:                0 kB
7f3d57800000-7f3d57900000 r-xp 00000000 fe:00 999                        /var/lib/bridge/modules/abc.cwasm
Rss:                 100 kB
Anonymous:             0 kB
7f3d58000000-7f3d58100000 r-xp 00000000 00:00 0 
Rss:                 268 kB
Anonymous:           268 kB
7f3d59000000-7f3d59100000 r--p 00000000 fe:00 77                         /usr/lib/libz.so
Rss:                  64 kB
Anonymous:             0 kB
Locked:               64 kB
7ffdc903e000-7ffdc905f000 rw-p 00000000 00:00 0                          [stack]
Rss:                  76 kB
Anonymous:            76 kB
";

    #[test]
    fn smaps_is_parsed() {
        let maps = parse_smaps(SAMPLE);
        assert_eq!(maps.len(), 9);
        assert_eq!(maps[1].start, 0x55c924e0a000);
        assert_eq!(maps[1].end, 0x55c925da9000);
        assert_eq!(maps[1].perms, "r-xp");
        assert_eq!(maps[1].inode, 5417673);
        assert_eq!(maps[1].path, "/opt/bridge/bridge-daemon");
        assert_eq!(maps[1].rss_kib, 7996);
        assert_eq!(maps[2].anonymous_kib, 728);
        assert_eq!(maps[7].locked_kib, 64);
        assert_eq!(maps[8].path, "[stack]");
    }

    #[test]
    fn only_clean_read_only_code_and_data_of_loaded_objects_is_released() {
        let exe = Path::new("/opt/bridge/bridge-daemon");
        let released: Vec<String> = parse_smaps(SAMPLE)
            .into_iter()
            .filter(|m| m.releasable(Some(exe)))
            .map(|m| format!("{} {}", m.perms, m.path))
            .collect();
        assert_eq!(
            released,
            [
                "r--p /opt/bridge/bridge-daemon",
                "r-xp /opt/bridge/bridge-daemon",
                "r-xp /usr/lib/x86_64-linux-gnu/libc.so.6",
            ],
            "not the RELRO (private pages), not writable data, not other files, not anonymous \
             code, not locked pages, not the stack"
        );
    }

    #[test]
    fn library_names() {
        assert!(is_shared_library("/usr/lib/x86_64-linux-gnu/libc.so.6"));
        assert!(is_shared_library("/lib64/ld-linux-x86-64.so.2"));
        assert!(is_shared_library("/usr/lib/libz.so"));
        assert!(!is_shared_library("/var/lib/bridge/modules/abc.cwasm"));
        assert!(!is_shared_library("/tmp/x.so (deleted)"));
        assert!(!is_shared_library("[vdso]"));
        assert!(!is_shared_library("libc.so.6"));
    }

    /// The real thing on this process: trimming releases resident code pages, and the process
    /// keeps running the code it unmapped (this test's own code and the standard library's).
    #[test]
    fn trimming_this_process_releases_code_and_keeps_it_working() {
        // Touch a good part of the binary's code so there is something to release.
        let text: String = (0..2000).map(|i| format!("{i:x}")).collect();
        assert!(text.len() > 1000);
        let trimmed = trim();
        assert!(trimmed.mappings > 0, "{trimmed:?}");
        assert!(trimmed.kib > 0, "{trimmed:?}");
        // Everything still works after the trim: formatting, allocation, reading /proc.
        let again: String = (0..2000).map(|i| format!("{i:x}")).collect();
        assert_eq!(text, again);
        assert!(resident_kib() > 0);
        let second = trim();
        assert!(second.mappings > 0);
    }
}
