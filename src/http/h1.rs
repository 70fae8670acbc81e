//! HTTP/1.1 message heads and body framing (RFC 9112), strictly.
//!
//! Parsing is `httparse`'s; this module adds what a proxy must decide on top of it: how long the
//! body is, whether the connection stays open, and which messages are too ambiguous to forward
//! (request smuggling). Anything two servers could read differently is refused: Content-Length
//! together with Transfer-Encoding, differing Content-Lengths, a Transfer-Encoding other than
//! `chunked`, bare LF line ends, obs-fold, whitespace before a colon, bad bytes in names.
//!
//! Heads keep the bytes they were parsed from and refer into them by range, so parsing does not
//! copy. What is sent on is always re-serialised from the parsed fields, with framing headers
//! the proxy writes itself; hop-by-hop headers never pass.

use std::borrow::Cow;
use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

/// Most header fields accepted in one head (more is a 431).
pub const MAX_HEADERS: usize = 100;
/// Largest head accepted, request line or status line included (more is a 431, or a 414 while
/// still inside the request line).
pub const MAX_HEAD_SIZE: usize = 32 * 1024;
/// Longest request line accepted (more is a 414).
pub const MAX_REQUEST_LINE: usize = 16 * 1024;
/// Largest trailer section accepted after a chunked body.
pub const MAX_TRAILER_SIZE: usize = 16 * 1024;

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the sender closes (responses only).
    UntilClose,
}

/// What a response head tells the client about its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// Nothing: an HTTP/1.1 connection stays open unless told otherwise.
    Implied,
    /// `Connection: keep-alive`: an HTTP/1.0 client closes after any response that does not
    /// say so (RFC 9112 section 9.3), and would otherwise wait for a close that never comes.
    KeepAlive,
    /// `Connection: close`: the proxy closes after this response.
    Close,
}

impl Persistence {
    /// For the response to a client of HTTP/1.`minor_version`, after which the proxy closes
    /// the connection if `close`.
    pub fn of(close: bool, minor_version: u8) -> Persistence {
        match (close, minor_version) {
            (true, _) => Persistence::Close,
            (false, 0) => Persistence::KeepAlive,
            (false, _) => Persistence::Implied,
        }
    }

    /// The Connection field line to write, possibly none.
    pub fn field(self) -> &'static [u8] {
        match self {
            Persistence::Implied => b"",
            Persistence::KeepAlive => b"connection: keep-alive\r\n",
            Persistence::Close => b"connection: close\r\n",
        }
    }
}

/// Why a head was refused. Each maps to one status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// Syntax or framing that must not be forwarded.
    #[error("malformed: {0}")]
    Malformed(&'static str),
    /// The request line alone is longer than [`MAX_REQUEST_LINE`].
    #[error("request line too long")]
    UriTooLong,
    /// The head is longer than [`MAX_HEAD_SIZE`] or has more than [`MAX_HEADERS`] fields.
    #[error("header section too large")]
    TooLarge,
    /// A feature this proxy does not implement (a transfer coding other than chunked, CONNECT).
    #[error("not implemented: {0}")]
    NotImplemented(&'static str),
}

impl HeadError {
    /// The status a client gets for this error.
    pub fn status(&self) -> u16 {
        match self {
            HeadError::Malformed(_) => 400,
            HeadError::UriTooLong => 414,
            HeadError::TooLarge => 431,
            HeadError::NotImplemented(_) => 501,
        }
    }
}

/// A parsed request head.
#[derive(Debug, Clone)]
pub struct RequestHead {
    raw: Bytes,
    method: Range<usize>,
    /// The request target in origin form (or `*`).
    target: Target,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// End-to-end fields, in order (hop-by-hop and framing fields already removed).
    fields: Vec<(Range<usize>, Range<usize>)>,
    /// How the body is delimited.
    pub framing: Framing,
    /// The client asked to close after this exchange (or HTTP/1.0 without keep-alive).
    pub close: bool,
    /// The client sent `Expect: 100-continue` and may wait for a 100 before its body.
    pub expect_continue: bool,
    /// A WebSocket upgrade request (`Connection: upgrade`, `Upgrade: websocket`, GET, HTTP/1.1,
    /// no body). Other upgrades (h2c, ...) are not forwarded.
    pub websocket: bool,
    /// The client's TE (a hop-by-hop field, not among `fields`) lists `trailers`: it will take
    /// trailers. An HTTP/2 backend is told so with `te: trailers`, which gRPC servers require.
    pub te_trailers: bool,
    /// Readable one way only by us, but a shape other servers may read differently (a body on
    /// GET or HEAD, a repeated Content-Length). It is forwarded re-framed, and both connections
    /// are closed after the response so that no other request can share the ambiguity.
    pub ambiguous: bool,
    /// The Host field (or the authority of an absolute-form target), if any.
    host: Option<Range<usize>>,
}

/// Where a request's origin-form target is.
#[derive(Debug, Clone)]
enum Target {
    /// In the head's bytes, as sent (origin form, or the path of an absolute-form target).
    Raw(Range<usize>),
    /// An absolute-form target with neither path nor query: `/` (RFC 9112 section 3.2.1).
    Root,
    /// An absolute-form target with a query but no path (`http://a?q`): `/` and the query,
    /// which are not contiguous in the head; or a target whose dot segments were removed.
    /// Rare enough to be worth its allocation.
    Owned(Box<str>),
}

/// A parsed response head.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    raw: Bytes,
    /// Status code.
    pub status: u16,
    reason: Range<usize>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    fields: Vec<(Range<usize>, Range<usize>)>,
    /// How the body is delimited.
    pub framing: Framing,
    /// The backend will close after this response.
    pub close: bool,
    /// The backend answered before it took the whole request body (it stopped reading): the
    /// client's connection still holds body bytes nobody will read, so it ends with this
    /// response, and so does the backend's.
    pub request_cut: bool,
}

/// Offset of `part` inside `base`; `part` must be a subslice of `base`.
fn range_of(base: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - base.as_ptr() as usize;
    start..start + part.len()
}

/// Refuses bare LF (a line feed not preceded by a carriage return) anywhere in a head: parsers
/// disagree on it, which is what smuggling feeds on.
fn check_line_ends(head: &[u8]) -> Result<(), HeadError> {
    // memchr finds the line feeds with SIMD; only those bytes' neighbours are looked at.
    for i in memchr::memchr_iter(b'\n', head) {
        if i == 0 || head[i - 1] != b'\r' {
            return Err(HeadError::Malformed("bare LF in head"));
        }
    }
    Ok(())
}

/// What the framing-related fields of a head say, and which fields go on.
#[derive(Default)]
struct FramingFields {
    content_length: Option<u64>,
    chunked: bool,
    other_coding: bool,
    transfer_encoding: bool,
    close: bool,
    keep_alive: bool,
    expect_continue: bool,
    /// Content-Length appeared more than once (with one value).
    duplicate_length: bool,
    /// Connection names `upgrade` and Upgrade asks for WebSocket.
    connection_upgrade: bool,
    websocket: bool,
    /// TE lists `trailers`.
    te_trailers: bool,
    /// How many Host fields there were (requests only), and the last one's value.
    hosts: usize,
    host: Option<Range<usize>>,
    /// The end-to-end fields, as ranges into the head: neither hop-by-hop nor framing fields,
    /// nor (in a request) Host. Fields named in Connection, and a request's Expect when it is
    /// `100-continue`, are taken out after the pass, as they are known only at its end.
    kept: Vec<(Range<usize>, Range<usize>)>,
}

/// The fields a proxy treats specially, each recognised by a look at a name's length and then
/// one or two comparisons, so that a head's fields are classified in a single pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FieldKind {
    ContentLength,
    TransferEncoding,
    Connection,
    KeepAlive,
    ProxyConnection,
    Te,
    Trailer,
    Upgrade,
    Expect,
    Host,
    /// Any other field: end-to-end.
    Other,
}

impl FieldKind {
    /// The kind of the field called `name` (compared without regard to case).
    fn of(name: &[u8]) -> FieldKind {
        let is = |known: &[u8]| name.eq_ignore_ascii_case(known);
        match name.len() {
            2 if is(b"te") => FieldKind::Te,
            4 if is(b"host") => FieldKind::Host,
            6 if is(b"expect") => FieldKind::Expect,
            7 if is(b"upgrade") => FieldKind::Upgrade,
            7 if is(b"trailer") => FieldKind::Trailer,
            10 if is(b"connection") => FieldKind::Connection,
            10 if is(b"keep-alive") => FieldKind::KeepAlive,
            14 if is(b"content-length") => FieldKind::ContentLength,
            16 if is(b"proxy-connection") => FieldKind::ProxyConnection,
            17 if is(b"transfer-encoding") => FieldKind::TransferEncoding,
            _ => FieldKind::Other,
        }
    }

    /// Whether a field of this kind never crosses the proxy (hop-by-hop, or framing that the
    /// proxy writes itself).
    fn is_hop_by_hop(self) -> bool {
        !matches!(self, FieldKind::Expect | FieldKind::Host | FieldKind::Other)
    }
}

/// Whether `name` contains `_` and reads as a hop-by-hop or framing field once `_` is `-`.
fn looks_like_hop_by_hop(name: &[u8]) -> bool {
    // Only a name as long as one of those fields can be one; most are not, and are not scanned.
    if !matches!(name.len(), 2 | 4 | 7 | 10 | 14 | 16 | 17) || !name.contains(&b'_') {
        return false;
    }
    let mut normalized = [0u8; 17];
    for (n, &b) in normalized.iter_mut().zip(name) {
        *n = if b == b'_' { b'-' } else { b };
    }
    match FieldKind::of(&normalized[..name.len()]) {
        FieldKind::Host => true,
        kind => kind.is_hop_by_hop(),
    }
}

/// Whether two field names name the same field to every server: compared without regard to
/// case, and with `_` read as `-`, as CGI, WSGI and Rack servers read them (`X_Real_IP` reaches
/// their applications as `HTTP_X_REAL_IP`, as `X-Real-IP` does). A field the proxy drops must
/// be dropped in either spelling, or a client could set it under the other.
pub fn same_field_name(a: &[u8], b: &[u8]) -> bool {
    fn fold(b: u8) -> u8 {
        if b == b'_' {
            b'-'
        } else {
            b.to_ascii_lowercase()
        }
    }
    a.len() == b.len() && a.iter().zip(b).all(|(&x, &y)| fold(x) == fold(y))
}

/// Whether `name` is a hop-by-hop field that never crosses the proxy.
fn is_hop_by_hop(name: &[u8]) -> bool {
    FieldKind::of(name).is_hop_by_hop()
}

fn trim(value: &[u8]) -> &[u8] {
    let start = value
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |i| i + 1);
    &value[start..end.max(start)]
}

/// The values of the lines of one list field, joined with commas: `None` without any line,
/// borrowed when there is only one.
pub(crate) fn join_lines<'a>(mut values: impl Iterator<Item = &'a [u8]>) -> Option<Cow<'a, [u8]>> {
    let first = values.next()?;
    let Some(second) = values.next() else {
        return Some(Cow::Borrowed(first));
    };
    let mut joined = [first, b", ", second].concat();
    for value in values {
        joined.extend_from_slice(b", ");
        joined.extend_from_slice(value);
    }
    Some(Cow::Owned(joined))
}

fn comma_list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim)
        .filter(|t| !t.is_empty())
}

/// Reads the framing fields of a request's head (`request`) or a response's, and which fields
/// are end-to-end, in one pass; `Err` for the combinations that must be refused.
fn framing_fields(
    base: &[u8],
    headers: &[httparse::Header<'_>],
    request: bool,
) -> Result<FramingFields, HeadError> {
    let mut f = FramingFields {
        kept: Vec::with_capacity(headers.len()),
        ..FramingFields::default()
    };
    // Lower-cased names listed in Connection; those fields are hop-by-hop too.
    let mut connection_names: Vec<Vec<u8>> = Vec::new();
    for h in headers {
        let name = h.name.as_bytes();
        let kind = FieldKind::of(name);
        if kind == FieldKind::Other && looks_like_hop_by_hop(name) {
            // `Transfer_Encoding` is `Transfer-Encoding` to servers that map `_` to `-` (CGI
            // does): forwarding it would hand them a framing we never saw.
            return Err(HeadError::Malformed(
                "header name disguised as a hop-by-hop field",
            ));
        }
        match kind {
            FieldKind::ContentLength => {
                let value = trim(h.value);
                if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
                    return Err(HeadError::Malformed("invalid Content-Length"));
                }
                let n: u64 = value.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0'));
                match f.content_length {
                    Some(previous) if previous != n => {
                        return Err(HeadError::Malformed("conflicting Content-Length"));
                    }
                    Some(_) => f.duplicate_length = true,
                    None => f.content_length = Some(n),
                }
            }
            FieldKind::TransferEncoding => {
                f.transfer_encoding = true;
                for coding in comma_list(h.value) {
                    if f.chunked {
                        // Anything after chunked means the body is not chunked-delimited.
                        return Err(HeadError::Malformed(
                            "Transfer-Encoding does not end in chunked",
                        ));
                    }
                    if coding.eq_ignore_ascii_case(b"chunked") {
                        f.chunked = true;
                    } else {
                        f.other_coding = true;
                    }
                }
            }
            FieldKind::Connection => {
                for token in comma_list(h.value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        f.close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        f.keep_alive = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        f.connection_upgrade = true;
                    } else {
                        connection_names.push(token.to_ascii_lowercase());
                    }
                }
            }
            FieldKind::Expect => {
                if trim(h.value).eq_ignore_ascii_case(b"100-continue") {
                    f.expect_continue = true;
                }
            }
            FieldKind::Upgrade => {
                if comma_list(h.value).any(|p| p.eq_ignore_ascii_case(b"websocket")) {
                    f.websocket = true;
                }
            }
            FieldKind::Te => {
                if comma_list(h.value).any(|c| c.eq_ignore_ascii_case(b"trailers")) {
                    f.te_trailers = true;
                }
            }
            FieldKind::Host if request => {
                f.hosts += 1;
                f.host = Some(range_of(base, h.value));
            }
            FieldKind::KeepAlive
            | FieldKind::ProxyConnection
            | FieldKind::Trailer
            | FieldKind::Host
            | FieldKind::Other => {}
        }
        // A request's Host is kept apart (the proxy writes its own); a response's passes.
        let dropped = kind.is_hop_by_hop() || (request && kind == FieldKind::Host);
        if !dropped {
            f.kept.push((range_of(base, name), range_of(base, h.value)));
        }
    }
    if f.transfer_encoding && f.content_length.is_some() {
        return Err(HeadError::Malformed(
            "both Content-Length and Transfer-Encoding",
        ));
    }
    // A request's `Expect: 100-continue` is answered here, so no Expect goes on with it.
    if request && f.expect_continue {
        f.kept
            .retain(|(name, _)| FieldKind::of(&base[name.clone()]) != FieldKind::Expect);
    }
    if !connection_names.is_empty() {
        f.kept.retain(|(name, _)| {
            let name = &base[name.clone()];
            !connection_names
                .iter()
                .any(|c| c.eq_ignore_ascii_case(name))
        });
    }
    Ok(f)
}

fn map_parse_error(error: httparse::Error) -> HeadError {
    match error {
        httparse::Error::TooManyHeaders => HeadError::TooLarge,
        httparse::Error::Version => HeadError::Malformed("unsupported HTTP version"),
        httparse::Error::HeaderName => HeadError::Malformed("invalid header name"),
        httparse::Error::HeaderValue => HeadError::Malformed("invalid header value"),
        httparse::Error::NewLine => HeadError::Malformed("invalid line end"),
        httparse::Error::Status => HeadError::Malformed("invalid status"),
        httparse::Error::Token => HeadError::Malformed("invalid token"),
    }
}

/// Writes one response field, with `cookie_flags` added to a Set-Cookie that lacks them.
fn put_field(out: &mut BytesMut, name: &[u8], value: &[u8], cookie_flags: &[&str]) {
    out.put_slice(name);
    out.put_slice(b": ");
    out.put_slice(value);
    if !cookie_flags.is_empty() && name.eq_ignore_ascii_case(b"set-cookie") {
        for flag in cookie_flags {
            if !has_cookie_attribute(value, flag) {
                out.put_slice(b"; ");
                out.put_slice(flag.as_bytes());
            }
        }
    }
    out.put_slice(b"\r\n");
}

/// The cookie flags in force for a request: the listener's, then the route's, where a route's
/// flag replaces the listener's for the same attribute (`SameSite=Strict` on a route wins over
/// `SameSite=Lax` on its listener, as a route's `set` wins over the listener's), so that no
/// attribute is added twice.
pub(super) fn merge_cookie_flags<'a>(listener: &'a [String], route: &'a [String]) -> Vec<&'a str> {
    fn attribute(flag: &str) -> &str {
        flag.split('=').next().unwrap_or(flag)
    }
    let mut flags: Vec<&str> = Vec::with_capacity(listener.len() + route.len());
    for flag in listener.iter().chain(route) {
        flags.retain(|kept| !attribute(kept).eq_ignore_ascii_case(attribute(flag)));
        flags.push(flag);
    }
    flags
}

/// Whether a Set-Cookie value already has the attribute that `flag` sets (compared by
/// attribute name: `SameSite=Lax` is present if any SameSite is).
pub(super) fn has_cookie_attribute(value: &[u8], flag: &str) -> bool {
    let name = flag.split('=').next().unwrap_or(flag).as_bytes();
    value.split(|&b| b == b';').skip(1).any(|attribute| {
        let attribute = attribute.trim_ascii();
        let key = attribute.split(|&b| b == b'=').next().unwrap_or(attribute);
        key.trim_ascii().eq_ignore_ascii_case(name)
    })
}

/// The number of dots a path segment stands for when it is a dot segment (`.`, `..`, either
/// with any of its dots written `%2e` or `%2E`, which backends decode), else 0.
fn dot_segment(segment: &[u8]) -> usize {
    let mut dots = 0;
    let mut rest = segment;
    while !rest.is_empty() {
        rest = if let Some(after) = rest.strip_prefix(b".") {
            after
        } else if rest.len() >= 3 && rest[..3].eq_ignore_ascii_case(b"%2e") {
            &rest[3..]
        } else {
            return 0;
        };
        dots += 1;
    }
    if dots <= 2 { dots } else { 0 }
}

/// Whether a path has a dot segment (see [`dot_segment`]).
pub fn has_dot_segment(path: &str) -> bool {
    let path = path.as_bytes();
    // Quick: a dot segment starts right after a `/` with `.` or `%`.
    path.iter().enumerate().any(|(i, &b)| {
        b == b'/' && matches!(path.get(i + 1), Some(b'.' | b'%')) && {
            let segment = &path[i + 1..];
            let end = segment
                .iter()
                .position(|&b| b == b'/')
                .unwrap_or(segment.len());
            dot_segment(&segment[..end]) > 0
        }
    })
}

/// The target with its path normalised, its query untouched; `None` when there is nothing to
/// do, which is nearly always. Unreserved characters written `%XX` are decoded (RFC 3986
/// section 6.2.2.2: `/%61dmin/` is `/admin/`, and backends read it so, so a route for `/admin/`
/// must see it too), then dot segments are removed (section 5.2.4: `.` goes, `..` takes the
/// segment before it along, never above the root). Anything else stays as it was sent (`%2F`
/// is not a separator, `%25` not a `%`, `%252e` not a dot), and so do empty segments (`//`).
pub fn without_dot_segments(target: &str) -> Option<String> {
    let (path, query) = match target.find('?') {
        Some(q) => target.split_at(q),
        None => (target, ""),
    };
    if !path.starts_with('/') {
        return None;
    }
    let decoded = decode_unreserved(path);
    let path = decoded.as_deref().unwrap_or(path);
    if !has_dot_segment(path) {
        return decoded.map(|path| path + query);
    }
    let segments: Vec<&str> = path[1..].split('/').collect();
    let mut kept: Vec<&str> = Vec::with_capacity(segments.len());
    let last = segments.len() - 1;
    for (i, segment) in segments.into_iter().enumerate() {
        match dot_segment(segment.as_bytes()) {
            0 => kept.push(segment),
            dots => {
                if dots == 2 {
                    kept.pop();
                }
                // `/a/..` is `/`, and `/a/.` is `/a/`: the path still ends in a directory.
                if i == last {
                    kept.push("");
                }
            }
        }
    }
    let mut clean = String::with_capacity(target.len());
    for segment in kept {
        clean.push('/');
        clean.push_str(segment);
    }
    if clean.is_empty() {
        clean.push('/');
    }
    clean.push_str(query);
    Some(clean)
}

/// `path` with every `%XX` that stands for an unreserved character (letters, digits, `-`, `.`,
/// `_`, `~`) replaced by it; `None` when there is none. A `%` that starts no escape is written
/// `%25`, which it stands for: left bare, it could start one with the characters decoded after
/// it (`%6%31` would become `%61`), which the router would take as text and a backend decode
/// again. Everything else, UTF-8 included, is copied as it is.
fn decode_unreserved(path: &str) -> Option<String> {
    fn escaped_at(bytes: &[u8], i: usize) -> Option<u8> {
        let hex = |b: u8| (b as char).to_digit(16);
        let (high, low) = (hex(*bytes.get(i + 1)?)?, hex(*bytes.get(i + 2)?)?);
        u8::try_from(high * 16 + low).ok()
    }
    let unreserved = |byte: u8| byte.is_ascii_alphanumeric() || b"-._~".contains(&byte);
    let bytes = path.as_bytes();
    if !memchr::memchr_iter(b'%', bytes).any(|i| escaped_at(bytes, i).is_some_and(unreserved)) {
        return None;
    }
    let mut out = String::with_capacity(path.len() + 8);
    // `%` and hex digits are ASCII: every index sliced at is a character boundary.
    let mut copied = 0;
    while let Some(at) = memchr::memchr(b'%', &bytes[copied..]).map(|at| copied + at) {
        out.push_str(&path[copied..at]);
        copied = match escaped_at(bytes, at) {
            Some(byte) if unreserved(byte) => {
                out.push(char::from(byte));
                at + 3
            }
            Some(_) => {
                out.push_str(&path[at..at + 3]);
                at + 3
            }
            None => {
                out.push_str("%25");
                at + 1
            }
        };
    }
    out.push_str(&path[copied..]);
    Some(out)
}

/// Whether `target` can be sent as an origin-form request target (after a rewrite).
pub fn is_valid_origin_target(target: &str) -> bool {
    target.starts_with('/') && valid_target(target.as_bytes())
}

/// Bytes that may appear in a request target (RFC 3986 characters plus `%`); no spaces, no
/// controls, no `#`.
fn valid_target(target: &[u8]) -> bool {
    !target.is_empty() && target.iter().all(|&b| TARGET_BYTES[usize::from(b)])
}

/// Which bytes `valid_target` allows, as a table: one lookup per byte.
const TARGET_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let extra = b"-._~:/?[]@!$&'()*+,;=%";
    let mut i = 0;
    while i < extra.len() {
        table[extra[i] as usize] = true;
        i += 1;
    }
    table
};

/// What follows `http://` or `https://` at the start of `target`, the scheme compared without
/// regard to case (RFC 9110 section 4.2.3); `None` if the target is not absolute-form.
fn strip_scheme(target: &str) -> Option<&str> {
    ["http://", "https://"].into_iter().find_map(|scheme| {
        target
            .get(..scheme.len())
            .filter(|start| start.eq_ignore_ascii_case(scheme))
            .map(|_| &target[scheme.len()..])
    })
}

/// Whether a Host value (or the authority of an absolute-form target, userinfo refused before)
/// is `uri-host [ ":" port ]` (RFC 9112 section 3.2, RFC 3986 section 3.2). A server must
/// answer any other with 400: a backend may build links or route on a Host with a `/`, a space
/// or a comma in it (a comma is how two Host fields look once joined), and read it differently
/// from how the router did. The empty value is valid (a target without an authority).
pub(crate) fn valid_host(value: &[u8]) -> bool {
    let (host, port) = if value.first() == Some(&b'[') {
        // IP-literal: an IPv6 address or IPvFuture between brackets.
        let Some(close) = value.iter().position(|&b| b == b']') else {
            return false;
        };
        let inside = &value[1..close];
        if inside.is_empty()
            || !inside
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b":.-_~!$&'()*+,;=".contains(&b))
        {
            return false;
        }
        (&[][..], &value[close + 1..])
    } else {
        match value.iter().position(|&b| b == b':') {
            Some(colon) => (&value[..colon], &value[colon..]),
            None => (value, &[][..]),
        }
    };
    // reg-name (an IPv4 address is one too): unreserved, pct-encoded and sub-delims.
    let host_ok = host
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(&b));
    // port = *DIGIT, after a colon.
    let port_ok = match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    };
    host_ok && port_ok
}

/// Parses a request head at the start of `buf`. `Ok(None)`: incomplete, read more. On success
/// the head's bytes are split off the front of `buf`.
pub fn parse_request(buf: &mut BytesMut) -> Result<Option<RequestHead>, HeadError> {
    // Uninitialised: filling 100 empty headers (3.2 KB) first cost about 300 instructions a
    // parse (callgrind), for headers httparse overwrites anyway.
    let mut storage =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let len = match request.parse_with_uninit_headers(buf, &mut storage) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            let line = buf.iter().position(|&b| b == b'\n').unwrap_or(buf.len());
            if line > MAX_REQUEST_LINE {
                return Err(HeadError::UriTooLong);
            }
            if buf.len() >= MAX_HEAD_SIZE {
                return Err(HeadError::TooLarge);
            }
            // Refuse a bare LF as soon as it arrives rather than after the whole head.
            check_line_ends(buf)?;
            return Ok(None);
        }
        Err(error) => return Err(map_parse_error(error)),
    };
    if request.path.is_some_and(|p| p.len() > MAX_REQUEST_LINE) {
        return Err(HeadError::UriTooLong);
    }
    if len > MAX_HEAD_SIZE {
        return Err(HeadError::TooLarge);
    }
    check_line_ends(&buf[..len])?;
    let base: &[u8] = buf;
    let method = request.method.ok_or(HeadError::Malformed("no method"))?;
    let target = request.path.ok_or(HeadError::Malformed("no target"))?;
    let minor_version = request.version.ok_or(HeadError::Malformed("no version"))?;
    let headers = request.headers;

    let fields = framing_fields(base, headers, true)?;
    if fields.transfer_encoding && minor_version == 0 {
        return Err(HeadError::Malformed(
            "Transfer-Encoding in an HTTP/1.0 request",
        ));
    }
    if fields.other_coding {
        return if fields.chunked {
            Err(HeadError::NotImplemented(
                "transfer codings other than chunked",
            ))
        } else {
            Err(HeadError::Malformed(
                "Transfer-Encoding does not end in chunked",
            ))
        };
    }
    if method == "CONNECT" {
        // A tunnel, which this proxy does not make (RFC 9110 section 9.1: 501 for a method
        // not implemented); its authority-form target is never sent on.
        return Err(HeadError::NotImplemented("CONNECT"));
    }
    if !valid_target(target.as_bytes()) {
        return Err(HeadError::Malformed("invalid request target"));
    }

    // Host: exactly one in HTTP/1.1 (RFC 9112 section 3.2); an absolute-form target names it.
    let mut host = fields.host.clone();
    if fields.hosts > 1 {
        return Err(HeadError::Malformed("more than one Host"));
    }
    if let Some(range) = &host
        && !valid_host(&base[range.clone()])
    {
        return Err(HeadError::Malformed("invalid Host"));
    }
    let mut target_form = Target::Raw(range_of(base, target.as_bytes()));
    if let Some(rest) = strip_scheme(target) {
        // Absolute form: the authority overrides Host (RFC 9112 section 3.2.2), the rest is
        // the path and query. The authority ends at the first `/` or `?` (RFC 3986 section
        // 3.2); `#` never gets here (`valid_target`).
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let authority = &rest[..end];
        if authority.is_empty() || authority.contains('@') || !valid_host(authority.as_bytes()) {
            return Err(HeadError::Malformed("invalid absolute-form target"));
        }
        host = Some(range_of(base, authority.as_bytes()));
        let rest = &rest[end..];
        target_form = if rest.starts_with('/') {
            Target::Raw(range_of(base, rest.as_bytes()))
        } else if rest.is_empty() {
            Target::Root
        } else {
            Target::Owned(format!("/{rest}").into_boxed_str())
        };
    } else if !(target.starts_with('/') || (target == "*" && method == "OPTIONS")) {
        return Err(HeadError::Malformed("invalid request target"));
    }
    if minor_version == 1 && host.is_none() {
        return Err(HeadError::Malformed("HTTP/1.1 request without Host"));
    }
    // Routes, rewrites and the backend all see the target without dot segments.
    let target_form = {
        let current = match &target_form {
            Target::Raw(range) => std::str::from_utf8(&base[range.clone()]).unwrap_or("/"),
            Target::Root => "/",
            Target::Owned(owned) => owned,
        };
        match without_dot_segments(current) {
            Some(clean) => Target::Owned(clean.into_boxed_str()),
            None => target_form,
        }
    };

    let framing = if fields.chunked {
        Framing::Chunked
    } else {
        match fields.content_length {
            Some(0) | None => Framing::Empty,
            Some(n) => Framing::Length(n),
        }
    };
    let close = fields.close || (minor_version == 0 && !fields.keep_alive);
    // A body on GET or HEAD has no defined meaning (RFC 9110 section 9.3.1); framed by
    // Transfer-Encoding it is a classic smuggling carrier and is refused outright.
    let bodiless_method = method == "GET" || method == "HEAD";
    if bodiless_method && fields.transfer_encoding {
        return Err(HeadError::Malformed(
            "Transfer-Encoding on a GET or HEAD request",
        ));
    }
    let ambiguous = fields.duplicate_length || (bodiless_method && framing != Framing::Empty);
    let method_range = range_of(base, method.as_bytes());
    let websocket = fields.connection_upgrade
        && fields.websocket
        && minor_version == 1
        && method == "GET"
        && framing == Framing::Empty;
    let raw = buf.split_to(len).freeze();
    Ok(Some(RequestHead {
        raw,
        method: method_range,
        target: target_form,
        minor_version,
        fields: fields.kept,
        framing,
        close,
        expect_continue: fields.expect_continue,
        websocket,
        te_trailers: fields.te_trailers,
        ambiguous,
        host,
    }))
}

impl RequestHead {
    /// The method, e.g. `GET`.
    pub fn method(&self) -> &str {
        // httparse checked it is a token, so it is ASCII.
        std::str::from_utf8(&self.raw[self.method.clone()]).unwrap_or("")
    }

    /// The request target in origin form (path and query), or `*`.
    pub fn target(&self) -> &str {
        match &self.target {
            Target::Raw(range) => std::str::from_utf8(&self.raw[range.clone()]).unwrap_or("/"),
            Target::Root => "/",
            Target::Owned(target) => target,
        }
    }

    /// The path: the target without its query.
    pub fn path(&self) -> &str {
        let target = self.target();
        target.split_once('?').map_or(target, |(path, _)| path)
    }

    /// The Host as sent (port included), if any.
    pub fn host(&self) -> Option<&[u8]> {
        self.host.as_ref().map(|r| &self.raw[r.clone()])
    }

    /// The first end-to-end field called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(n, _)| self.raw[n.clone()].eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| &self.raw[v.clone()])
    }

    /// Every end-to-end field called `name` as one value: a list field sent over several
    /// lines is one list (RFC 9110 section 5.3), which a client may split as it likes.
    /// Borrowed unless there is more than one line.
    pub fn header_list(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        join_lines(
            self.fields()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
                .map(|(_, v)| v),
        )
    }

    /// The end-to-end fields, in order (hop-by-hop, framing and Host already gone).
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields
            .iter()
            .map(|(n, v)| (&self.raw[n.clone()], &self.raw[v.clone()]))
    }

    /// Whether the method is one a retry may repeat (RFC 9110 section 9.2.2).
    pub fn is_idempotent(&self) -> bool {
        matches!(
            self.method(),
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        )
    }

    /// Whether the response to this request has no body whatever its framing fields say.
    pub fn is_head(&self) -> bool {
        self.method() == "HEAD"
    }

    /// Writes the head to send upstream: HTTP/1.1, the end-to-end fields minus those named in
    /// `drop`, then `extra` fields, then framing of our own. `host` replaces the Host field and
    /// `target` the request target (both after rewrite rules).
    pub fn write_upstream(
        &self,
        out: &mut BytesMut,
        host: Option<&[u8]>,
        target: Option<&str>,
        drop: &[&str],
        extra: &[(&str, &[u8])],
    ) {
        out.put_slice(&self.raw[self.method.clone()]);
        out.put_u8(b' ');
        out.put_slice(target.unwrap_or(self.target()).as_bytes());
        out.put_slice(b" HTTP/1.1\r\n");
        // Always a Host: what goes upstream is HTTP/1.1, which must have one (RFC 9112 section
        // 3.2), empty when an HTTP/1.0 client named no authority.
        out.put_slice(b"host: ");
        out.put_slice(host.or_else(|| self.host()).unwrap_or_default());
        out.put_slice(b"\r\n");
        for (name, value) in &self.fields {
            let name = &self.raw[name.clone()];
            if drop.iter().any(|d| same_field_name(d.as_bytes(), name)) {
                continue;
            }
            out.put_slice(name);
            out.put_slice(b": ");
            out.put_slice(&self.raw[value.clone()]);
            out.put_slice(b"\r\n");
        }
        for (name, value) in extra {
            out.put_slice(name.as_bytes());
            out.put_slice(b": ");
            out.put_slice(value);
            out.put_slice(b"\r\n");
        }
        match self.framing {
            Framing::Empty | Framing::UntilClose => {}
            Framing::Length(n) => {
                out.put_slice(b"content-length: ");
                out.put_slice(itoa::Buffer::new().format(n).as_bytes());
                out.put_slice(b"\r\n");
            }
            Framing::Chunked => out.put_slice(b"transfer-encoding: chunked\r\n"),
        }
        out.put_slice(b"\r\n");
    }
}

/// Parses a response head at the start of `buf`, for a request that was a HEAD if `head`.
/// `Ok(None)`: incomplete. On success the head's bytes are split off `buf`.
pub fn parse_response(buf: &mut BytesMut, head: bool) -> Result<Option<ResponseHead>, HeadError> {
    // Uninitialised, as in `parse_request`.
    let mut storage =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut storage,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            if buf.len() >= MAX_HEAD_SIZE {
                return Err(HeadError::TooLarge);
            }
            return Ok(None);
        }
        Err(error) => return Err(map_parse_error(error)),
    };
    // A head read in one piece is held to the limit a head that arrives in pieces is.
    if len > MAX_HEAD_SIZE {
        return Err(HeadError::TooLarge);
    }
    check_line_ends(&buf[..len])?;
    let base: &[u8] = buf;
    let status = response.code.ok_or(HeadError::Malformed("no status"))?;
    // Three digits are all httparse asks for; RFC 9110 section 15 makes the others invalid. A
    // status under 100 would go out as a status line of fewer than three digits, and one over
    // 599 tells a client nothing it can act on: the backend failed either way.
    if !(100..=599).contains(&status) {
        return Err(HeadError::Malformed("status code outside 100-599"));
    }
    let minor_version = response.version.ok_or(HeadError::Malformed("no version"))?;
    // For a line without a reason phrase, or with bytes other than ASCII in it, httparse gives a
    // static "" rather than a part of the head: the phrase goes on empty, which is allowed (RFC
    // 9112 section 4: clients ignore it).
    let reason = response
        .reason
        .filter(|reason| !reason.is_empty())
        .map_or(0..0, |reason| range_of(base, reason.as_bytes()));
    let headers = response.headers;
    let fields = framing_fields(base, headers, false)?;
    let framing = if head || (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::Empty
    } else if fields.chunked {
        Framing::Chunked
    } else if fields.transfer_encoding {
        // A response coding we cannot see the end of: the body runs to the close.
        Framing::UntilClose
    } else {
        match fields.content_length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    if fields.other_coding && framing != Framing::Empty {
        return Err(HeadError::NotImplemented(
            "response transfer codings other than chunked",
        ));
    }
    // An HTTP/1.0 message with Transfer-Encoding has faulty framing (RFC 9112 section 6.1):
    // it is read as chunked, but its connection is never used again.
    let close = fields.close
        || (minor_version == 0 && (!fields.keep_alive || fields.transfer_encoding))
        || framing == Framing::UntilClose;
    let raw = buf.split_to(len).freeze();
    Ok(Some(ResponseHead {
        raw,
        status,
        reason,
        minor_version,
        fields: fields.kept,
        framing,
        close,
        request_cut: false,
    }))
}

impl ResponseHead {
    /// The end-to-end fields, in order (hop-by-hop and framing fields are already gone).
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields
            .iter()
            .map(|(n, v)| (&self.raw[n.clone()], &self.raw[v.clone()]))
    }

    /// The first end-to-end field called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(n, _)| self.raw[n.clone()].eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| &self.raw[v.clone()])
    }

    /// Every end-to-end field called `name` as one value, as [`RequestHead::header_list`].
    pub fn header_list(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        join_lines(
            self.fields()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
                .map(|(_, v)| v),
        )
    }

    /// Writes the head to send to the client, with `framing` (chosen by the caller: the
    /// client's version decides whether an until-close body is re-chunked) and `persistence`;
    /// fields named in `drop` are left out and `extra` fields added.
    pub fn write_downstream(
        &self,
        out: &mut BytesMut,
        framing: Framing,
        persistence: Persistence,
        drop: &[&str],
        extra: &[(&str, &[u8])],
        cookie_flags: &[&str],
    ) {
        out.put_slice(b"HTTP/1.1 ");
        out.put_slice(itoa::Buffer::new().format(self.status).as_bytes());
        out.put_u8(b' ');
        out.put_slice(&self.raw[self.reason.clone()]);
        out.put_slice(b"\r\n");
        for (name, value) in &self.fields {
            let name = &self.raw[name.clone()];
            if drop.iter().any(|d| d.as_bytes().eq_ignore_ascii_case(name)) {
                continue;
            }
            put_field(out, name, &self.raw[value.clone()], cookie_flags);
        }
        // Cookies of the proxy's own (sticky sessions, header rules) get the flags too.
        for (name, value) in extra {
            put_field(out, name.as_bytes(), value, cookie_flags);
        }
        match framing {
            Framing::Length(n) => {
                out.put_slice(b"content-length: ");
                out.put_slice(itoa::Buffer::new().format(n).as_bytes());
                out.put_slice(b"\r\n");
            }
            Framing::Chunked => out.put_slice(b"transfer-encoding: chunked\r\n"),
            Framing::Empty | Framing::UntilClose => {
                // A HEAD response or 304 keeps the Content-Length the backend gave (unless it is
                // dropped: a HEAD whose GET would be compressed); the body is empty either way.
                if self.framing == Framing::Empty
                    && !drop
                        .iter()
                        .any(|d| d.eq_ignore_ascii_case("content-length"))
                    && let Some(length) = self.declared_length()
                {
                    out.put_slice(b"content-length: ");
                    out.put_slice(length);
                    out.put_slice(b"\r\n");
                }
            }
        }
        out.put_slice(persistence.field());
        out.put_slice(b"\r\n");
    }

    /// The Content-Length to tell a client: the backend's, for a body of that length or a
    /// response without one (to HEAD, a 304, a length of 0), where it describes what a GET would
    /// have had. Never for a 1xx or a 204, which must not carry one (RFC 9110 section 8.6).
    pub fn declared_length(&self) -> Option<&[u8]> {
        if (100..200).contains(&self.status) || self.status == 204 {
            return None;
        }
        match self.framing {
            Framing::Empty | Framing::Length(_) => self.original_content_length(),
            Framing::Chunked | Framing::UntilClose => None,
        }
    }

    fn original_content_length(&self) -> Option<&[u8]> {
        // Content-Length was removed from the kept fields as a framing field; find it again.
        let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut storage);
        response.parse(&self.raw).ok()?;
        let value = response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))?
            .value;
        let start = value.as_ptr() as usize - self.raw.as_ptr() as usize;
        Some(&self.raw[start..start + value.len()])
    }
}

/// Decodes a chunked body incrementally, so it can be re-framed on the way out.
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
    /// Bytes left in the current chunk.
    remaining: u64,
    /// Hex digits seen in the current size line.
    digits: u8,
    /// Trailer section collected so far (field lines, CRLF-terminated).
    pub trailers: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

/// One step of decoding.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Body bytes: `input[range]`.
    Data(Range<usize>),
    /// The body (and trailers) ended; `usize` bytes of input were consumed in total.
    End(usize),
    /// All input consumed, more needed.
    NeedMore,
}

impl ChunkedDecoder {
    /// Decodes from `input`, starting at `*pos`, advancing it. Call until it returns `NeedMore`
    /// or `End`.
    pub fn decode(&mut self, input: &[u8], pos: &mut usize) -> Result<Decoded, HeadError> {
        const BAD: HeadError = HeadError::Malformed("invalid chunked encoding");
        while *pos < input.len() {
            let byte = input[*pos];
            match self.state {
                ChunkState::Size => match byte {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        // 15 hex digits is far beyond any body; more would overflow.
                        if self.digits >= 15 {
                            return Err(BAD);
                        }
                        let digit = (byte as char).to_digit(16).unwrap_or(0);
                        self.remaining = self.remaining * 16 + u64::from(digit);
                        self.digits += 1;
                    }
                    b';' if self.digits > 0 => self.state = ChunkState::Extension,
                    b'\r' if self.digits > 0 => self.state = ChunkState::SizeLf,
                    _ => return Err(BAD),
                },
                ChunkState::Extension => match byte {
                    b'\r' => self.state = ChunkState::SizeLf,
                    // Extensions are tokens, quoted strings, '=', ';' and whitespace; controls
                    // (a bare LF among them) are not.
                    b'\n' | 0..=8 | 10..=31 | 127 => return Err(BAD),
                    _ => {}
                },
                ChunkState::SizeLf => {
                    if byte != b'\n' {
                        return Err(BAD);
                    }
                    self.digits = 0;
                    self.state = if self.remaining == 0 {
                        ChunkState::TrailerStart
                    } else {
                        ChunkState::Data
                    };
                }
                ChunkState::Data => {
                    let available = (input.len() - *pos) as u64;
                    let take = available.min(self.remaining) as usize;
                    let start = *pos;
                    *pos += take;
                    self.remaining -= take as u64;
                    if self.remaining == 0 {
                        self.state = ChunkState::DataCr;
                    }
                    return Ok(Decoded::Data(start..start + take));
                }
                ChunkState::DataCr => {
                    if byte != b'\r' {
                        return Err(BAD);
                    }
                    self.state = ChunkState::DataLf;
                }
                ChunkState::DataLf => {
                    if byte != b'\n' {
                        return Err(BAD);
                    }
                    self.state = ChunkState::Size;
                }
                ChunkState::TrailerStart => {
                    if byte == b'\r' {
                        self.state = ChunkState::EndLf;
                    } else if byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte) {
                        self.trailers.push(byte);
                        self.state = ChunkState::TrailerLine;
                    } else {
                        return Err(BAD);
                    }
                }
                ChunkState::TrailerLine => {
                    if byte == b'\r' {
                        self.state = ChunkState::TrailerLf;
                    } else if byte == b'\n' || (byte < 32 && byte != b'\t') || byte == 127 {
                        return Err(BAD);
                    } else {
                        self.trailers.push(byte);
                    }
                    if self.trailers.len() > MAX_TRAILER_SIZE {
                        return Err(HeadError::TooLarge);
                    }
                }
                ChunkState::TrailerLf => {
                    if byte != b'\n' {
                        return Err(BAD);
                    }
                    self.trailers.extend_from_slice(b"\r\n");
                    self.state = ChunkState::TrailerStart;
                }
                ChunkState::EndLf => {
                    if byte != b'\n' {
                        return Err(BAD);
                    }
                    self.state = ChunkState::Done;
                    *pos += 1;
                    return Ok(Decoded::End(*pos));
                }
                ChunkState::Done => return Ok(Decoded::End(*pos)),
            }
            *pos += 1;
        }
        if self.state == ChunkState::Done {
            return Ok(Decoded::End(*pos));
        }
        Ok(Decoded::NeedMore)
    }

    /// Bytes of chunk data that come next in the input, before any more framing: non-zero only
    /// inside a chunk's data. The caller may move them itself (splice them) and then report them
    /// with [`ChunkedDecoder::skip_data`].
    pub fn data_left(&self) -> u64 {
        if self.state == ChunkState::Data {
            self.remaining
        } else {
            0
        }
    }

    /// Counts `n` bytes of chunk data as consumed without seeing them (at most
    /// [`ChunkedDecoder::data_left`]); decoding goes on with the CRLF that ends the chunk.
    pub fn skip_data(&mut self, n: u64) {
        if self.state != ChunkState::Data {
            return;
        }
        self.remaining = self.remaining.saturating_sub(n);
        if self.remaining == 0 {
            self.state = ChunkState::DataCr;
        }
    }

    /// The trailer section as it may be passed on: without the fields a trailer may not carry
    /// (RFC 9110 section 6.5.1: framing, hop-by-hop fields, Host), nor the fields the proxy
    /// writes for its clients, in either spelling (`same_field_name`): a server that merges
    /// trailers into the head (Apache httpd did) would take them for the proxy's own.
    /// Borrowed when nothing is dropped.
    pub fn forwardable_trailers(&self) -> Cow<'_, [u8]> {
        let dropped = |line: &[u8]| {
            let name = line
                .iter()
                .position(|&b| b == b':')
                .map_or(line, |colon| &line[..colon]);
            is_hop_by_hop(name)
                || looks_like_hop_by_hop(name)
                || name.eq_ignore_ascii_case(b"host")
                || super::FORWARDING_FIELDS
                    .iter()
                    .any(|f| same_field_name(f.as_bytes(), name))
        };
        let lines = || {
            self.trailers
                .split_inclusive(|&b| b == b'\n')
                .filter(|line| !line.is_empty())
        };
        if !lines().any(dropped) {
            return Cow::Borrowed(&self.trailers);
        }
        Cow::Owned(
            lines()
                .filter(|line| !dropped(line))
                .flatten()
                .copied()
                .collect(),
        )
    }

    /// Whether the trailer section is well formed: each line is `name: value`.
    pub fn trailers_valid(&self) -> bool {
        self.trailers
            .split(|&b| b == b'\n')
            .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
            .filter(|line| !line.is_empty())
            .all(|line| match line.iter().position(|&b| b == b':') {
                Some(colon) => colon > 0 && !matches!(line[colon - 1], b' ' | b'\t'),
                None => false,
            })
    }
}

/// Appends one chunk of a chunked body.
pub fn encode_chunk(out: &mut BytesMut, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    encode_chunk_size(out, data.len() as u64);
    out.put_slice(data);
    out.put_slice(b"\r\n");
}

/// Appends the size line of a chunk of `n` bytes, for data that goes out by another way.
pub fn encode_chunk_size(out: &mut BytesMut, mut n: u64) {
    let mut hex = [0u8; 16];
    let mut i = hex.len();
    while n > 0 || i == hex.len() {
        i -= 1;
        hex[i] = b"0123456789abcdef"[(n % 16) as usize];
        n /= 16;
    }
    out.put_slice(&hex[i..]);
    out.put_slice(b"\r\n");
}

/// Appends the end of a chunked body, with its trailer section.
pub fn encode_last_chunk(out: &mut BytesMut, trailers: &[u8]) {
    out.put_slice(b"0\r\n");
    out.put_slice(trailers);
    out.put_slice(b"\r\n");
}

/// The reason phrase for statuses the proxy itself sends.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        301 => "Moved Permanently",
        302 => "Found",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        500 => "Internal Server Error",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// What can be read of the request line of a head that was refused, for the access log: each
/// part that does not look like what it should be is `-`.
#[derive(Debug, PartialEq, Eq)]
pub struct RequestLine<'a> {
    pub method: &'a str,
    pub target: &'a str,
    pub protocol: &'a str,
}

impl<'a> RequestLine<'a> {
    /// The longest target kept: a refused head's line is evidence, not something to store whole.
    const MAX_TARGET: usize = 1024;

    /// Reads the first line of `buf` without judging it: a method of token characters, a
    /// target of printable ASCII (the log escapes it anyway), an `HTTP/1.x` version. A line
    /// that has not ended (a target too long, a head cut by the timeout) gives its method only.
    pub fn lenient(buf: &'a [u8]) -> RequestLine<'a> {
        let dash = RequestLine {
            method: "-",
            target: "-",
            protocol: "-",
        };
        // The parser skips empty lines before the request line (RFC 9112 section 2.2).
        let start = buf.iter().position(|&b| !matches!(b, b'\r' | b'\n'));
        let buf = &buf[start.unwrap_or(buf.len())..];
        let (line, ended) = match memchr::memchr(b'\n', buf) {
            Some(end) => (&buf[..end], true),
            None => (buf, false),
        };
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let mut parts = line.splitn(3, |&b| b == b' ');
        let Some(method) = parts
            .next()
            .filter(|m| (1..=32).contains(&m.len()) && m.iter().all(|&b| is_tchar(b)))
            .and_then(|m| std::str::from_utf8(m).ok())
        else {
            return dash;
        };
        let with_method = RequestLine { method, ..dash };
        let (Some(target), true) = (parts.next(), ended) else {
            return with_method;
        };
        let target = std::str::from_utf8(target)
            .ok()
            .filter(|t| !t.is_empty() && t.len() <= Self::MAX_TARGET)
            .filter(|t| t.bytes().all(|b| b.is_ascii_graphic()))
            .unwrap_or("-");
        let protocol = match parts.next() {
            Some(b"HTTP/1.1") => "HTTP/1.1",
            Some(b"HTTP/1.0") => "HTTP/1.0",
            _ => "-",
        };
        RequestLine {
            method,
            target,
            protocol,
        }
    }
}

/// A token character (RFC 9110 section 5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// What follows the head of an answer of the proxy's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalBody {
    /// The status and its reason on one line, as every error of the proxy's own says it.
    Status,
    /// Nothing (a redirect: its `Location` says it all).
    Empty,
}

/// A complete answer of the proxy's own (an error says what happened in a short text body):
/// the status line, then `fields` as given (the response rules have already edited them), then
/// framing fields that only this function writes, so that no rule can make the head disagree
/// with the body.
pub fn local_response(
    status: u16,
    fields: &[(&str, &[u8])],
    body: LocalBody,
    persistence: Persistence,
) -> BytesMut {
    let reason = reason(status);
    let body_len = match body {
        LocalBody::Status => 3 + 1 + reason.len() + 1,
        LocalBody::Empty => 0,
    };
    let mut out = BytesMut::with_capacity(160);
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(itoa::Buffer::new().format(status).as_bytes());
    out.put_u8(b' ');
    out.put_slice(reason.as_bytes());
    out.put_slice(b"\r\n");
    for (name, value) in fields {
        put_field(&mut out, name.as_bytes(), value, &[]);
    }
    out.put_slice(b"content-length: ");
    out.put_slice(itoa::Buffer::new().format(body_len).as_bytes());
    out.put_slice(b"\r\n");
    out.put_slice(persistence.field());
    out.put_slice(b"\r\n");
    if body == LocalBody::Status {
        out.put_slice(itoa::Buffer::new().format(status).as_bytes());
        out.put_u8(b' ');
        out.put_slice(reason.as_bytes());
        out.put_u8(b'\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &str) -> Result<Option<RequestHead>, HeadError> {
        parse_request(&mut BytesMut::from(text.as_bytes()))
    }

    #[test]
    fn a_plain_request() {
        let head = request("GET /a/b?x=1 HTTP/1.1\r\nHost: Example.com:8080\r\nX-Y: z\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.method(), "GET");
        assert_eq!(head.target(), "/a/b?x=1");
        assert_eq!(head.path(), "/a/b");
        assert_eq!(head.host(), Some(&b"Example.com:8080"[..]));
        assert_eq!(head.header("x-y"), Some(&b"z"[..]));
        assert_eq!(head.framing, Framing::Empty);
        assert!(!head.close);
    }

    #[test]
    fn refused_request_lines_are_read_for_the_log_without_trusting_them() {
        let parts = |text: &'static [u8]| {
            let l = RequestLine::lenient(text);
            (l.method, l.target, l.protocol)
        };
        assert_eq!(
            parts(b"GET /a?b HTTP/1.1\r\nHost: a\r\nBad header\r\n\r\n"),
            ("GET", "/a?b", "HTTP/1.1")
        );
        assert_eq!(parts(b"POST /x HTTP/1.0\n"), ("POST", "/x", "HTTP/1.0"));
        assert_eq!(parts(b"GET /x HTTP/9\r\n"), ("GET", "/x", "-"));
        assert_eq!(parts(b"GET /very-long-and-not-ended"), ("GET", "-", "-"));
        assert_eq!(parts(b"G\x01T / HTTP/1.1\r\n"), ("-", "-", "-"));
        assert_eq!(parts(b"GET /\xff HTTP/1.1\r\n"), ("GET", "-", "HTTP/1.1"));
        assert_eq!(parts(b"\x16\x03\x01\x02\x00"), ("-", "-", "-"));
        assert_eq!(parts(b""), ("-", "-", "-"));
        // Empty lines before the request line are skipped, as the parser skips them.
        assert_eq!(
            parts(b"\r\n\r\nGET /a HTTP/1.1\r\nBad\r\n\r\n"),
            ("GET", "/a", "HTTP/1.1")
        );
        assert_eq!(parts(b"\r\n"), ("-", "-", "-"));
    }

    #[test]
    fn partial_heads_wait_for_more() {
        assert!(request("GET / HTTP/1.1\r\nHost: a\r\n").unwrap().is_none());
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        let bad = [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n folded\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX : y\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX\x01Y: y\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET nothing HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/2.0\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer_Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent_Length: 5\r\n\r\n",
        ];
        for text in bad {
            assert!(request(text).is_err(), "accepted: {text:?}");
        }
    }

    #[test]
    fn identical_content_lengths_collapse() {
        let head =
            request("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(head.framing, Framing::Length(5));
        assert!(
            head.ambiguous,
            "a repeated Content-Length closes the connections after"
        );
        let head = request("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
            .unwrap()
            .unwrap();
        assert!(head.ambiguous, "a body on GET closes the connections after");
        let head = request("POST / HTTP/1.1\r\nHost: a\r\nX_Custom: 1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!head.ambiguous);
    }

    #[test]
    fn hop_by_hop_fields_do_not_pass() {
        let head = request(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nUpgrade: h2c\r\nProxy-Connection: x\r\nX-Kept: 2\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        let mut out = BytesMut::new();
        head.write_upstream(&mut out, None, None, &[], &[]);
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert_eq!(text, "GET / HTTP/1.1\r\nhost: a\r\nX-Kept: 2\r\n\r\n");
    }

    #[test]
    fn end_to_end_fields_are_chosen_in_one_pass() {
        // A field named in a Connection that comes after it is dropped all the same, in any
        // case; with `Expect: 100-continue`, which the proxy answers, every Expect goes.
        let head = request(
            "POST / HTTP/1.1\r\nX-Early: 1\r\nExpect: 100-continue\r\nHost: a\r\nEXPECT: x\r\nContent-Length: 1\r\nconnection: x-early\r\nTrailer: t\r\nX-Te: 3\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        let fields: Vec<_> = head.fields().collect();
        assert_eq!(fields, [(&b"X-Te"[..], &b"3"[..])]);
        // Without it, Expect passes.
        let head = request("GET / HTTP/1.1\r\nHost: a\r\nExpect: x\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.header("expect"), Some(&b"x"[..]));
        // A response keeps Host and Expect, and loses its hop-by-hop and framing fields.
        let response = parse_response(
            &mut BytesMut::from(
                &b"HTTP/1.1 200 OK\r\nHost: h\r\nTE: trailers\r\nExpect: e\r\nContent-Length: 0\r\nKeep-Alive: 5\r\nProxy-Connection: x\r\nUpgrade: u\r\n\r\n"[..],
            ),
            false,
        )
        .unwrap()
        .unwrap();
        let fields: Vec<_> = response.fields().collect();
        assert_eq!(
            fields,
            [(&b"Host"[..], &b"h"[..]), (&b"Expect"[..], &b"e"[..])]
        );
        // Disguised with `_`, each of them is refused, in either head.
        for name in [
            "Transfer_Encoding",
            "content_length",
            "Keep_Alive",
            "Proxy_Connection",
        ] {
            let text = format!("GET / HTTP/1.1\r\nHost: a\r\n{name}: 1\r\n\r\n");
            assert!(request(&text).is_err(), "{name}");
            let text = format!("HTTP/1.1 200 OK\r\n{name}: 1\r\n\r\n");
            assert!(
                parse_response(&mut BytesMut::from(text.as_bytes()), false).is_err(),
                "{name}"
            );
        }
    }

    #[test]
    fn absolute_form_names_the_host() {
        let head = request("GET http://example.com/x?y HTTP/1.1\r\nHost: other\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.host(), Some(&b"example.com"[..]));
        assert_eq!(head.target(), "/x?y");
        let head = request("GET http://example.com HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.target(), "/");
        // The authority ends at `?` too: the query is the target's, not the host's.
        let head = request("GET http://example.com:81?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.host(), Some(&b"example.com:81"[..]));
        assert_eq!(head.target(), "/?q=1");
        assert_eq!(head.path(), "/");
        // The scheme is case-insensitive.
        let head = request("GET HTTPS://example.com/a HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.host(), Some(&b"example.com"[..]));
        assert_eq!(head.target(), "/a");
    }

    #[test]
    fn host_values_must_be_an_authority() {
        for good in [
            "example.com",
            "Example.COM:8080",
            "127.0.0.1:80",
            "[::1]:8080",
            "[2001:db8::1]",
            "a-b_c~d.e",
            "xn--nxasmq6b.example",
            "",
            "example.com:",
        ] {
            let text = format!("GET / HTTP/1.1\r\nHost: {good}\r\n\r\n");
            assert!(request(&text).is_ok(), "refused Host {good:?}");
        }
        for bad in [
            "a b", "a, b", "a/b", "a?b", "a#b", "user@a", "a:80:81", "a:8x", "[::1", "[]", "a\"b",
            "a<b>",
        ] {
            let text = format!("GET / HTTP/1.1\r\nHost: {bad}\r\n\r\n");
            assert_eq!(
                request(&text).map(|_| ()),
                Err(HeadError::Malformed("invalid Host")),
                "accepted Host {bad:?}"
            );
        }
        for bad in ["http://a b/", "http://a:8x/", "http://[::1/"] {
            let text = format!("GET {bad} HTTP/1.1\r\nHost: a\r\n\r\n");
            assert!(request(&text).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn oversized_heads() {
        let long_uri = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_HEAD_SIZE));
        assert_eq!(request(&long_uri).unwrap_err().status(), 414);
        let long_head = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD_SIZE));
        assert_eq!(request(&long_head).unwrap_err().status(), 431);
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("X-{i}: y\r\n"))
            .collect();
        let text = format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n");
        assert_eq!(request(&text).unwrap_err().status(), 431);
    }

    #[test]
    fn response_framing() {
        let parse = |text: &str, head: bool| {
            parse_response(&mut BytesMut::from(text.as_bytes()), head)
                .unwrap()
                .unwrap()
                .framing
        };
        assert_eq!(
            parse("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", false),
            Framing::Length(3)
        );
        assert_eq!(
            parse("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", true),
            Framing::Empty
        );
        assert_eq!(parse("HTTP/1.1 204 No\r\n\r\n", false), Framing::Empty);
        assert_eq!(
            parse(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false
            ),
            Framing::Chunked
        );
        assert_eq!(parse("HTTP/1.1 200 OK\r\n\r\n", false), Framing::UntilClose);
        assert!(
            parse_response(
                &mut BytesMut::from(
                    &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                        [..]
                ),
                false
            )
            .is_err()
        );
    }

    #[test]
    fn a_response_head_over_the_limit_is_refused_even_when_it_arrived_whole() {
        // A backend that sends its head in one write may have it read in one piece, past the
        // limit a head that arrives in pieces is held to.
        let text = format!(
            "HTTP/1.1 200 OK\r\nX: {}\r\nContent-Length: 0\r\n\r\n",
            "a".repeat(MAX_HEAD_SIZE)
        );
        assert_eq!(
            parse_response(&mut BytesMut::from(text.as_bytes()), false).map(|_| ()),
            Err(HeadError::TooLarge)
        );
    }

    #[test]
    fn a_status_line_without_a_readable_reason_goes_on_with_an_empty_one() {
        for (line, reason) in [
            (&b"HTTP/1.1 200\r\n"[..], &b""[..]),
            (b"HTTP/1.1 200 \r\n", b""),
            (b"HTTP/1.1 404 Not \xffound\r\n", b""),
            (b"HTTP/1.1 201 Made it\r\n", b"Made it"),
        ] {
            let mut buf = BytesMut::from(line);
            buf.extend_from_slice(b"Content-Length: 0\r\n\r\n");
            let head = parse_response(&mut buf, false).unwrap().unwrap();
            let mut out = BytesMut::new();
            head.write_downstream(
                &mut out,
                head.framing,
                Persistence::KeepAlive,
                &[],
                &[],
                &[],
            );
            let status_line = out[..].split(|&b| b == b'\r').next().unwrap();
            assert_eq!(status_line, [&line[..12], b" ", reason].concat());
        }
    }

    #[test]
    fn an_http10_response_with_transfer_encoding_closes_its_connection() {
        // RFC 9112 section 6.1: its framing is to be treated as faulty, so the connection is
        // not used again, keep-alive or not.
        let head = parse_response(
            &mut BytesMut::from(
                &b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
                    [..],
            ),
            false,
        )
        .unwrap()
        .unwrap();
        assert!(head.close);
        let head = parse_response(
            &mut BytesMut::from(
                &b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n"[..],
            ),
            false,
        )
        .unwrap()
        .unwrap();
        assert!(!head.close);
    }

    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, Vec<u8>, usize), HeadError> {
        let mut decoder = ChunkedDecoder::default();
        let mut pos = 0;
        let mut body = Vec::new();
        loop {
            match decoder.decode(input, &mut pos)? {
                Decoded::Data(r) => body.extend_from_slice(&input[r]),
                Decoded::End(n) => return Ok((body, decoder.trailers, n)),
                Decoded::NeedMore => return Err(HeadError::Malformed("incomplete")),
            }
        }
    }

    #[test]
    fn chunked_bodies() {
        let (body, trailers, n) =
            decode_all(b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-T: 1\r\n\r\nNEXT").unwrap();
        assert_eq!(body, b"hello world");
        assert_eq!(trailers, b"X-T: 1\r\n");
        assert_eq!(n, 40);
        for bad in [
            &b"5\r\nhelloX\r\n0\r\n\r\n"[..],
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"fffffffffffffffff\r\n",
            b" 5\r\nhello\r\n0\r\n\r\n",
            b"0\r\nX-T: 1\n\r\n",
        ] {
            assert!(
                decode_all(bad).is_err(),
                "accepted {:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn chunk_data_can_be_skipped_and_decoding_goes_on() {
        let mut decoder = ChunkedDecoder::default();
        let mut pos = 0;
        let input = b"20;x=y\r\n0123";
        assert_eq!(decoder.decode(input, &mut pos), Ok(Decoded::Data(8..12)));
        assert_eq!(decoder.decode(input, &mut pos), Ok(Decoded::NeedMore));
        // 28 of the chunk's 32 bytes are still to come: moved by someone else.
        assert_eq!(decoder.data_left(), 28);
        decoder.skip_data(28);
        assert_eq!(decoder.data_left(), 0);
        let mut pos = 0;
        let rest = b"\r\n3\r\nabc\r\n0\r\n\r\n";
        assert_eq!(decoder.decode(rest, &mut pos), Ok(Decoded::Data(5..8)));
        assert_eq!(decoder.decode(rest, &mut pos), Ok(Decoded::End(rest.len())));
        // Outside chunk data there is nothing to skip.
        let mut fresh = ChunkedDecoder::default();
        assert_eq!(fresh.data_left(), 0);
        fresh.skip_data(5);
        let mut pos = 0;
        assert_eq!(fresh.decode(b"0\r\n\r\n", &mut pos), Ok(Decoded::End(5)));
    }

    #[test]
    fn chunk_size_lines() {
        for (n, line) in [
            (0u64, "0\r\n"),
            (1, "1\r\n"),
            (255, "ff\r\n"),
            (65536, "10000\r\n"),
        ] {
            let mut out = BytesMut::new();
            encode_chunk_size(&mut out, n);
            assert_eq!(&out[..], line.as_bytes());
        }
    }

    #[test]
    fn chunked_decoding_survives_any_split() {
        let input = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        for cut in 1..input.len() {
            let mut decoder = ChunkedDecoder::default();
            let mut body = Vec::new();
            let mut ended = false;
            for part in [&input[..cut], &input[cut..]] {
                let mut pos = 0;
                loop {
                    match decoder.decode(part, &mut pos).unwrap() {
                        Decoded::Data(r) => body.extend_from_slice(&part[r]),
                        Decoded::End(_) => {
                            ended = true;
                            break;
                        }
                        Decoded::NeedMore => break,
                    }
                }
            }
            assert!(ended, "cut {cut}");
            assert_eq!(body, b"hello world", "cut {cut}");
        }
    }

    #[test]
    fn chunk_encoding() {
        let mut out = BytesMut::new();
        encode_chunk(&mut out, &[b'x'; 26]);
        encode_last_chunk(&mut out, b"");
        assert_eq!(&out[..], b"1a\r\nxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n0\r\n\r\n");
    }

    #[test]
    fn dot_segments_are_removed() {
        for (target, clean) in [
            ("/a/b/../c", Some("/a/c")),
            ("/a/./b", Some("/a/b")),
            ("/a/.", Some("/a/")),
            ("/a/..", Some("/")),
            ("/..", Some("/")),
            ("/.", Some("/")),
            ("/../../a", Some("/a")),
            ("/a/%2e%2E/b?x=/../y", Some("/b?x=/../y")),
            ("/a/.%2e/b", Some("/b")),
            ("//a/../b", Some("//b")),
            ("/a/b/", None),
            ("/a/.../b", None),
            ("/a/..b/c", None),
            ("/a/%2e%2e%2e", Some("/a/...")),
            ("/a/..%2Fb", None),
            ("/a/%252e%252e/b", None),
            ("/.well-known/x", None),
            ("/a?x=/../y", None),
            ("*", None),
            ("/%61dmin/%7e?q=%61", Some("/admin/~?q=%61")),
            ("/a/%2F%25%20%c3%a9%4", None),
            ("/%2e%2E/%41", Some("/A")),
            ("/%%41%", Some("/%25A%25")),
        ] {
            assert_eq!(without_dot_segments(target).as_deref(), clean, "{target}");
        }
    }

    #[test]
    fn normalising_makes_no_new_escape_and_keeps_other_text() {
        for (target, clean) in [
            // A stray `%` next to a decoded digit would read as an escape once more: the
            // route would see `/%61dmin` and the backend `/admin`.
            ("/%6%31dmin", Some("/%2561dmin")),
            ("/%2%65%2%65/x", Some("/%252e%252e/x")),
            ("/100%/%41", Some("/100%25/A")),
            ("/100%", None),
            // Text that is not an escape goes on as it came, UTF-8 included.
            ("/caf\u{e9}/%41?q=\u{e9}", Some("/caf\u{e9}/A?q=\u{e9}")),
            ("/\u{1f600}/%2e%2e/%7E", Some("/~")),
        ] {
            let once = without_dot_segments(target);
            assert_eq!(once.as_deref(), clean, "{target}");
            if let Some(once) = once {
                assert_eq!(without_dot_segments(&once), None, "{target}");
            }
        }
    }

    #[test]
    fn cookie_attributes() {
        assert!(has_cookie_attribute(b"a=1; Secure", "Secure"));
        assert!(has_cookie_attribute(
            b"a=1; samesite=Strict",
            "SameSite=Lax"
        ));
        assert!(!has_cookie_attribute(b"secure=1", "Secure"));
        assert!(!has_cookie_attribute(b"a=1; Path=/", "HttpOnly"));
    }

    #[test]
    fn error_responses_are_well_formed() {
        let fields: [(&str, &[u8]); 1] = [("content-type", b"text/plain")];
        let out = local_response(404, &fields, LocalBody::Status, Persistence::Implied);
        let mut buf = out.clone();
        let head = parse_response(&mut buf, false).unwrap().unwrap();
        assert_eq!(head.status, 404);
        assert_eq!(head.framing, Framing::Length(buf.len() as u64));
        assert_eq!(&buf[..], b"404 Not Found\n");
        let fields: [(&str, &[u8]); 2] = [("retry-after", b"7"), ("x-request-id", b"abc")];
        let out = local_response(429, &fields, LocalBody::Status, Persistence::Close);
        let mut buf = out.clone();
        let head = parse_response(&mut buf, false).unwrap().unwrap();
        assert_eq!(head.status, 429);
        assert_eq!(head.header("retry-after"), Some(&b"7"[..]));
        assert_eq!(head.header("x-request-id"), Some(&b"abc"[..]));
        assert!(head.close);
        assert_eq!(&buf[..], b"429 Too Many Requests\n");
        let fields: [(&str, &[u8]); 1] = [("location", b"/x")];
        let mut buf = local_response(308, &fields, LocalBody::Empty, Persistence::Implied);
        let head = parse_response(&mut buf, false).unwrap().unwrap();
        assert_eq!(head.framing, Framing::Empty);
        assert!(buf.is_empty());
    }
}
