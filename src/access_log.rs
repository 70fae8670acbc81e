//! Access logs, written off the request path.
//!
//! A request formats its line and hands it to a bounded queue with `try_send`: when the writer
//! falls behind (a slow disk, a blocked stdout), lines are dropped and counted rather than
//! making requests wait. A TCP connection or UDP session hands over its values instead
//! ([`ConnectionLine`]), which the writer formats: many UDP sessions end together, on the one
//! task that reads the listener. One writer thread per destination drains the queue with
//! blocking writes, batching what has piled up into one write. SIGUSR1 asks every file writer to reopen
//! its file, for logrotate.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tracing::{info, warn};

use crate::config::{AccessLogConfig, AccessLogFormat, AccessLogTarget};
use crate::metrics::ListenerStats;

/// Lines a destination's queue holds before new ones are dropped.
pub const QUEUE_LINES: usize = 8192;

/// One destination: a queue and the thread that writes it.
#[derive(Debug)]
pub struct Writer {
    queue: SyncSender<Queued>,
    reopen: Arc<AtomicBool>,
    /// Lines queued and not yet written.
    pending: Arc<AtomicU64>,
}

/// A line in the queue, with the counters of the listener it belongs to: a line the writer
/// thread cannot write (a full disk, a closed pipe) is lost as surely as one a full queue
/// refused, and counts in the same listener's `switchyard_access_log_dropped_total`.
#[derive(Debug)]
struct Queued {
    line: Line,
    owner: Arc<ListenerStats>,
}

/// What the writer thread is handed: a line, or a connection's record that it formats itself.
#[derive(Debug)]
enum Line {
    Text(String),
    Connection(Box<ConnectionLine>),
}

impl Line {
    fn text(self) -> String {
        match self {
            Line::Text(text) => text,
            Line::Connection(c) => c.text(),
        }
    }
}

/// A TCP connection or UDP session that ended. The writer thread formats it, not the task that
/// ends the connection: thousands of UDP sessions may expire in one sweep of the one task that
/// reads the listener, and every client of the listener would wait while their lines were
/// formatted.
#[derive(Debug)]
pub struct ConnectionLine {
    /// How the line is written.
    pub format: AccessLogFormat,
    /// The listener's name.
    pub listener: Arc<str>,
    /// `tcp`, or `udp` for a session.
    pub protocol: &'static str,
    /// The client's address.
    pub client: SocketAddr,
    /// The backend.
    pub backend: SocketAddr,
    /// Bytes (UDP: payload bytes) from the client to the backend.
    pub sent: u64,
    /// Bytes from the backend to the client.
    pub received: u64,
    /// How long it lasted.
    pub duration: Duration,
    /// How it ended: `closed`, `idle_timeout`, `drained` or `error`; a UDP session
    /// `idle_timeout`, `drained`, `refused`, `moved`, `denied` or `closed`.
    pub outcome: &'static str,
    /// When it ended.
    pub at: SystemTime,
}

impl ConnectionLine {
    /// The line, newline included.
    fn text(&self) -> String {
        match self.format {
            AccessLogFormat::Json => {
                let mut line = to_json(&ConnectionJson {
                    time: rfc3339(self.at),
                    listener: &self.listener,
                    protocol: self.protocol,
                    client: self.client.to_string(),
                    backend: self.backend.to_string(),
                    bytes_sent: self.sent,
                    bytes_received: self.received,
                    duration_ms: self.duration.as_secs_f64() * 1e3,
                    outcome: self.outcome,
                });
                line.push('\n');
                line
            }
            AccessLogFormat::Combined => format!(
                "{} - - [{}] \"{} {}\" {} {} {} {:.3}\n",
                self.client.ip(),
                clf_time(self.at),
                if self.protocol == "udp" { "UDP" } else { "TCP" },
                self.backend,
                self.outcome,
                self.received,
                self.sent,
                self.duration.as_secs_f64() * 1e3,
            ),
        }
    }
}

impl Writer {
    /// Queues one line (with its newline) of the listener that `owner` counts for; drops it,
    /// and counts it there, when the queue is full.
    pub fn write(&self, line: String, owner: &Arc<ListenerStats>) {
        self.queue(Line::Text(line), owner);
    }

    /// Queues a connection's line, which the writer thread formats; drops and counts it when
    /// the queue is full.
    pub fn write_connection(&self, line: Box<ConnectionLine>, owner: &Arc<ListenerStats>) {
        self.queue(Line::Connection(line), owner);
    }

    fn queue(&self, line: Line, owner: &Arc<ListenerStats>) {
        self.pending.fetch_add(1, Relaxed);
        let queued = Queued {
            line,
            owner: Arc::clone(owner),
        };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.queue.try_send(queued)
        {
            self.pending.fetch_sub(1, Relaxed);
            owner.log_dropped.fetch_add(1, Relaxed);
        }
    }
}

/// Whether `target` can be opened as [`Writers::get`] opens it, found without keeping it open
/// or leaving a file behind, so that `check` refuses what a start or a reload would: a file
/// in a directory that does not exist, a directory, a file it may not write. A file that does
/// not exist yet is created and removed again; a FIFO that no one reads yet passes (a start
/// waits for its reader rather than failing).
pub fn try_open(target: &AccessLogTarget) -> Result<(), String> {
    use std::io::ErrorKind::{AlreadyExists, NotFound};
    use std::os::unix::fs::OpenOptionsExt;
    let AccessLogTarget::File(path) = target else {
        return Ok(());
    };
    let mut options = std::fs::OpenOptions::new();
    // Non-blocking, so that a FIFO without a reader answers at once instead of holding `check`.
    options.append(true).custom_flags(libc::O_NONBLOCK);
    let error = match options.open(path) {
        Ok(_) => return Ok(()),
        Err(error) if error.raw_os_error() == Some(libc::ENXIO) => return Ok(()),
        Err(error) if error.kind() == NotFound => match options.create_new(true).open(path) {
            Ok(_) => {
                let _ = std::fs::remove_file(path);
                return Ok(());
            }
            // Made meanwhile, or a link to a file yet to be made: a start opens it.
            Err(error) if error.kind() == AlreadyExists => return Ok(()),
            Err(error) => error,
        },
        Err(error) => error,
    };
    Err(open_failure(path, &error))
}

/// Why the access log file `path` could not be opened, naming the directory when it is the
/// directory that is missing (the system's "No such file or directory" would leave the reader
/// looking for the file).
pub fn open_failure(path: &Path, error: &std::io::Error) -> String {
    if error.kind() == std::io::ErrorKind::NotFound
        && let Some(dir) = path
            .parent()
            .filter(|dir| !dir.as_os_str().is_empty() && !dir.is_dir())
    {
        return format!(
            "cannot create {}: the directory {} does not exist",
            path.display(),
            dir.display()
        );
    }
    format!("cannot open {} for appending: {error}", path.display())
}

/// Every destination of the process, by target, so listeners that log to the same file share
/// one writer and one file handle.
#[derive(Debug, Default)]
pub struct Writers {
    writers: Mutex<HashMap<AccessLogTarget, Arc<Writer>>>,
}

impl Writers {
    /// The writer of `target`, started on first use.
    pub fn get(&self, target: &AccessLogTarget) -> std::io::Result<Arc<Writer>> {
        let mut writers = self
            .writers
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if let Some(writer) = writers.get(target) {
            return Ok(Arc::clone(writer));
        }
        let (queue, lines) = sync_channel(QUEUE_LINES);
        let reopen = Arc::new(AtomicBool::new(false));
        let output = Output::open(target)?;
        let flag = Arc::clone(&reopen);
        let pending = Arc::new(AtomicU64::new(0));
        let written = Arc::clone(&pending);
        let target_for_thread = target.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || drain(lines, output, &target_for_thread, &flag, &written))?;
        let writer = Arc::new(Writer {
            queue,
            reopen,
            pending,
        });
        writers.insert(target.clone(), Arc::clone(&writer));
        Ok(writer)
    }

    /// Waits, up to `limit`, until every queued line is written: the lines of the last requests
    /// of a drain are not lost when the process exits.
    pub async fn flush(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        let writers: Vec<Arc<Writer>> = self
            .writers
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .values()
            .cloned()
            .collect();
        while writers.iter().any(|w| w.pending.load(Relaxed) > 0)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Forgets the destinations no listener of a new configuration logs to. Their writer
    /// threads write what is still queued (and what connections of the old settings still
    /// send), then end and close their files once the last of those lets go: otherwise a file a
    /// reload moved away from stayed open, with its thread, until the process ended, and each
    /// SIGUSR1 created it again.
    pub fn retain(&self, in_use: &[&AccessLogTarget]) {
        self.writers
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .retain(|target, _| in_use.contains(&target));
    }

    /// Asks every file writer to reopen its file (SIGUSR1).
    pub fn reopen(&self) {
        let writers = self
            .writers
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        for writer in writers.values() {
            writer.reopen.store(true, Relaxed);
        }
    }
}

/// Where a writer thread writes.
enum Output {
    Stdout,
    Stderr,
    File(PathBuf, std::fs::File),
}

impl Output {
    fn open(target: &AccessLogTarget) -> std::io::Result<Output> {
        Ok(match target {
            AccessLogTarget::Stdout => Output::Stdout,
            AccessLogTarget::Stderr => Output::Stderr,
            AccessLogTarget::File(path) => Output::File(
                path.clone(),
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        })
    }

    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Output::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(bytes)?;
                out.flush()
            }
            Output::Stderr => std::io::stderr().lock().write_all(bytes),
            Output::File(_, file) => file.write_all(bytes),
        }
    }
}

/// The writer thread: until every sender is gone, write what arrives, in batches.
fn drain(
    lines: Receiver<Queued>,
    mut output: Output,
    target: &AccessLogTarget,
    reopen: &AtomicBool,
    pending: &AtomicU64,
) {
    let mut batch = String::new();
    // The listener of each line in the batch, to count the lines a failed write loses.
    let mut owners: Vec<Arc<ListenerStats>> = Vec::new();
    // Whether the last write failed: a full disk fails every write, and one warning (and one
    // when writes work again) says it without flooding the log.
    let mut failing = false;
    let add = |queued: Queued, batch: &mut String, owners: &mut Vec<Arc<ListenerStats>>| {
        batch.push_str(&queued.line.text());
        owners.push(queued.owner);
    };
    loop {
        match lines.recv_timeout(Duration::from_secs(1)) {
            Ok(queued) => {
                add(queued, &mut batch, &mut owners);
                while batch.len() < 64 * 1024 {
                    match lines.try_recv() {
                        Ok(queued) => add(queued, &mut batch, &mut owners),
                        Err(_) => break,
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        if reopen.swap(false, Relaxed)
            && let Output::File(path, _) = &output
        {
            match Output::open(target) {
                Ok(fresh) => output = fresh,
                Err(error) => warn!(path = %path.display(), %error, "cannot reopen the access log"),
            }
        }
        if !batch.is_empty() {
            match output.write_all(batch.as_bytes()) {
                Ok(()) => {
                    if failing {
                        info!(?target, "access log writes work again");
                    }
                    failing = false;
                }
                Err(error) => {
                    if !failing {
                        warn!(?target, %error, "access log write failed: lines are dropped and counted until writes work again");
                    }
                    failing = true;
                    for owner in &owners {
                        owner.log_dropped.fetch_add(1, Relaxed);
                    }
                }
            }
            batch.clear();
            pending.fetch_sub(owners.len() as u64, Relaxed);
            owners.clear();
        }
    }
}

/// How an http exchange ended, when it did not end with the whole response delivered: what tells
/// a backend that died mid-body from a client that left, both of which otherwise log the
/// backend's status with part of its bytes. One byte, carried with the request's trace; only
/// the states every path (HTTP/1.1 and HTTP/2 clients, HTTP/1.1 and HTTP/2 backends, compressed
/// or spliced) can tell apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum End {
    /// The whole response reached the client (or an answer of the proxy's own did): no field.
    #[default]
    Complete,
    /// The backend ended the body before its end: it closed or reset its connection (an HTTP/2
    /// backend its stream), sent fewer bytes than its Content-Length or no last chunk, or broke
    /// its chunked framing. A reset and a short body are one state, as an HTTP/2 backend's
    /// stream gives no way to tell them apart.
    BackendCut,
    /// The backend sent nothing of its body for the pool's `response_timeout`.
    BackendTimeout,
    /// The client went away: it closed or reset its connection, or reset its HTTP/2 stream,
    /// before the response was through (a 499 is one that left before the response head).
    ClientGone,
    /// The client stopped reading: a write to it waited longer than allowed.
    ClientStalled,
    /// A drain deadline (its backend's, or the process's) cut the response or the upgraded
    /// connection.
    Drained,
    /// The proxy failed the body itself (its compressor failed).
    ProxyError,
}

impl End {
    /// Every state but [`End::Complete`], in the order of their codes: the metric's rows.
    pub const INCOMPLETE: [End; 6] = [
        End::BackendCut,
        End::BackendTimeout,
        End::ClientGone,
        End::ClientStalled,
        End::Drained,
        End::ProxyError,
    ];

    /// The word the access log and the metric use; `None` for an exchange that ended normally.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            End::Complete => return None,
            End::BackendCut => "backend_cut",
            End::BackendTimeout => "backend_timeout",
            End::ClientGone => "client_gone",
            End::ClientStalled => "client_stalled",
            End::Drained => "drained",
            End::ProxyError => "proxy_error",
        })
    }

    /// Whether the backend ended it (and outlier detection counts it against the backend).
    pub fn is_backends(self) -> bool {
        matches!(self, End::BackendCut | End::BackendTimeout)
    }

    /// The state whose code is `code` (see [`End::code`]); `None` for any other byte.
    pub fn from_code(code: u8) -> Option<End> {
        std::iter::once(End::Complete)
            .chain(End::INCOMPLETE)
            .find(|end| end.code() == code)
    }

    /// The state as one byte, for an atomic shared with a task that relays a body.
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// What one request's line says.
#[derive(Debug, Default)]
pub struct Entry<'a> {
    pub listener: &'a str,
    pub request_id: &'a [u8],
    pub client: Option<SocketAddr>,
    pub method: &'a str,
    pub host: &'a [u8],
    pub target: &'a str,
    pub protocol: &'a str,
    pub route: &'a str,
    pub pool: Option<&'a str>,
    pub backend: Option<SocketAddr>,
    pub status: u16,
    pub bytes: u64,
    pub duration: Duration,
    pub upstream: Option<Duration>,
    /// Backends tried: written only when more than one was, so that a retry shows which
    /// requests it concerned without lengthening every line.
    pub attempts: usize,
    pub referer: &'a [u8],
    pub user_agent: &'a [u8],
    /// How the exchange ended: written only when it did not end normally.
    pub end: End,
}

/// Formats `entry` as one line, newline included.
pub fn format(config: &AccessLogConfig, entry: &Entry<'_>) -> String {
    match config.format {
        AccessLogFormat::Json => json(entry),
        AccessLogFormat::Combined => combined(entry),
    }
}

fn json(e: &Entry<'_>) -> String {
    let mut line = to_json(&RequestJson {
        time: rfc3339(SystemTime::now()),
        listener: e.listener,
        request_id: String::from_utf8_lossy(e.request_id),
        client: e.client.map(|c| c.to_string()),
        method: e.method,
        host: String::from_utf8_lossy(e.host),
        path: e.target,
        protocol: e.protocol,
        route: e.route,
        pool: e.pool,
        backend: e.backend.map(|b| b.to_string()),
        status: e.status,
        bytes: e.bytes,
        duration_ms: e.duration.as_secs_f64() * 1e3,
        upstream_ms: e.upstream.map(|u| u.as_secs_f64() * 1e3),
        attempts: (e.attempts > 1).then_some(e.attempts),
        end: e.end.name(),
    });
    line.push('\n');
    line
}

/// A request's JSON line. A struct rather than a `json!` map, whose keys come out sorted: the
/// fields are written in the order the README lists them, which people reading the raw file
/// (and tools matching it) rely on. Fields that do not apply are left out.
#[derive(Serialize)]
struct RequestJson<'a> {
    time: String,
    listener: &'a str,
    request_id: Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client: Option<String>,
    method: &'a str,
    host: Cow<'a, str>,
    path: &'a str,
    protocol: &'a str,
    route: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pool: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backend: Option<String>,
    status: u16,
    bytes: u64,
    duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempts: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    end: Option<&'static str>,
}

/// A TCP connection's or UDP session's JSON line, its fields in the README's order.
#[derive(Serialize)]
struct ConnectionJson<'a> {
    time: String,
    listener: &'a str,
    protocol: &'a str,
    client: String,
    backend: String,
    bytes_sent: u64,
    bytes_received: u64,
    duration_ms: f64,
    outcome: &'a str,
}

/// Serialises a line's fields. Neither struct holds a map with non-string keys nor anything
/// whose serialisation can fail, so the empty object is only a formality.
fn to_json(fields: &impl Serialize) -> String {
    serde_json::to_string(fields).unwrap_or_else(|_| "{}".to_owned())
}

/// The NGINX/Apache "combined" format, with the request id and the time in milliseconds
/// appended, and after them how the exchange ended when it did not end normally (a parser of
/// the fields before it is not disturbed by one more at the end).
fn combined(e: &Entry<'_>) -> String {
    let quoted = |b: &[u8]| {
        if b.is_empty() {
            "-".to_owned()
        } else {
            escape(b)
        }
    };
    let mut line = String::with_capacity(256);
    let client = e.client.map_or("-".to_owned(), |c| c.ip().to_string());
    let _ = writeln!(
        line,
        "{client} - - [{}] \"{} {} {}\" {} {} \"{}\" \"{}\" {} {:.3}",
        clf_time(SystemTime::now()),
        e.method,
        escape(e.target.as_bytes()),
        e.protocol,
        e.status,
        e.bytes,
        quoted(e.referer),
        quoted(e.user_agent),
        escape_unquoted(e.request_id),
        e.duration.as_secs_f64() * 1e3,
    );
    if let Some(end) = e.end.name() {
        line.pop();
        line.push(' ');
        line.push_str(end);
        line.push('\n');
    }
    line
}

/// A value a client sent, made safe inside a quoted field of a text log line: `"`, `\`,
/// control and non-ASCII bytes become `\xHH` (as NGINX writes them), so no value can end its
/// field or forge a line.
fn escape(bytes: &[u8]) -> String {
    escape_except(bytes, b' ')
}

/// Like [`escape`], for a field that is not quoted: a space becomes `\x20` too, so that the
/// value stays one field.
fn escape_unquoted(bytes: &[u8]) -> String {
    escape_except(bytes, 0)
}

/// `bytes` with everything but printable ASCII other than `"` and `\`, and `keep`, as `\xHH`.
fn escape_except(bytes: &[u8], keep: u8) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if (b.is_ascii_graphic() && b != b'"' && b != b'\\') || (b == keep && keep != 0) {
            out.push(b as char);
        } else {
            let _ = write!(out, "\\x{b:02X}");
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day), in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`). Also dates certificates in their warnings.
pub(crate) fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

fn split(time: SystemTime) -> (i64, u32, u32, u64, u32) {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (y, m, d) = civil((secs / 86_400) as i64);
    (y, m, d, secs % 86_400, since.subsec_millis())
}

/// `2026-11-27T01:02:03.456Z`.
fn rfc3339(time: SystemTime) -> String {
    let (y, m, d, s, ms) = split(time);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// `27/Nov/2026:01:02:03 +0000`.
fn clf_time(time: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (y, m, d, s, _) = split(time);
    format!(
        "{d:02}/{}/{y:04}:{:02}:{:02}:{:02} +0000",
        MONTHS[(m as usize - 1) % 12],
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        assert_eq!(
            escape(b"a\" 200 1 \"x\\\n\xff"),
            "a\\x22 200 1 \\x22x\\x5C\\x0A\\xFF"
        );
    }

    #[test]
    fn an_unquoted_field_cannot_split_into_more() {
        // The request id stands unquoted between the user agent and the duration: a space in
        // it (an id a backend or a header rule set) must not make more fields of one.
        let entry = Entry {
            request_id: b"id 200 9 \"x\"",
            method: "GET",
            target: "/",
            protocol: "HTTP/2.0",
            status: 200,
            ..Entry::default()
        };
        let line = combined(&entry);
        let after_agent = line.rsplit_once("\"-\" ").expect("the user agent field").1;
        let fields: Vec<&str> = after_agent.split_whitespace().collect();
        assert_eq!(fields.len(), 2, "{line}");
        assert_eq!(fields[0], "id\\x20200\\x209\\x20\\x22x\\x22", "{line}");
    }

    #[test]
    fn calendar() {
        assert_eq!(civil(0), (1970, 1, 1));
        // 2024-02-29, a leap day: 19782 days after the epoch.
        assert_eq!(civil(19_782), (2024, 2, 29));
        let t = UNIX_EPOCH + Duration::from_millis(1_795_741_323_456);
        assert_eq!(rfc3339(t), "2026-11-27T01:02:03.456Z");
        assert_eq!(clf_time(t), "27/Nov/2026:01:02:03 +0000");
    }

    #[test]
    fn lines() {
        let entry = Entry {
            listener: "web",
            request_id: b"abc",
            method: "GET",
            host: b"example.com",
            target: "/a?b=\"c\"",
            protocol: "HTTP/1.1",
            route: "0",
            status: 200,
            bytes: 12,
            ..Entry::default()
        };
        let line = json(&entry);
        let parsed: serde_json::Value = serde_json::from_str(&line).expect("json");
        assert_eq!(parsed["status"], 200);
        assert_eq!(parsed["path"], "/a?b=\"c\"");
        assert!(parsed.get("backend").is_none());
        assert!(parsed.get("end").is_none(), "{line}");
        let line = combined(&entry);
        assert!(line.starts_with("- - - ["), "{line}");
        assert!(
            line.contains("\"GET /a?b=\\x22c\\x22 HTTP/1.1\" 200 12 \"-\" \"-\" abc"),
            "{line}"
        );
        assert!(line.ends_with(".000\n"), "{line}");
        let cut = Entry {
            end: End::BackendCut,
            ..entry
        };
        let parsed: serde_json::Value = serde_json::from_str(&json(&cut)).expect("json");
        assert_eq!(parsed["end"], "backend_cut");
        let line = combined(&cut);
        assert!(line.ends_with(" abc 0.000 backend_cut\n"), "{line}");
    }

    #[test]
    fn end_codes_round_trip() {
        for end in std::iter::once(End::Complete).chain(End::INCOMPLETE) {
            assert_eq!(End::from_code(end.code()), Some(end));
            assert_eq!(end.name().is_none(), end == End::Complete);
        }
        assert_eq!(End::from_code(u8::MAX), None);
    }

    #[test]
    fn connection_lines_name_their_protocol() {
        let line = |protocol, format| {
            ConnectionLine {
                format,
                listener: Arc::from("dns"),
                protocol,
                client: "192.0.2.1:5353".parse().expect("addr"),
                backend: "10.0.0.2:53".parse().expect("addr"),
                sent: 40,
                received: 120,
                duration: Duration::from_millis(250),
                outcome: "idle_timeout",
                at: UNIX_EPOCH + Duration::from_millis(1_795_741_323_456),
            }
            .text()
        };
        let udp = line("udp", AccessLogFormat::Combined);
        assert_eq!(
            udp,
            "192.0.2.1 - - [27/Nov/2026:01:02:03 +0000] \"UDP 10.0.0.2:53\" idle_timeout 120 40 250.000\n"
        );
        let tcp = line("tcp", AccessLogFormat::Combined);
        assert!(tcp.contains("\"TCP 10.0.0.2:53\""), "{tcp}");
        let parsed: serde_json::Value =
            serde_json::from_str(&line("udp", AccessLogFormat::Json)).expect("json");
        assert_eq!(parsed["protocol"], "udp");
        assert_eq!(parsed["bytes_received"], 120);
        assert_eq!(parsed["time"], "2026-11-27T01:02:03.456Z");
    }
}
