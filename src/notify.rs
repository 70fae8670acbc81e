//! The service manager's readiness protocol (`sd_notify`), spoken directly over the
//! `NOTIFY_SOCKET` datagram socket so that no system library is needed.
//!
//! `main` opts in with [`init_from_env`]; until then, and when `NOTIFY_SOCKET` is unset, every
//! message is a no-op, so the library, the demo and the tests never depend on a service
//! manager. The server sends [`ready`] once every listener is serving, [`reloading`] and then
//! [`ready`] around each reload of the file (systemd's `Type=notify-reload` protocol), and
//! [`stopping`] when the drain starts.

use std::ffi::OsStr;
use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::OnceLock;

use tracing::warn;

/// The process's one notifier, set by [`init_from_env`].
static NOTIFIER: OnceLock<Notifier> = OnceLock::new();

/// Why `NOTIFY_SOCKET` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The variable names neither a path nor an abstract socket.
    #[error(
        "NOTIFY_SOCKET `{0}` is neither an absolute path nor an abstract socket name (`@name`)"
    )]
    BadAddress(String),
    /// The socket could not be created or its address is too long.
    #[error("NOTIFY_SOCKET `{addr}`: {source}")]
    Socket {
        addr: String,
        #[source]
        source: io::Error,
    },
}

/// A socket aimed at the service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// Aims at `addr` as `NOTIFY_SOCKET` spells it: an absolute path, or `@name` for a socket in
    /// the abstract namespace.
    pub fn new(addr: &OsStr) -> Result<Notifier, NotifyError> {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::ffi::OsStrExt;
        let text = || addr.to_string_lossy().into_owned();
        let bytes = addr.as_bytes();
        let socket_error = |source| NotifyError::Socket {
            addr: text(),
            source,
        };
        let target = match bytes.first() {
            Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]).map_err(socket_error)?,
            Some(b'/') => SocketAddr::from_pathname(addr).map_err(socket_error)?,
            _ => return Err(NotifyError::BadAddress(text())),
        };
        let socket = UnixDatagram::unbound().map_err(socket_error)?;
        // A service manager that is not reading must never stall the proxy: a message that
        // cannot be queued is dropped and logged.
        socket.set_nonblocking(true).map_err(socket_error)?;
        Ok(Notifier {
            socket,
            addr: target,
        })
    }

    /// Sends one message: newline-separated `KEY=value` assignments.
    pub fn send(&self, message: &str) -> io::Result<()> {
        self.socket
            .send_to_addr(message.as_bytes(), &self.addr)
            .map(drop)
    }
}

/// Reads `NOTIFY_SOCKET` and, when it is set, makes the messages of this module go there.
/// Returns whether it was set. Called once, by `main`; a second call changes nothing.
pub fn init_from_env() -> Result<bool, NotifyError> {
    let Some(addr) = std::env::var_os("NOTIFY_SOCKET").filter(|a| !a.is_empty()) else {
        return Ok(false);
    };
    let notifier = Notifier::new(&addr)?;
    let _ = NOTIFIER.set(notifier);
    Ok(true)
}

/// The service is serving (at start, or once a reload is over, whatever its outcome);
/// `status` is shown by `systemctl status`.
pub fn ready(status: &str) {
    send(&format!("READY=1\nSTATUS={}", one_line(status)));
}

/// A reload starts. The timestamp lets the service manager tell this reload from an earlier one.
pub fn reloading() {
    send(&format!(
        "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading the configuration",
        crate::sys::monotonic_usec()
    ));
}

/// The drain has started: the service is on its way out.
pub fn stopping() {
    send("STOPPING=1\nSTATUS=draining");
}

fn send(message: &str) {
    if let Some(notifier) = NOTIFIER.get()
        && let Err(error) = notifier.send(message)
    {
        warn!(%error, "could not notify the service manager");
    }
}

/// A status value must stay on its line: a newline would start another assignment.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_must_be_absolute_or_abstract() {
        assert!(matches!(
            Notifier::new(OsStr::new("relative/sock")),
            Err(NotifyError::BadAddress(_))
        ));
        assert!(Notifier::new(OsStr::new("@switchyard-test")).is_ok());
        assert!(Notifier::new(OsStr::new("/run/systemd/notify")).is_ok());
        let long = format!("/{}", "x".repeat(200));
        assert!(matches!(
            Notifier::new(OsStr::new(&long)),
            Err(NotifyError::Socket { .. })
        ));
    }

    #[test]
    fn messages_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("switchyard-notify-test-{}", std::process::id());
        let receiver = UnixDatagram::bind_addr(
            &SocketAddr::from_abstract_name(name.as_bytes()).expect("addr"),
        )
        .expect("bind");
        let notifier = Notifier::new(OsStr::new(&format!("@{name}"))).expect("notifier");
        notifier.send("READY=1").expect("send");
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn a_status_stays_on_one_line() {
        assert_eq!(one_line("a\nb\r\nc"), "a b  c");
    }
}
