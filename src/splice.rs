//! splice(2) plumbing shared by the TCP forwarder and the HTTP proxy: a per-thread pool of pipes
//! and the non-blocking call itself. Bytes spliced socket → pipe → socket never enter user
//! space: the pages the source socket received are handed to the destination socket, which on
//! loopback and most NICs saves both copies a read/write pair makes.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Capacity requested for each splice pipe (the kernel default is 64 KiB). On loopback 256 KiB
/// beat 64 KiB and was at least as fast as 1 MiB (see bench/README.md). A smaller pipe also
/// bounds the kernel memory one busy direction can hold and spends less of the per-user pipe
/// budget (`fs.pipe-user-pages-*`).
pub(crate) const PIPE_SIZE: usize = 256 * 1024;
/// Pipes kept per worker thread for reuse; more are closed when given back.
const PIPE_POOL_MAX: usize = 64;

/// A kernel pipe used as the splice buffer between two sockets.
pub(crate) struct Pipe {
    /// The end bytes are spliced out of.
    pub(crate) read: OwnedFd,
    /// The end bytes are spliced into.
    pub(crate) write: OwnedFd,
    /// Bytes the pipe holds at most, as the kernel reports it.
    pub(crate) capacity: usize,
}

impl Pipe {
    /// An empty pipe from this thread's pool, or a new one.
    pub(crate) fn take() -> io::Result<Pipe> {
        if let Some(pipe) = PIPES.with(|pipes| pipes.borrow_mut().pop()) {
            return Ok(pipe);
        }
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A larger pipe moves more per splice call. Failing to grow it (the per-user pipe
        // budget is spent) is fine: the default size still works.
        // SAFETY: plain fcntl on a descriptor we own.
        let size = unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_SIZE as libc::c_int,
            )
        };
        let capacity = if size > 0 {
            size as usize
        } else {
            // SAFETY: as above.
            let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
            if size > 0 { size as usize } else { 64 * 1024 }
        };
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }

    /// Returns an empty pipe to this thread's pool (or closes it when the pool is full).
    pub(crate) fn give_back(self) {
        PIPES.with(|pipes| {
            let mut pipes = pipes.borrow_mut();
            if pipes.len() < PIPE_POOL_MAX {
                pipes.push(self);
            }
        });
    }
}

/// splice(2) between two descriptors, non-blocking, moving pages rather than copying them.
pub(crate) fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice takes two descriptors and null offsets (both are sockets or pipes); it does
    // not touch memory of ours.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

thread_local! {
    /// Empty pipes ready for reuse.
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}
