//! A memory-mapped input that another program truncates while factpatch reads it makes the
//! kernel raise SIGBUS on the next access past its new end. Without a handler the process dies
//! with "Bus error" and no word of which file; with [`install`], it prints one `error: ` line
//! naming the file (found in `/proc/self/maps` by the faulting address) and exits with status 1.
//! Outputs are still only temporaries then: the next run writing the same output removes them.
//!
//! The handler uses only async-signal-safe calls (`open`, `read`, `write`, `_exit`) and no
//! allocation.

/// Installs the SIGBUS handler for the whole process.
pub fn install() {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler has the
    // three-argument signature SA_SIGINFO requires.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
    }
}

extern "C" fn on_sigbus(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let mut path = [0u8; 4096];
    let mut message = Message { buf: [0; 4608], len: 0 };
    message.push(b"error: ");
    match mapped_file(addr, &mut path) {
        Some(len) => {
            message.push(&path[..len]);
            message.push(b": the file was truncated while it was read; nothing was written\n");
        }
        None => message.push(b"a memory-mapped input file was truncated while it was read; nothing was written\n"),
    }
    // SAFETY: write and _exit are async-signal-safe; the buffer outlives the call.
    unsafe {
        libc::write(2, message.buf.as_ptr().cast(), message.len);
        libc::_exit(1);
    }
}

/// A fixed-size message buffer; what does not fit is cut.
struct Message {
    buf: [u8; 4608],
    len: usize,
}

impl Message {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }
}

/// The path of the file mapped at `addr`, copied into `path`; its length.
fn mapped_file(addr: usize, path: &mut [u8]) -> Option<usize> {
    // SAFETY: open/read/close on a NUL-terminated literal path and stack buffers.
    let fd = unsafe { libc::open(c"/proc/self/maps".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    let mut chunk = [0u8; 8192];
    let mut line = [0u8; 4608];
    let (mut len, mut found) = (0, None);
    'read: loop {
        let n = unsafe { libc::read(fd, chunk.as_mut_ptr().cast(), chunk.len()) };
        if n <= 0 {
            break;
        }
        for &b in &chunk[..n as usize] {
            if b != b'\n' {
                if len < line.len() {
                    line[len] = b;
                }
                len += 1;
                continue;
            }
            if let Some(p) = path_if_contains(&line[..len.min(line.len())], addr) {
                let n = p.len().min(path.len());
                path[..n].copy_from_slice(&p[..n]);
                found = Some(n);
                break 'read;
            }
            len = 0;
        }
    }
    unsafe { libc::close(fd) };
    found
}

/// For a `/proc/self/maps` line `start-end perms offset dev inode path`, the path when the range
/// holds `addr` and a file is mapped there.
fn path_if_contains(line: &[u8], addr: usize) -> Option<&[u8]> {
    let dash = line.iter().position(|&b| b == b'-')?;
    let space = line.iter().position(|&b| b == b' ')?;
    let (start, end) = (hex(&line[..dash])?, hex(line.get(dash + 1..space)?)?);
    if !(start..end).contains(&addr) {
        return None;
    }
    let path = line.iter().position(|&b| b == b'/').map(|at| &line[at..])?;
    Some(path)
}

fn hex(digits: &[u8]) -> Option<usize> {
    digits.iter().try_fold(0usize, |v, &d| Some(v.checked_mul(16)? + (d as char).to_digit(16)? as usize))
}
