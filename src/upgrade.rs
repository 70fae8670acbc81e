//! Zero-downtime binary upgrade: the running process hands its listening sockets to a new one.
//!
//! The old process, started with `--upgrade-socket PATH`, listens on that Unix socket. A new
//! process started with `--upgrade-from PATH` connects, receives every listening socket (the
//! descriptors travel with SCM_RIGHTS; a JSON line says which listener each one is), binds its
//! own listeners on them (and fresh sockets for listeners the old one did not have), and says
//! `READY`. The old process then stops accepting and drains. Both hold the same listening
//! sockets throughout, so the kernel queues new connections for whichever process accepts next
//! and none is refused.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::server::ServerHandle;

/// The most sockets one hand-over carries.
const MAX_SOCKETS: usize = 1024;
/// The longest description line accepted.
const MAX_HEADER: usize = 1 << 20;
/// Time the new process has to take the sockets and say it is ready.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(60);

/// Which listener a handed-over socket belongs to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Description {
    /// The listener's name in the old process.
    pub name: String,
    /// The address its file names.
    pub bind: SocketAddr,
    /// Whether it is a UDP socket (else a listening TCP socket).
    pub udp: bool,
}

/// Sockets received from the old process, taken one by one as listeners are bound.
#[derive(Debug)]
pub struct Inherited {
    sockets: Vec<(Description, Option<OwnedFd>)>,
    /// Kept open to say `READY` on.
    stream: UnixStream,
}

impl Inherited {
    /// Connects to the old process at `path` and takes its sockets.
    pub fn receive(path: &Path) -> io::Result<Inherited> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(HANDOVER_TIMEOUT))?;
        let (length, fds) = recv_with_fds(stream.as_raw_fd())?;
        if length > MAX_HEADER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the description of the sockets is too long",
            ));
        }
        let mut header = vec![0u8; length];
        (&stream).read_exact(&mut header)?;
        let descriptions: Vec<Description> = serde_json::from_slice(&header)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if descriptions.len() != fds.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} sockets described, {} received",
                    descriptions.len(),
                    fds.len()
                ),
            ));
        }
        info!(
            sockets = fds.len(),
            "took over the sockets of the old process"
        );
        Ok(Inherited {
            sockets: descriptions
                .into_iter()
                .zip(fds.into_iter().map(Some))
                .collect(),
            stream,
        })
    }

    /// The socket for a listener called `name` bound (in the file) to `bind`: the old
    /// listener of the same name and address, else any of the same fixed address.
    pub fn take(&mut self, name: &str, bind: SocketAddr, udp: bool) -> Option<OwnedFd> {
        let same = |d: &Description| d.bind == bind && d.udp == udp;
        let index = self
            .sockets
            .iter()
            .position(|(d, fd)| fd.is_some() && same(d) && d.name == name)
            .or_else(|| {
                (bind.port() != 0)
                    .then(|| {
                        self.sockets
                            .iter()
                            .position(|(d, fd)| fd.is_some() && same(d))
                    })
                    .flatten()
            })?;
        self.sockets[index].1.take()
    }

    /// Tells the old process that this one serves now: it stops accepting and drains.
    pub fn ready(mut self) -> io::Result<()> {
        let unused = self.sockets.iter().filter(|(_, fd)| fd.is_some()).count();
        if unused > 0 {
            info!(
                unused,
                "sockets of the old process that no listener here uses are closed"
            );
        }
        self.stream.write_all(b"READY\n")
    }
}

/// Offers the running server's sockets on `path` until a new process takes them and is ready;
/// then returns, and the caller starts the drain. A new process that fails before it is ready
/// changes nothing: the offer goes on.
pub async fn offer(path: PathBuf, handle: ServerHandle) -> io::Result<()> {
    // A socket file left by a process that died is in the way.
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    info!(path = %path.display(), "upgrade socket ready");
    loop {
        let (stream, _) = listener.accept().await?;
        let stream = stream.into_std()?;
        let handle = handle.clone();
        let result = tokio::task::spawn_blocking(move || hand_over(stream, &handle))
            .await
            .map_err(io::Error::other)?;
        match result {
            Ok(()) => {
                // The socket file is left in place: the new process may have bound its own
                // upgrade socket there already.
                info!("the new process is ready: no longer accepting, draining");
                return Ok(());
            }
            Err(error) => warn!(%error, "upgrade hand-over failed; still serving"),
        }
    }
}

/// Sends every listening socket, then waits for `READY`.
fn hand_over(stream: UnixStream, handle: &ServerHandle) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(HANDOVER_TIMEOUT))?;
    let sockets = handle.sockets();
    let descriptions: Vec<&Description> = sockets.iter().map(|(d, _)| d).collect();
    let header = serde_json::to_vec(&descriptions).map_err(io::Error::other)?;
    let fds: Vec<RawFd> = sockets.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    send_with_fds(stream.as_raw_fd(), header.len(), &fds)?;
    (&stream).write_all(&header)?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    if line.trim_end() == "READY" {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the new process went away before it was ready",
        ))
    }
}

/// Sends `length` as 4 bytes with `fds` attached (SCM_RIGHTS).
fn send_with_fds(socket: RawFd, length: usize, fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_SOCKETS {
        return Err(io::Error::other("too many listening sockets to hand over"));
    }
    let data = u32::try_from(length)
        .map_err(io::Error::other)?
        .to_le_bytes();
    let payload = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    // u64 elements: a cmsghdr needs 8-byte alignment, which a byte buffer does not promise.
    let mut control = vec![0u64; space.div_ceil(8).max(1)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: a zeroed msghdr is a valid empty message; every pointer set below points into a
    // buffer that outlives the sendmsg call, and the control buffer is CMSG_SPACE bytes long, as
    // the CMSG_* macros require.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            if cmsg.is_null() {
                return Err(io::Error::other("no room for the descriptors"));
            }
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                payload,
            );
        }
        loop {
            if libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL) >= 0 {
                break;
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
    }
    Ok(())
}

/// Receives the 4-byte length and the descriptors sent by [`send_with_fds`].
fn recv_with_fds(socket: RawFd) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut data = [0u8; 4];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_SOCKETS * size_of::<RawFd>()) as u32) } as usize;
    // u64 elements: a cmsghdr needs 8-byte alignment, which a byte buffer does not promise.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    let mut fds = Vec::new();
    // SAFETY: as in `send_with_fds`; the kernel writes at most `msg_controllen` bytes of control
    // data, and each SCM_RIGHTS descriptor it delivers is new and ours to own.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let n = loop {
            let n = libc::recvmsg(socket, &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_WAITALL);
            if n >= 0 {
                break n;
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        };
        // The descriptors are taken (and so closed if anything below fails) before any check.
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let count = bytes / size_of::<RawFd>();
                let first = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(first.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::other("too many descriptors: some were lost"));
        }
        if n as usize != data.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the old process closed the upgrade socket",
            ));
        }
    }
    Ok((u32::from_le_bytes(data) as usize, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_cross_a_socket_pair() {
        let (a, b) = UnixStream::pair().expect("pair");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        send_with_fds(a.as_raw_fd(), 7, &[listener.as_raw_fd()]).expect("send");
        let (length, fds) = recv_with_fds(b.as_raw_fd()).expect("receive");
        assert_eq!(length, 7);
        assert_eq!(fds.len(), 1);
        let received = std::net::TcpListener::from(fds.into_iter().next().expect("one"));
        assert_eq!(received.local_addr().expect("addr"), addr);
    }
}
