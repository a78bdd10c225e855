//! Atomic outputs: everything is written under a temporary name in the destination's
//! directory, synced, then renamed into place, so an interrupted run leaves nothing behind.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// A file being written; it appears at its final path only on [`AtomicFile::commit`].
/// Dropped without commit, the temporary file is removed.
pub struct AtomicFile {
    tmp: PathBuf,
    dest: PathBuf,
    writer: Option<BufWriter<File>>,
}

impl AtomicFile {
    /// Starts writing `dest`; fails if `dest` already exists and `overwrite` is false.
    pub fn create(dest: &Path, overwrite: bool) -> io::Result<Self> {
        if !overwrite && dest.exists() {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} already exists", dest.display())));
        }
        let tmp = temp_sibling(dest);
        let file = File::create(&tmp)?;
        Ok(AtomicFile { tmp, dest: dest.to_path_buf(), writer: Some(BufWriter::new(file)) })
    }

    /// Flushes, syncs and renames into place.
    pub fn commit(mut self) -> io::Result<()> {
        let file = self.writer.take().expect("not yet committed").into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        fs::rename(&self.tmp, &self.dest)
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
        if self.writer.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `bytes` to `dest` atomically.
pub fn write(dest: &Path, bytes: &[u8], overwrite: bool) -> io::Result<()> {
    let mut f = AtomicFile::create(dest, overwrite)?;
    f.write_all(bytes)?;
    f.commit()
}

/// A directory being filled; it appears at its final path only on [`AtomicDir::commit`].
/// Dropped without commit, the temporary directory and its contents are removed.
pub struct AtomicDir {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl AtomicDir {
    /// Starts a new directory `dest`; fails if `dest` exists and is not an empty directory.
    pub fn create(dest: &Path) -> io::Result<Self> {
        if dest.exists() && (!dest.is_dir() || fs::read_dir(dest)?.next().is_some()) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} already exists", dest.display())));
        }
        let tmp = temp_sibling(dest);
        fs::create_dir_all(&tmp)?;
        Ok(AtomicDir { tmp, dest: dest.to_path_buf(), committed: false })
    }

    /// Where to write the directory's files for now.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Syncs every file (when `sync`: durable across a power loss, not only a crash of the
    /// process) and renames the directory into place.
    pub fn commit(mut self, sync: bool) -> io::Result<()> {
        for entry in fs::read_dir(&self.tmp)? {
            let path = entry?.path();
            if sync {
                File::open(path)?.sync_all()?;
            }
        }
        if self.dest.is_dir() {
            fs::remove_dir(&self.dest)?; // empty, checked on create
        }
        fs::rename(&self.tmp, &self.dest)?;
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

/// `dir/.name.tmp-PID` beside `dest`, so the final rename never crosses filesystems.
fn temp_sibling(dest: &Path) -> PathBuf {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    parent.join(format!(".{name}.tmp-{}", std::process::id()))
}
