//! A directory opened once and used through its file descriptor (`openat` and friends), for
//! the root step's access to the agent's state directory: the service user owns it, so to root
//! it is hostile ground.
//!
//! What this guarantees, whatever the owner put there:
//! - no symbolic link is followed below the opened directory (`O_NOFOLLOW` on every name; a
//!   directory is reached only through its parent's descriptor, so a swapped parent cannot
//!   redirect a write or a removal elsewhere);
//! - a read opens only a regular file (a FIFO would block, a device never end), without
//!   blocking on the open, and reads at most the bound it is given;
//! - a file is written whole (temporary name, fsync, rename, fsync of the directory) and, when
//!   asked, handed to an owner (`fchown`).
//!
//! The layout (root's own) uses the same writer, so its files are whole too.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// An open directory.
#[derive(Debug)]
pub struct Dir {
    file: File,
}

/// Who a file written into the directory should belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

fn cname(name: &str) -> io::Result<CString> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a file name"),
        ));
    }
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a name"))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `Ok(None)` for "no such file".
fn optional<T>(r: io::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// An `O_NOFOLLOW` open refused a symbolic link (`ELOOP`), said in words.
fn explain(name: &str, e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{name} is a symbolic link (refused)"),
        )
    } else {
        e
    }
}

impl Dir {
    /// Opens the directory at `path` (following symbolic links in the path itself: the
    /// path comes from root's configuration).
    pub fn open(path: &Path) -> io::Result<Dir> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))?;
        // SAFETY: a valid NUL-terminated path; the returned descriptor is owned below.
        let fd = check(unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        Ok(Dir {
            file: unsafe { File::from_raw_fd(fd) },
        })
    }

    fn openat(&self, name: &str, flags: libc::c_int, mode: libc::mode_t) -> io::Result<File> {
        let c = cname(name)?;
        // SAFETY: a valid directory descriptor and NUL-terminated name; the descriptor
        // returned is owned below.
        let fd = check(unsafe {
            libc::openat(
                self.file.as_raw_fd(),
                c.as_ptr(),
                flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                libc::c_uint::from(mode),
            )
        })
        .map_err(|e| explain(name, e))?;
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// The subdirectory `name`, `None` when it does not exist; a symbolic link or anything
    /// but a directory is an error.
    pub fn subdir(&self, name: &str) -> io::Result<Option<Dir>> {
        let opened = self.openat(name, libc::O_RDONLY | libc::O_DIRECTORY, 0);
        let opened = opened.map_err(|e| {
            if e.raw_os_error() != Some(libc::ENOTDIR) {
                return e;
            }
            // `O_NOFOLLOW | O_DIRECTORY` says ENOTDIR for a link too: say which.
            let what = if self.is_symlink(name) {
                "a symbolic link"
            } else {
                "not a directory"
            };
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{name} is {what} (refused)"),
            )
        });
        Ok(optional(opened)?.map(|file| Dir { file }))
    }

    /// The subdirectory `name`, created (mode 0700, handed to `owner`) when missing.
    pub fn subdir_or_create(&self, name: &str, owner: Option<Owner>) -> io::Result<Dir> {
        if let Some(d) = self.subdir(name)? {
            return Ok(d);
        }
        let c = cname(name)?;
        // SAFETY: a valid directory descriptor and NUL-terminated name.
        match check(unsafe { libc::mkdirat(self.file.as_raw_fd(), c.as_ptr(), 0o700) }) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let dir = self
            .subdir(name)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{name} vanished")))?;
        if let Some(o) = owner {
            fchown(&dir.file, o)?;
        }
        self.sync()?;
        Ok(dir)
    }

    fn lstat(&self, name: &str) -> io::Result<Option<libc::stat>> {
        let c = cname(name)?;
        // SAFETY: an all-zero `stat` is a valid value to be overwritten.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor, name and out pointer.
        let r = check(unsafe {
            libc::fstatat(
                self.file.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        });
        Ok(optional(r)?.map(|_| st))
    }

    fn is_symlink(&self, name: &str) -> bool {
        matches!(self.lstat(name), Ok(Some(st)) if st.st_mode & libc::S_IFMT == libc::S_IFLNK)
    }

    /// Whether `name` exists (as anything; symbolic links are not followed).
    pub fn exists(&self, name: &str) -> io::Result<bool> {
        Ok(self.lstat(name)?.is_some())
    }

    /// Opens the regular file `name` for reading, `None` when it does not exist. Anything but a
    /// regular file (a symbolic link, a FIFO, a device, a directory) is an error; the open
    /// never blocks.
    pub fn open_regular(&self, name: &str) -> io::Result<Option<(File, std::fs::Metadata)>> {
        let Some(file) = optional(self.openat(name, libc::O_RDONLY | libc::O_NONBLOCK, 0))? else {
            return Ok(None);
        };
        let meta = file.metadata()?;
        if !meta.file_type().is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{name} is not a regular file (refused)"),
            ));
        }
        Ok(Some((file, meta)))
    }

    /// The contents of the regular file `name`, `None` when it does not exist; larger than
    /// `max` bytes is an error (and no more than `max + 1` bytes are read).
    pub fn read(&self, name: &str, max: u64) -> io::Result<Option<Vec<u8>>> {
        let Some((file, meta)) = self.open_regular(name)? else {
            return Ok(None);
        };
        let too_large = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{name} is larger than {max} bytes (refused)"),
            )
        };
        if meta.size() > max {
            return Err(too_large());
        }
        let mut bytes = Vec::new();
        file.take(max + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > max {
            return Err(too_large());
        }
        Ok(Some(bytes))
    }

    /// Writes `bytes` as the file `name`, whole: a temporary file (mode `mode`, handed to
    /// `owner`), fsync, rename over `name`, fsync of the directory.
    pub fn write(
        &self,
        name: &str,
        bytes: &[u8],
        mode: u32,
        owner: Option<Owner>,
    ) -> io::Result<()> {
        let tmp = format!(".{name}.tmp");
        // A leftover (or planted) temporary name goes first: `O_EXCL` then guarantees a file
        // of our own.
        self.remove_file(&tmp)?;
        let mut file = self.openat(
            &tmp,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            mode as libc::mode_t,
        )?;
        let written = (|| {
            if let Some(o) = owner {
                fchown(&file, o)?;
            }
            file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
            file.write_all(bytes)?;
            file.sync_all()?;
            self.rename(&tmp, name)
        })();
        if written.is_err() {
            let _ = self.remove_file(&tmp);
        }
        written?;
        self.sync()
    }

    /// Renames `from` to `to` within this directory (replacing `to`).
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let (f, t) = (cname(from)?, cname(to)?);
        let fd = self.file.as_raw_fd();
        // SAFETY: valid descriptors and NUL-terminated names.
        check(unsafe { libc::renameat(fd, f.as_ptr(), fd, t.as_ptr()) })?;
        Ok(())
    }

    /// Removes the file (or symbolic link) `name`; a missing one is fine.
    pub fn remove_file(&self, name: &str) -> io::Result<()> {
        let c = cname(name)?;
        // SAFETY: a valid directory descriptor and NUL-terminated name.
        let r = check(unsafe { libc::unlinkat(self.file.as_raw_fd(), c.as_ptr(), 0) });
        optional(r).map(|_| ())
    }

    /// Removes `name` and everything below it without following any symbolic link; a missing
    /// one is fine.
    pub fn remove_tree(&self, name: &str) -> io::Result<()> {
        cname(name)?;
        // Through this descriptor's /proc name: the kernel resolves it to this very directory,
        // and `remove_dir_all` itself never follows a link (it unlinks one), so nothing
        // outside `name` can be reached even if the owner swaps things meanwhile.
        let path = format!("/proc/self/fd/{}/{name}", self.file.as_raw_fd());
        optional(std::fs::remove_dir_all(&path).or_else(|e| {
            if e.raw_os_error() == Some(libc::ENOTDIR) {
                std::fs::remove_file(&path)
            } else {
                Err(e)
            }
        }))
        .map(|_| ())
    }

    /// The directory's owner.
    pub fn owner(&self) -> io::Result<Owner> {
        let m = self.file.metadata()?;
        Ok(Owner {
            uid: m.uid(),
            gid: m.gid(),
        })
    }

    /// fsync of the directory (its entries are durable).
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_all()
    }
}

/// Hands `file` to `owner`; nothing to do when it is already theirs (e.g. the launcher runs as
/// the owner itself).
fn fchown(file: &File, owner: Owner) -> io::Result<()> {
    let m = file.metadata()?;
    if m.uid() == owner.uid && m.gid() == owner.gid {
        return Ok(());
    }
    // SAFETY: a valid descriptor.
    check(unsafe { libc::fchown(file.as_raw_fd(), owner.uid, owner.gid) })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn a_symlink_is_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), "root's").unwrap();
        let state = tmp.path().join("state");
        std::fs::create_dir(&state).unwrap();
        symlink(outside.join("secret"), state.join("file")).unwrap();
        symlink(&outside, state.join("sub")).unwrap();
        let dir = Dir::open(&state).unwrap();
        let e = dir.read("file", 100).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(dir.subdir("sub").is_err());
        // Writing over the link replaces the link, not its target.
        dir.write("file", b"new", 0o600, None).unwrap();
        assert_eq!(std::fs::read(outside.join("secret")).unwrap(), b"root's");
        assert_eq!(std::fs::read(state.join("file")).unwrap(), b"new");
        // Removing a linked "tree" removes the link only.
        dir.remove_tree("sub").unwrap();
        assert!(outside.join("secret").exists());
        assert!(!state.join("sub").exists());
    }

    #[test]
    fn reads_are_bounded_and_only_of_regular_files() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("big"), vec![b'x'; 101]).unwrap();
        std::fs::write(tmp.path().join("ok"), vec![b'x'; 100]).unwrap();
        let fifo = CString::new(tmp.path().join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let dir = Dir::open(tmp.path()).unwrap();
        assert!(dir.read("big", 100).is_err());
        assert_eq!(dir.read("ok", 100).unwrap().unwrap().len(), 100);
        assert_eq!(dir.read("missing", 100).unwrap(), None);
        // A FIFO neither blocks the open nor is read.
        let e = dir.read("fifo", 100).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn a_write_is_whole_and_leaves_no_temporary_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        std::fs::write(tmp.path().join(".f.tmp"), "leftover").unwrap();
        dir.write("f", b"one", 0o644, None).unwrap();
        dir.write("f", b"two", 0o644, None).unwrap();
        assert_eq!(std::fs::read(tmp.path().join("f")).unwrap(), b"two");
        assert!(!tmp.path().join(".f.tmp").exists());
        let mode = std::fs::metadata(tmp.path().join("f")).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o644);
    }
}
