//! The exporter: moves the journal's durable audit records to the audit files (appended and
//! fdatasync'ed on a thread of its own, never on the journal writer's path, gathered for up to
//! [`LINGER`] so that the file is synced a few times a second at most), rotates the files,
//! and at start repairs a torn last line and writes what the files miss.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use super::files::{file_name, list, read};
use super::record::{Head, Record};

/// Where the exporter gets the records: the journal's audit table (`crate::journal::AuditFeed`).
pub trait AuditSource: Send + 'static {
    /// Waits at most `timeout` for a durable head past `seq`.
    fn wait(&self, seq: u64, timeout: Duration);
    /// The durable records after `after`, in order, at most `max` of them.
    fn lines(&self, after: u64, max: usize) -> Result<Vec<(u64, Vec<u8>)>, String>;
    /// The records through `through` are in the files.
    fn exported(&self, through: u64);
    /// The source is closing: the exporter stops.
    fn closed(&self) -> bool;
    /// The last durable record.
    fn head(&self) -> Head;
    /// The source holds no record yet: its chain goes on from `head` (the files' last).
    fn seed(&self, head: Head);
}

/// `[audit]`: the audit files' rotation and logging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// A record that would take a file past this many bytes starts a new one (default 8 MiB).
    pub max_file_bytes: u64,
    /// The most files kept, the oldest removed (default 8).
    pub max_files: usize,
    /// Each record is also logged at info under the target `bridge::audit`.
    pub log: bool,
}

impl Default for AuditConfig {
    fn default() -> AuditConfig {
        AuditConfig {
            max_file_bytes: 8 << 20,
            max_files: 8,
            log: false,
        }
    }
}

/// The most records exported in one pass.
const BATCH: usize = 1024;

/// How long the exporter waits before trying again after a failure (a full disk).
const RETRY: Duration = Duration::from_secs(1);

/// How long the exporter gathers records once one is durable, before it writes them and syncs
/// the file: one `fdatasync` of the audit file per this much time instead of one per task,
/// each of which, on the same disk, would delay the journal's own `fdatasync` of the next
/// task. Until they are exported the records are durable in the journal, which the exporter
/// reads again after a crash.
const LINGER: Duration = Duration::from_millis(100);

/// The file being appended to.
struct Current {
    path: PathBuf,
    file: std::fs::File,
    bytes: u64,
}

/// The exporter's state: where the files are, and the last record they hold.
struct Exporter {
    dir: PathBuf,
    config: AuditConfig,
    /// The last sequence number in the files (0: none).
    last: u64,
    current: Option<Current>,
}

/// Prepares `dir` (0700), sets a torn last line aside, exports what `feed` holds that the
/// files do not, and starts the exporter's thread, handed to `attach` (the journal, which
/// stops it when it closes).
pub fn start(
    dir: PathBuf,
    config: AuditConfig,
    feed: impl AuditSource,
    attach: impl FnOnce(std::thread::JoinHandle<()>),
) -> Result<()> {
    let mut exporter = Exporter::open(dir, config)?;
    if feed.head().seq == 0 && exporter.last > 0 {
        // A journal with no chain (new, or replaced) beside the files: the chain goes on from
        // the files' last record, so that its records are not taken for ones already written.
        if let Some(head) = super::verify::files_head(&exporter.dir) {
            tracing::info!(
                seq = head.seq,
                "the journal's audit chain goes on from the audit files' last record"
            );
            feed.seed(head);
        }
    } else if feed.head().seq < exporter.last {
        tracing::warn!(
            files = exporter.last,
            journal = feed.head().seq,
            "the audit files hold records past the journal's chain (was the journal replaced?)"
        );
    }
    exporter
        .export(&feed)
        .context("writing the journal's audit records to the audit files")?;
    let thread = std::thread::Builder::new()
        .name("bridge-audit".into())
        .spawn(move || exporter.run(feed))
        .context("starting the audit exporter thread")?;
    attach(thread);
    Ok(())
}

impl Exporter {
    fn open(dir: PathBuf, config: AuditConfig) -> Result<Exporter> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let meta = std::fs::symlink_metadata(&dir)?;
        anyhow::ensure!(meta.is_dir(), "{} is not a directory", dir.display());
        let mut exporter = Exporter {
            dir,
            config,
            last: 0,
            current: None,
        };
        if let Some((first, path)) = list(&exporter.dir)?.pop() {
            exporter.last = repair(&path, first)?;
        }
        Ok(exporter)
    }

    fn run(mut self, feed: impl AuditSource) {
        while !feed.closed() {
            feed.wait(self.last, Duration::from_millis(500));
            if feed.head().seq > self.last {
                // Returns at once when the journal closes.
                feed.wait(u64::MAX, LINGER);
            }
            if let Err(e) = self.export(&feed) {
                tracing::warn!("writing audit records to {}: {e:#}", self.dir.display());
                // Tried again later; meanwhile the records wait in the journal (counted in
                // its byte limit).
                feed.wait(u64::MAX, RETRY);
            }
        }
        // The journal closes: what is durable by now goes to the files too.
        if let Err(e) = self.export(&feed) {
            tracing::warn!("writing audit records to {}: {e:#}", self.dir.display());
        }
    }

    /// Writes the journal's durable records the files miss, then tells the journal.
    fn export(&mut self, feed: &impl AuditSource) -> Result<()> {
        loop {
            let lines = feed.lines(self.last, BATCH).map_err(anyhow::Error::msg)?;
            if lines.is_empty() {
                return Ok(());
            }
            let mut touched = false;
            for (seq, line) in &lines {
                if *seq <= self.last {
                    continue;
                }
                if self.last != 0 && *seq != self.last + 1 {
                    tracing::warn!(
                        seq,
                        last = self.last,
                        "the audit chain skips records (was the journal replaced?)"
                    );
                }
                self.append(*seq, line)?;
                touched = true;
                if self.config.log {
                    tracing::info!(target: "bridge::audit", "{}", String::from_utf8_lossy(line));
                }
            }
            if touched {
                if let Some(c) = &self.current {
                    c.file
                        .sync_data()
                        .with_context(|| format!("syncing {}", c.path.display()))?;
                }
            }
            let through = lines.last().map_or(0, |(s, _)| *s);
            feed.exported(through);
            if lines.len() < BATCH {
                return Ok(());
            }
        }
    }

    /// Appends one record, rotating first when the current file is full.
    fn append(&mut self, seq: u64, line: &[u8]) -> Result<()> {
        let full = match &self.current {
            Some(c) => c.bytes > 0 && c.bytes + line.len() as u64 + 1 > self.config.max_file_bytes,
            None => true,
        };
        if full {
            self.rotate(seq)?;
        }
        let c = self.current.as_mut().expect("opened by rotate");
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line);
        buf.push(b'\n');
        c.file
            .write_all(&buf)
            .with_context(|| format!("appending to {}", c.path.display()))?;
        c.bytes += buf.len() as u64;
        self.last = seq;
        Ok(())
    }

    /// Opens the file to append to: the newest one if it has room, else a new one starting at
    /// `seq`; removes the oldest files beyond `max_files`.
    fn rotate(&mut self, seq: u64) -> Result<()> {
        if let Some(c) = self.current.take() {
            c.file
                .sync_data()
                .with_context(|| format!("syncing {}", c.path.display()))?;
        } else if let Some((_, path)) = list(&self.dir)?.pop() {
            let bytes = std::fs::metadata(&path)?.len();
            if bytes < self.config.max_file_bytes {
                let file = append_to(&path, false)?;
                self.current = Some(Current { path, file, bytes });
                return Ok(());
            }
        }
        let path = self.dir.join(file_name(seq));
        let file = append_to(&path, true)?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", self.dir.display()))?;
        self.current = Some(Current {
            path,
            file,
            bytes: 0,
        });
        let files = list(&self.dir)?;
        let max = self.config.max_files.max(1);
        if files.len() > max {
            for (_, old) in &files[..files.len() - max] {
                std::fs::remove_file(old).with_context(|| format!("removing {}", old.display()))?;
                tracing::info!(file = %old.display(), "removed the oldest audit file (rotation)");
            }
        }
        Ok(())
    }
}

fn append_to(path: &Path, create: bool) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .append(true)
        .create_new(create)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Sets a torn last line of the newest file (an append cut short by a crash) aside in
/// `<file>.torn` and cuts the file back to its whole lines; returns the last sequence number
/// the file holds (`first - 1` when none).
fn repair(path: &Path, first: u64) -> Result<u64> {
    let contents = read(path).with_context(|| format!("reading {}", path.display()))?;
    if !contents.torn.is_empty() {
        let mut aside = path.as_os_str().to_owned();
        aside.push(".torn");
        let aside = PathBuf::from(aside);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&aside)
            .with_context(|| format!("opening {}", aside.display()))?;
        f.write_all(&contents.torn)?;
        f.write_all(b"\n")?;
        f.sync_data()?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        file.set_len(contents.whole_bytes)?;
        file.sync_data()?;
        tracing::warn!(
            file = %path.display(),
            bytes = contents.torn.len(),
            aside = %aside.display(),
            "the audit file ended in a torn line (an append cut short by a crash): its bytes \
             were set aside and its record is written again from the journal"
        );
    }
    let last = match contents.lines.last() {
        Some(line) => match Record::parse(line) {
            Ok(r) => r.seq,
            Err(_) => first + contents.lines.len() as u64 - 1,
        },
        None => first.saturating_sub(1),
    };
    Ok(last)
}
