//! Process-level setup that the operating system needs from a proxy.

/// Raises the soft limit on open files to the hard limit. Every proxied TCP connection holds two
/// descriptors (and a pipe pair while splicing), so the usual soft limit of 1024 would cap a
/// proxy at a few hundred connections. Returns the limit now in force.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and reads nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

/// Fixes glibc malloc's trim and mmap thresholds instead of letting it adapt them.
///
/// By default glibc returns the top of the heap to the kernel whenever more than 128 KiB there is
/// free, and raises that threshold only after an mmapped block is freed. A proxy frees and
/// reallocates buffers at the top of the heap at every request, so the heap can fall into a
/// cycle of shrinking and growing again: measured on the small keep-alive benchmark, about one
/// page fault every two requests and a quarter less throughput, in some runs and not others,
/// depending on where the buffers happened to land. Keeping up to 16 MiB of free heap ends the
/// cycle; blocks of 1 MiB or more are still mapped on their own, so one large buffer does not
/// pin the heap. Does nothing with other C libraries.
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt takes no pointers and only sets two of glibc's malloc parameters (it
    // takes the allocator's locks itself).
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// The index of the network interface `name` (`eth0`), what an IPv6 link-local address needs
/// to say which link it is on; `None` if there is no such interface.
pub fn interface_index(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: if_nametoindex reads the NUL-terminated string we own and keeps no pointer to it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// `CLOCK_MONOTONIC_COARSE`: the monotonic clock at the resolution of the kernel's tick (1 to
/// 4 ms). Reading it costs a few nanoseconds against a few tens for the precise clock (on a VM
/// often more), so it serves timestamps that are only compared with timeouts of seconds, such
/// as when an idle backend connection was pooled.
pub fn coarse_monotonic() -> std::time::Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the struct we pass; CLOCK_MONOTONIC_COARSE exists on
    // every Linux since 2.6.32.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    std::time::Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// Connections that ended or were parked since start: each freed a task and buffers. Counted so
/// that free memory is handed back only after something freed some (see
/// [`release_free_memory`]).
static CONNECTIONS_RELEASED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Notes that a connection ended or was parked.
pub fn note_connection_released() {
    CONNECTIONS_RELEASED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Connections that ended or were parked since start.
pub fn connections_released() -> u64 {
    CONNECTIONS_RELEASED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Hands the heap's free pages back to the kernel (glibc's `malloc_trim`), wherever they are in
/// the heap, not only at its top. With the trim threshold raised (see [`tune_allocator`]),
/// memory freed after a burst (read buffers of many connections served at once) would
/// otherwise stay in the process for good. Returns whether anything was released.
///
/// It costs time in proportion to the heap's free chunks (glibc advises the kernel about each
/// one again on every call, released before or not), and allocations from the arena being
/// walked wait meanwhile: callers space the calls out accordingly.
#[cfg(target_env = "gnu")]
pub fn release_free_memory() -> bool {
    // SAFETY: malloc_trim only walks glibc's own free lists, under their locks.
    unsafe { libc::malloc_trim(0) != 0 }
}

/// `CLOCK_MONOTONIC` in microseconds, the clock the service manager compares a reload's
/// `MONOTONIC_USEC` with (`std::time::Instant` does not expose its value).
pub fn monotonic_usec() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the struct we pass; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    (now.tv_sec as u64) * 1_000_000 + (now.tv_nsec as u64) / 1_000
}

/// An inotify instance, non-blocking and closed on exec, for watching the configuration's
/// directory: editors replace files by rename, so the file itself cannot be watched.
pub struct Inotify {
    fd: std::os::fd::OwnedFd,
}

/// One inotify event: which watch, what happened, and the name within a watched directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InotifyEvent {
    /// The watch descriptor [`Inotify::add_watch`] returned.
    pub wd: i32,
    /// `IN_*` bits.
    pub mask: u32,
    /// The entry of the watched directory the event is about (empty for the directory itself).
    pub name: std::ffi::OsString,
}

impl Inotify {
    /// A new instance with no watches.
    pub fn new() -> std::io::Result<Inotify> {
        use std::os::fd::FromRawFd;
        // SAFETY: inotify_init1 takes flags only and returns a new descriptor or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a descriptor we just opened and own alone.
        Ok(Inotify {
            fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Watches `path` for the `IN_*` events in `mask`; returns the watch descriptor.
    pub fn add_watch(&self, path: &std::path::Path, mask: u32) -> std::io::Result<i32> {
        use std::os::fd::AsRawFd;
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: the descriptor is ours and open, and path is a NUL-terminated string that
        // outlives the call.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), path.as_ptr(), mask) };
        if wd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(wd)
    }

    /// Registers the instance with the Tokio reactor (within a runtime), to wait for events.
    pub fn into_async(self) -> std::io::Result<tokio::io::unix::AsyncFd<Inotify>> {
        // SAFETY: the descriptor is an `OwnedFd` that this value owns and never replaces, so it
        // stays open and the same for as long as the `AsyncFd` holds the value.
        unsafe { tokio::io::unix::AsyncFd::register(self) }.map_err(std::io::Error::from)
    }

    /// Reads the events queued now; `WouldBlock` when there are none.
    pub fn read_events(&self) -> std::io::Result<Vec<InotifyEvent>> {
        use std::os::fd::AsRawFd;
        // Room for many events at once; one event with the longest name fits too.
        let mut buf = [0u8; 8192];
        // SAFETY: the descriptor is ours and open; read writes at most buf.len() bytes into buf.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(parse_inotify_events(&buf[..n as usize]))
    }
}

impl std::os::fd::AsRawFd for Inotify {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// Splits what `read` returned into events (`struct inotify_event`: wd, mask, cookie, len, then
/// `len` bytes of NUL-padded name). A truncated tail is ignored rather than read past.
fn parse_inotify_events(mut bytes: &[u8]) -> Vec<InotifyEvent> {
    use std::os::unix::ffi::OsStrExt;
    const HEADER: usize = 16;
    let mut events = Vec::new();
    while bytes.len() >= HEADER {
        let word = |i: usize| [bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]];
        let wd = i32::from_ne_bytes(word(0));
        let mask = u32::from_ne_bytes(word(4));
        let len = u32::from_ne_bytes(word(12)) as usize;
        let Some(name) = bytes.get(HEADER..HEADER + len) else {
            break;
        };
        let name = name.split(|&b| b == 0).next().unwrap_or_default();
        events.push(InotifyEvent {
            wd,
            mask,
            name: std::ffi::OsStr::from_bytes(name).to_os_string(),
        });
        bytes = &bytes[HEADER + len..];
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(wd: i32, mask: u32, name: &[u8], len: u32) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&wd.to_ne_bytes());
        bytes.extend_from_slice(&mask.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes());
        bytes.extend_from_slice(&len.to_ne_bytes());
        bytes.extend_from_slice(name);
        bytes.resize(16 + len as usize, 0);
        bytes
    }

    #[test]
    fn inotify_events_are_split_and_names_unpadded() {
        let mut bytes = event(1, libc::IN_MOVED_TO, b"a.toml", 16);
        bytes.extend(event(1, libc::IN_IGNORED, b"", 0));
        bytes.extend(event(2, libc::IN_MODIFY, b"b", 4)[..18].iter());
        let events = parse_inotify_events(&bytes);
        assert_eq!(events.len(), 2, "the truncated third is dropped");
        assert_eq!(events[0].name, "a.toml");
        assert_eq!(events[0].mask, libc::IN_MOVED_TO);
        assert_eq!(events[1].name, "");
        assert_eq!(events[1].mask, libc::IN_IGNORED);
    }

    #[test]
    fn the_monotonic_clock_moves_forward() {
        let a = monotonic_usec();
        let b = monotonic_usec();
        assert!(a > 0 && b >= a);
    }

    #[test]
    fn a_watched_directory_reports_a_rename_into_it() {
        let dir = std::env::temp_dir().join(format!("switchyard-inotify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let inotify = Inotify::new().expect("inotify");
        let wd = inotify
            .add_watch(&dir, libc::IN_MOVED_TO | libc::IN_CLOSE_WRITE)
            .expect("watch");
        assert!(matches!(
            inotify.read_events().map_err(|e| e.kind()),
            Err(std::io::ErrorKind::WouldBlock)
        ));
        std::fs::write(dir.join("tmp"), b"x").expect("write");
        std::fs::rename(dir.join("tmp"), dir.join("final")).expect("rename");
        let events = inotify.read_events().expect("events");
        assert!(
            events
                .iter()
                .any(|e| e.wd == wd && e.name == "final" && e.mask & libc::IN_MOVED_TO != 0),
            "{events:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
