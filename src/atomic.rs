//! Outputs, for every writer: written under a temporary name in the destination's directory,
//! synced, then renamed into place, so an interrupted run never leaves a partial output.
//!
//! What an output may replace is decided here ([`Policy`]), in one place:
//! - never a file the command reads (same device and inode as one of its inputs);
//! - never anything but a regular file: a symbolic link, device, FIFO or folder is an error;
//! - an existing regular file only where the verb documents a rewrite, or with `--force`.
//!
//! An output that replaces nothing is placed by a rename that cannot replace
//! (`renameat2(RENAME_NOREPLACE)`, else a hard link or `mkdir` claims the name first), so of
//! two runs writing one path exactly one succeeds and the other finds it exists.
//!
//! Temporary names are `.NAME.factpatch-tmp.PID.RANDOM`, created exclusively (`O_EXCL`,
//! `mkdir`). A run killed before its rename leaves one behind; the next run writing NAME in
//! that directory removes those whose process is gone (and the `.NAME.tmp-PID` of earlier
//! versions), and nothing else.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

/// What an output may replace. Errors carry no path: callers name it (`io_err`).
#[derive(Clone, Debug, Default)]
pub struct Policy {
    existing: Existing,
    /// Device and inode of every input file.
    files: BTreeSet<(u64, u64)>,
    /// Input folders, canonical: a folder output goes neither inside one nor around one.
    dirs: Vec<PathBuf>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
enum Existing {
    /// An existing path is an error (patches, model folders, heatmaps).
    #[default]
    Refuse,
    /// Replaced only with `--force`; the error says so.
    Force(bool),
    /// A documented rewrite (an experiment's results, caches).
    Rewrite,
}

impl Policy {
    /// Replaces nothing: an existing path is an error.
    pub fn new() -> Self {
        Policy::default()
    }

    /// Replaces an existing regular file only when `force` (a verb's `--force`).
    pub fn force(force: bool) -> Self {
        Policy { existing: Existing::Force(force), ..Policy::default() }
    }

    /// Replaces an existing regular file: for outputs documented as rewritten.
    pub fn rewrite() -> Self {
        Policy { existing: Existing::Rewrite, ..Policy::default() }
    }

    /// Never replaces any of `paths` either, the command's inputs: files (through links), or
    /// folders with every file in them. Paths that do not exist are left out.
    pub fn reading<P: AsRef<Path>>(mut self, paths: impl IntoIterator<Item = P>) -> Self {
        for path in paths {
            let path = path.as_ref();
            match fs::metadata(path) {
                Ok(m) if m.is_dir() => {
                    self.dirs.extend(fs::canonicalize(path));
                    self.add_folder(path, 0);
                }
                Ok(m) => {
                    self.files.insert((m.dev(), m.ino()));
                }
                Err(_) => {}
            }
        }
        self
    }

    fn add_folder(&mut self, dir: &Path, depth: usize) {
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() && depth < 8 => self.add_folder(&entry.path(), depth + 1),
                _ => {
                    if let Ok(m) = fs::metadata(entry.path()) {
                        self.files.insert((m.dev(), m.ino()));
                    }
                }
            }
        }
    }

    fn replaces(&self) -> bool {
        matches!(self.existing, Existing::Rewrite | Existing::Force(true))
    }

    /// Whether a file may be written at `dest`: nothing there, or a regular file this policy
    /// replaces that is none of the inputs. Commands call it before their work too, so that a
    /// refused output costs nothing.
    pub fn check(&self, dest: &Path) -> io::Result<()> {
        let meta = match fs::symlink_metadata(dest) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            other => other?,
        };
        self.not_an_input(&meta)?;
        if !meta.is_file() {
            return Err(refused(io::ErrorKind::InvalidInput, format!("is not a regular file ({}): only a regular file is ever replaced", kind(&meta))));
        }
        match self.existing {
            Existing::Refuse => Err(refused(io::ErrorKind::AlreadyExists, "already exists: remove it or choose another path".into())),
            Existing::Force(false) => Err(refused(io::ErrorKind::AlreadyExists, "exists: pass --force to replace it".into())),
            _ => Ok(()),
        }
    }

    fn not_an_input(&self, meta: &fs::Metadata) -> io::Result<()> {
        match self.files.contains(&(meta.dev(), meta.ino())) {
            true => Err(refused(io::ErrorKind::InvalidInput, "is an input of this command: write the output elsewhere".into())),
            false => Ok(()),
        }
    }

    /// Whether a folder may be made at `dest`: nothing there, or an empty folder (returns true:
    /// it is filled), and neither inside an input folder nor holding one.
    fn check_dir(&self, dest: &Path) -> io::Result<bool> {
        if dest.file_name().is_none() {
            return Err(refused(io::ErrorKind::InvalidInput, "names no folder".into()));
        }
        let place = resolved(dest)?;
        for input in &self.dirs {
            if place == *input {
                return Err(refused(io::ErrorKind::InvalidInput, "is an input of this command: write the output elsewhere".into()));
            } else if place.starts_with(input) {
                return Err(refused(io::ErrorKind::InvalidInput, format!("is inside the input folder {}: write the output elsewhere", input.display())));
            } else if input.starts_with(&place) {
                return Err(refused(io::ErrorKind::InvalidInput, format!("holds the input folder {}: write the output elsewhere", input.display())));
            }
        }
        let meta = match fs::symlink_metadata(dest) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            other => other?,
        };
        self.not_an_input(&meta)?;
        if !meta.is_dir() {
            return Err(refused(io::ErrorKind::InvalidInput, format!("is not a folder ({})", kind(&meta))));
        }
        if fs::read_dir(dest)?.next().is_some() {
            return Err(refused(io::ErrorKind::AlreadyExists, "already exists and is not empty: remove it or choose another path".into()));
        }
        Ok(true)
    }

    /// Renames `tmp` to `dest` as the policy allows; `tmp` stays where it is on error.
    fn place(&self, tmp: &Path, dest: &Path) -> io::Result<()> {
        self.check(dest)?;
        match rename_noreplace(tmp, dest) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // Something appeared since: say what, and replace it only if allowed.
                self.check(dest)?;
                match self.replaces() {
                    true => fs::rename(tmp, dest),
                    false => Err(e),
                }
            }
            other => other,
        }
    }
}

fn refused(kind: io::ErrorKind, message: String) -> io::Error {
    io::Error::new(kind, message)
}

/// What a non-regular file is, in words.
fn kind(meta: &fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a folder"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a regular file"
    }
}

/// A file being written; it appears at its final path only on [`AtomicFile::commit`].
/// Dropped without commit, the temporary file is removed.
pub struct AtomicFile {
    tmp: PathBuf,
    dest: PathBuf,
    policy: Policy,
    writer: Option<BufWriter<File>>,
    placed: bool,
}

impl AtomicFile {
    /// Starts writing `dest`, as `policy` allows.
    pub fn create(dest: &Path, policy: &Policy) -> io::Result<Self> {
        policy.check(dest)?;
        let mut file = None;
        let tmp = temp_beside(dest, |tmp| {
            file = Some(File::create_new(tmp)?);
            Ok(())
        })?;
        let writer = file.map(BufWriter::new);
        Ok(AtomicFile { tmp, dest: dest.to_path_buf(), policy: policy.clone(), writer, placed: false })
    }

    /// Where the file is being written for now.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// The file being written, for positional writes and copies by the kernel; what was written
    /// through [`Write`] is flushed first.
    pub fn file(&mut self) -> io::Result<&File> {
        let writer = self.writer.as_mut().expect("not yet committed");
        writer.flush()?;
        Ok(writer.get_ref())
    }

    /// Flushes, syncs and renames into place.
    pub fn commit(self) -> io::Result<()> {
        self.commit_synced(true)
    }

    /// Flushes, syncs when `sync` (durable across a power loss, not only a crash of the
    /// process) and renames into place.
    pub fn commit_synced(mut self, sync: bool) -> io::Result<()> {
        let file = self.writer.take().expect("not yet committed").into_inner().map_err(|e| e.into_error())?;
        if sync {
            file.sync_all()?;
        }
        drop(file);
        self.policy.place(&self.tmp, &self.dest)?;
        self.placed = true;
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.as_mut().expect("not yet committed").write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.writer.as_mut().expect("not yet committed").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.placed {
            self.writer.take();
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `bytes` to `dest` atomically, as `policy` allows.
pub fn write(dest: &Path, bytes: &[u8], policy: &Policy) -> io::Result<()> {
    let mut f = AtomicFile::create(dest, policy)?;
    f.write_all(bytes)?;
    f.commit()
}

/// A folder being filled; it appears at its final path only on [`AtomicDir::commit`].
/// Dropped without commit, the temporary folder and its contents are removed.
pub struct AtomicDir {
    tmp: PathBuf,
    dest: PathBuf,
    /// `dest` is an empty folder, replaced on commit.
    fill: bool,
    committed: bool,
}

impl AtomicDir {
    /// Starts a new folder `dest` (creating its parents): it must not exist, or be an empty
    /// folder; it must be none of `policy`'s inputs, and neither inside an input folder nor
    /// hold one. An existing folder is never replaced otherwise, whatever the policy.
    pub fn create(dest: &Path, policy: &Policy) -> io::Result<Self> {
        let fill = policy.check_dir(dest)?;
        fs::create_dir_all(parent(dest))?;
        let tmp = temp_beside(dest, |tmp| fs::create_dir(tmp))?;
        Ok(AtomicDir { tmp, dest: dest.to_path_buf(), fill, committed: false })
    }

    /// Where to write the folder's files for now.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Syncs every file (when `sync`: durable across a power loss, not only a crash of the
    /// process) and renames the folder into place.
    pub fn commit(mut self, sync: bool) -> io::Result<()> {
        for entry in fs::read_dir(&self.tmp)? {
            let entry = entry?;
            if sync && !entry.file_type()?.is_symlink() {
                File::open(entry.path())?.sync_all()?;
            }
        }
        match self.fill {
            // rename(2) replaces an empty folder, and fails if it has been filled since.
            true => fs::rename(&self.tmp, &self.dest)?,
            false => rename_noreplace(&self.tmp, &self.dest).map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    refused(e.kind(), "already exists: remove it or choose another path".into())
                } else {
                    e
                }
            })?,
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

/// `path` made absolute with every link resolved, where it need not exist: its longest existing
/// ancestor canonical, the rest of it appended.
fn resolved(path: &Path) -> io::Result<PathBuf> {
    let (mut base, mut rest) = (path, Vec::new());
    loop {
        match fs::canonicalize(if base.as_os_str().is_empty() { Path::new(".") } else { base }) {
            Ok(mut place) => {
                for c in rest.iter().rev() {
                    match c {
                        Component::ParentDir => {
                            place.pop();
                        }
                        Component::Normal(name) => place.push(name),
                        _ => {}
                    }
                }
                return Ok(place);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                rest.extend(base.components().next_back());
                base = base.parent().ok_or(e)?;
            }
            Err(e) => return Err(e),
        }
    }
}

/// `dest`'s directory (`.` for a bare name).
fn parent(dest: &Path) -> &Path {
    dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// A new temporary path beside `dest` (so the final rename never crosses filesystems), made
/// exclusively by `make`, once the stale temporaries of `dest` are removed.
fn temp_beside(dest: &Path, mut make: impl FnMut(&Path) -> io::Result<()>) -> io::Result<PathBuf> {
    let name = dest.file_name().unwrap_or(OsStr::new("output")).as_bytes();
    // Room for the suffix within the 255 bytes of a name.
    let prefix = [b".", &name[..name.len().min(200)], b".factpatch-tmp."].concat();
    let legacy = [b".", name, b".tmp-"].concat();
    let dir = parent(dest);
    remove_stale(dir, &prefix, &legacy);
    for _ in 0..8 {
        let mut tmp = prefix.clone();
        tmp.extend_from_slice(format!("{}.{:016x}", std::process::id(), rand::random::<u64>()).as_bytes());
        let tmp = dir.join(OsString::from_vec(tmp));
        match make(&tmp) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            other => return other.map(|()| tmp),
        }
    }
    Err(io::Error::new(io::ErrorKind::AlreadyExists, "no free temporary name"))
}

/// Removes `dir`'s temporaries named `PREFIX<pid>.<16 hex digits>` or `LEGACY<pid>` whose
/// process is gone.
fn remove_stale(dir: &Path, prefix: &[u8], legacy: &[u8]) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = match (name.as_bytes().strip_prefix(prefix), name.as_bytes().strip_prefix(legacy)) {
            (Some(rest), _) => match rest.iter().position(|&b| b == b'.') {
                Some(dot) if rest[dot + 1..].len() == 16 && rest[dot + 1..].iter().all(u8::is_ascii_hexdigit) => parse_pid(&rest[..dot]),
                _ => None,
            },
            (None, Some(rest)) => parse_pid(rest),
            _ => None,
        };
        if pid.is_some_and(|pid| pid != std::process::id() && !alive(pid)) {
            let path = entry.path();
            let _ = match entry.file_type() {
                Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
                _ => fs::remove_file(&path),
            };
        }
    }
}

/// A process id: decimal digits, 1 to `i32::MAX` (never 0 or negative: `kill` would signal a group).
fn parse_pid(digits: &[u8]) -> Option<u32> {
    let pid: u32 = std::str::from_utf8(digits).ok().filter(|d| d.bytes().all(|b| b.is_ascii_digit()))?.parse().ok()?;
    (1..=i32::MAX as u32).contains(&pid).then_some(pid)
}

/// Whether process `pid` can still write (one we may not signal counts; a killed process that
/// its parent has not reaped yet, a zombie, does not).
fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 checks for existence only; `pid` is positive, so it names one process.
    let signalled = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0;
    if !signalled {
        return io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
    }
    // `/proc/PID/stat` is `PID (COMM) STATE …`; COMM may hold spaces and parentheses.
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, Some("Z" | "X"))
}

/// Renames `from` to `to` unless `to` exists (then `AlreadyExists`), atomically.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
        let (f, t) = (c(from)?, c(to)?);
        // SAFETY: two NUL-terminated paths that outlive the call, relative to the working directory.
        let r = unsafe { libc::syscall(libc::SYS_renameat2, libc::AT_FDCWD, f.as_ptr(), libc::AT_FDCWD, t.as_ptr(), libc::RENAME_NOREPLACE) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        // EINVAL: the filesystem does not support the flag; ENOSYS: the kernel predates it.
        if !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) {
            return Err(e);
        }
    }
    // Claim the name first: a hard link to the file, or an empty folder that rename(2) replaces.
    if fs::symlink_metadata(from)?.is_dir() {
        fs::create_dir(to)?;
        return fs::rename(from, to);
    }
    match fs::hard_link(from, to) {
        Ok(()) => fs::remove_file(from),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(e),
        // No hard links on this filesystem: check, then rename (not atomic).
        Err(_) if fs::symlink_metadata(to).is_ok() => Err(io::ErrorKind::AlreadyExists.into()),
        Err(_) => fs::rename(from, to),
    }
}
