//! What a client may not make a backend believe: the fields the proxy vouches for (client
//! address, scheme, client certificate) come from the proxy alone, however the client spells
//! or places its own. Through the real proxy, with a backend that reports what it received.

mod common;

use common::*;

/// Fields named as the proxy's own once `_` reads as `-`, as CGI, WSGI and Rack servers read
/// them (`X_Client_Cert_Subject` becomes `HTTP_X_CLIENT_CERT_SUBJECT`, as the real one does).
const DISGUISED: [(&str, &str); 5] = [
    ("X_Client_Cert_Subject", "CN=mallory"),
    ("x-client_cert-san", "DNS:mallory.example"),
    ("X_Forwarded_For", "203.0.113.66"),
    ("X_Real_IP", "203.0.113.66"),
    ("x_forwarded_proto", "https"),
];

/// Whether the backend's report names any field of [`DISGUISED`] with its forged value.
fn forged_in(report: &str) -> Vec<String> {
    report
        .lines()
        .filter(|line| line.contains("mallory") || line.contains("203.0.113.66"))
        .map(str::to_owned)
        .chain(
            report
                .lines()
                .filter(|line| {
                    line.split_once(':').is_some_and(|(name, value)| {
                        name.eq_ignore_ascii_case("x_forwarded_proto") && value.contains("https")
                    })
                })
                .map(str::to_owned),
        )
        .collect()
}

#[tokio::test]
async fn forwarding_fields_disguised_with_underscores_never_reach_a_backend() {
    let backend = http_backend("b").await;
    let proxy = Proxy::start(&single_pool(&[backend.addr], "", ""));

    // HTTP/1.1.
    let extra: String = DISGUISED
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    let reply = client.get("/", &extra).await;
    assert_eq!(reply.status, 200);
    let report = reply.text();
    assert!(report.contains("x-forwarded-for: 127.0.0.1"), "{report}");
    assert_eq!(forged_in(&report), Vec::<String>::new(), "{report}");

    // HTTP/2 (prior knowledge), to the same HTTP/1.1 backend.
    let mut sender = h2_connect(proxy.addr("l7")).await;
    let mut request = http::Request::builder().uri("http://test/h2");
    for (name, value) in DISGUISED {
        request = request.header(name.to_ascii_lowercase(), value);
    }
    let request = request.body(()).expect("request");
    let (response, _) = sender.send_request(request, true).expect("sent");
    let response = tokio::time::timeout(PATIENCE, response)
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut report = Vec::new();
    while let Some(chunk) = tokio::time::timeout(PATIENCE, body.data())
        .await
        .expect("body in time")
    {
        let chunk = chunk.expect("body");
        let _ = body.flow_control().release_capacity(chunk.len());
        report.extend_from_slice(&chunk);
    }
    let report = String::from_utf8_lossy(&report);
    assert!(report.contains("x-forwarded-for: 127.0.0.1"), "{report}");
    assert_eq!(forged_in(&report), Vec::<String>::new(), "{report}");
}

/// A backend that answers one chunked request with every byte it received, trailers included
/// (the common backend reads trailers but does not report them).
async fn raw_backend() -> Backend {
    Backend::start(|mut stream| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        // The test's body is one chunk: its last chunk, then trailers to an empty line.
        let complete = |buf: &[u8]| {
            buf.windows(5)
                .position(|w| w == b"\r\n0\r\n")
                .is_some_and(|last| buf[last..].ends_with(b"\r\n\r\n"))
        };
        while !complete(&buf) && buf.len() < 65536 {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let mut reply = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            buf.len()
        )
        .into_bytes();
        reply.extend_from_slice(&buf);
        let _ = stream.write_all(&reply).await;
    })
    .await
}

#[tokio::test]
async fn forwarding_fields_in_a_request_trailer_never_reach_a_backend() {
    // Some servers merge trailers into the head (Apache httpd did, CVE-2013-5704), so a
    // trailer may not carry what the proxy vouches for, nor framing or Host.
    let backend = raw_backend().await;
    let proxy = Proxy::start(&single_pool(&[backend.addr], "", ""));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    client
        .send(
            b"POST /upload HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\nhello\r\n0\r\n\
              X-Client-Cert-Subject: CN=mallory\r\nx_forwarded_for: 203.0.113.66\r\n\
              X-Real-IP: 203.0.113.66\r\nHost: elsewhere.example\r\n\
              Content-Length: 5\r\nX-Checksum: 42\r\n\r\n",
        )
        .await;
    let reply = client.reply().await.expect("a reply");
    assert_eq!(reply.status, 200);
    let received = reply.text();
    assert!(received.contains("hello"), "{received}");
    // The trailer the proxy has no reason to drop is passed on.
    assert!(received.contains("X-Checksum: 42"), "{received}");
    for forged in [
        "mallory",
        "203.0.113.66",
        "elsewhere.example",
        "Content-Length: 5",
    ] {
        assert!(!received.contains(forged), "{forged} passed: {received}");
    }
}

#[tokio::test]
async fn a_route_list_covers_its_path_however_unreserved_characters_are_encoded() {
    // `/%61dmin/` is `/admin/` (RFC 3986 section 6.2.2.2), and a backend decodes it so: a
    // route's list must not be passed by encoding a letter of its prefix.
    let backend = http_backend("web").await;
    let proxy = Proxy::start(&single_pool(
        &[backend.addr],
        r#"  [[listeners.routes]]
  match = { path_prefix = "/admin/" }
  pool = "p"
  deny = ["127.0.0.1"]"#,
        "",
    ));
    let addr = proxy.addr("l7");
    let mut client = HttpClient::connect(addr).await;
    for target in [
        "/admin/x",
        "/%61dmin/x",
        "/%61%64%6D%69%6e/x",
        "/x/%2e%2E/%61dmin/",
    ] {
        let reply = client.get(target, "").await;
        assert_eq!(reply.status, 403, "{target}: {}", reply.text());
    }
    // What is not unreserved stays encoded; the backend sees the path the router saw.
    let reply = client.get("/%7Euser/%41%2F%25%20?q=%61", "").await;
    assert_eq!(reply.status, 200);
    assert!(
        reply
            .text()
            .contains("GET /~user/A%2F%25%20?q=%61 HTTP/1.1"),
        "{}",
        reply.text()
    );

    // HTTP/2's :path too.
    let mut sender = h2_connect(addr).await;
    let request = http::Request::get("http://test/%61dmin/x")
        .body(())
        .expect("request");
    let (response, _) = sender.send_request(request, true).expect("sent");
    let response = tokio::time::timeout(PATIENCE, response)
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(response.status(), 403);
    assert_eq!(
        proxy
            .stats("l7")
            .denied
            .load(std::sync::atomic::Ordering::SeqCst),
        5
    );
}

#[tokio::test]
async fn an_http2_host_field_that_is_no_host_is_refused_as_on_http11() {
    // Without :authority an HTTP/2 request names its host in a Host field (RFC 9113 section
    // 8.3.1). `admin.example, www.example` matches no route, yet a backend that reads a list's
    // first member would serve it as admin.example, past that route's list.
    let backend = http_backend("web").await;
    let proxy = Proxy::start(&single_pool(
        &[backend.addr],
        r#"  [[listeners.routes]]
  match = { host = "admin.example" }
  pool = "p"
  deny = ["127.0.0.1"]"#,
        "",
    ));
    let addr = proxy.addr("l7");
    let mut client = HttpClient::connect(addr).await;
    let reply = client.get("/", "").await;
    assert_eq!(reply.status, 200);
    let head = HttpClient::connect(addr)
        .await
        .head_of(b"GET / HTTP/1.1\r\nHost: admin.example, www.example\r\n\r\n")
        .await;
    assert!(head.starts_with("http/1.1 400"), "{head}");

    let mut sender = h2_connect(addr).await;
    for host in [
        "admin.example, www.example",
        "admin.example/x",
        "admin.example x",
    ] {
        let request = http::Request::get("/")
            .header("host", host)
            .body(())
            .expect("request");
        let (response, _) = sender.send_request(request, true).expect("sent");
        let response = tokio::time::timeout(PATIENCE, response)
            .await
            .expect("in time")
            .expect("response");
        assert_eq!(response.status(), 400, "{host}");
    }
    // A Host that names another host than :authority, and an :authority with userinfo (RFC
    // 9113 section 8.3.1: malformed).
    for (uri, host) in [
        ("http://www.example/", Some("admin.example")),
        ("http://mallory@www.example/", None),
    ] {
        let mut request = http::Request::get(uri);
        if let Some(host) = host {
            request = request.header("host", host);
        }
        let request = request.body(()).expect("request");
        let (response, _) = sender.send_request(request, true).expect("sent");
        let response = tokio::time::timeout(PATIENCE, response)
            .await
            .expect("in time")
            .expect("response");
        assert_eq!(response.status(), 400, "{uri} {host:?}");
    }
    assert_eq!(backend.accepted(), 1, "only the first request reached it");
}

#[tokio::test]
async fn forwarding_fields_in_trailers_never_reach_an_http2_backend() {
    // The backend answers with the names of the request trailers it received.
    let backend = h2_backend_with(|request, mut respond| async move {
        let mut body = request.into_body();
        while let Some(Ok(chunk)) = body.data().await {
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let names = match body.trailers().await {
            Ok(Some(trailers)) => trailers
                .keys()
                .map(|n| n.as_str().to_owned())
                .collect::<Vec<_>>()
                .join(","),
            _ => String::new(),
        };
        let Ok(mut send) = respond.send_response(h2_ok(), false) else {
            return;
        };
        let _ = send.send_data(bytes::Bytes::from(format!("trailers:{names}")), true);
    })
    .await;
    let proxy = Proxy::start(&single_pool(
        &[backend.addr],
        "",
        r#"upstream_protocol = "h2""#,
    ));
    let addr = proxy.addr("l7");

    // An HTTP/2 client's trailers.
    let mut sender = h2_connect(addr).await;
    let request = http::Request::post("http://test/upload")
        .body(())
        .expect("request");
    let (response, mut stream) = sender.send_request(request, false).expect("sent");
    stream
        .send_data(bytes::Bytes::from_static(b"hello"), false)
        .expect("data");
    let mut trailers = http::HeaderMap::new();
    trailers.insert(
        "x-client-cert-subject",
        "CN=mallory".parse().expect("value"),
    );
    trailers.insert("x_real_ip", "203.0.113.66".parse().expect("value"));
    trailers.insert("x-checksum", "42".parse().expect("value"));
    stream.send_trailers(trailers).expect("trailers");
    let response = tokio::time::timeout(PATIENCE, response)
        .await
        .expect("in time")
        .expect("response");
    let mut body = response.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = tokio::time::timeout(PATIENCE, body.data())
        .await
        .expect("body in time")
    {
        text.extend_from_slice(&chunk.expect("body"));
    }
    assert_eq!(String::from_utf8_lossy(&text), "trailers:x-checksum");

    // An HTTP/1.1 client's chunked trailers.
    let mut client = HttpClient::connect(addr).await;
    client
        .send(
            b"POST /upload HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\nhello\r\n0\r\nX-Client-Cert-Subject: CN=mallory\r\n\
              X_Real_IP: 203.0.113.66\r\nX-Checksum: 42\r\n\r\n",
        )
        .await;
    let reply = client.reply().await.expect("a reply");
    assert_eq!(reply.text(), "trailers:x-checksum");
}
