//! Request smuggling, judged by an independent classifier: `http_desync_guardian` labels each
//! request the way a desync-aware proxy would (Compliant, Acceptable, Ambiguous, Severe).
//!
//! Every request of a corpus of ambiguous and malformed shapes is sent through the proxy, and the
//! classifier's own guidance must hold: a Severe request never reaches a backend (the client
//! gets a 4xx or 5xx and is disconnected); an Ambiguous one is either refused the same way or
//! forwarded re-framed with the client connection closed after the response; and what reaches
//! a backend is, as the backend received it, Compliant, the one exception being a body on a GET
//! or HEAD (ambiguous by nature, so its connections are closed).

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use http_desync_guardian::request_analyzer::HttpRequestData;
use http_desync_guardian::{ClassificationReason, RequestSafetyTier};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn classify(raw: &[u8]) -> RequestSafetyTier {
    HttpRequestData::analyze_raw_request(raw).tier
}

/// A backend that records the raw head of every request it gets and answers 200.
async fn recording_backend() -> (Backend, Arc<Mutex<Vec<Vec<u8>>>>) {
    let heads = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&heads);
    let backend = Backend::start(move |mut stream| {
        let record = Arc::clone(&record);
        async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            loop {
                let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    continue;
                };
                let head: Vec<u8> = buf.drain(..end + 4).collect();
                record.lock().expect("lock").push(head.clone());
                // The proxy re-frames bodies; read what it announced.
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                if let Some(length) = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                {
                    while buf.len() < length {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..length);
                } else if text.contains("transfer-encoding: chunked") {
                    while !buf.windows(5).any(|w| w == b"0\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(5).position(|w| w == b"0\r\n\r\n").expect("end") + 5;
                    buf.drain(..end);
                }
                if stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    })
    .await;
    (backend, heads)
}

/// Header lines that smuggling attacks are built from, each with a body that fits it.
fn corpus() -> Vec<Vec<u8>> {
    let framing: &[(&str, &str)] = &[
        ("Transfer-Encoding: chunked", "0\r\n\r\n"),
        ("Transfer-Encoding: Chunked", "0\r\n\r\n"),
        ("Transfer-Encoding:  chunked ", "0\r\n\r\n"),
        ("Transfer-Encoding: chunked, chunked", "0\r\n\r\n"),
        ("Transfer-Encoding: identity, chunked", "0\r\n\r\n"),
        ("Transfer-Encoding: chunked, identity", "0\r\n\r\n"),
        ("Transfer-Encoding: xchunked", "0\r\n\r\n"),
        ("Transfer-Encoding: chunked;q=1", "0\r\n\r\n"),
        ("Transfer-Encoding: \"chunked\"", "0\r\n\r\n"),
        ("Transfer-Encoding : chunked", "0\r\n\r\n"),
        ("Transfer-Encoding\t: chunked", "0\r\n\r\n"),
        (" Transfer-Encoding: chunked", "0\r\n\r\n"),
        ("Transfer-Encoding:\tchunked", "0\r\n\r\n"),
        ("Transfer-Encoding:\x0bchunked", "0\r\n\r\n"),
        ("Transfer-Encoding:\x0cchunked", "0\r\n\r\n"),
        (
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity",
            "0\r\n\r\n",
        ),
        ("Transfer_Encoding: chunked", "0\r\n\r\n"),
        (
            "Transfer-Encoding: chunked\r\nContent-Length: 5",
            "0\r\n\r\n",
        ),
        (
            "Content-Length: 5\r\nTransfer-Encoding: chunked",
            "0\r\n\r\n",
        ),
        ("Content-Length: 5", "hello"),
        ("Content-Length: 05", "hello"),
        ("Content-Length: +5", "hello"),
        ("Content-Length: -5", "hello"),
        ("Content-Length: 5 ", "hello"),
        ("Content-Length: 5\r\nContent-Length: 5", "hello"),
        ("Content-Length: 5\r\nContent-Length: 6", "hello!"),
        ("Content-Length: 5, 5", "hello"),
        ("Content-Length: 0x5", "hello"),
        ("Content-Length : 5", "hello"),
        ("Content-Length:\x005", "hello"),
        ("X-Folded: a\r\n b", ""),
        ("X-Bad\x7fName: a", ""),
        ("X-Ctl: a\x01b", ""),
        ("X-Nul: a\x00b", ""),
        ("X-Cr: a\rb", ""),
        ("Host: second", ""),
        ("X-Ok: plain value", ""),
    ];
    let mut requests = Vec::new();
    for (header, body) in framing {
        for method in ["POST", "GET"] {
            requests.push(
                format!("{method} /p HTTP/1.1\r\nHost: a\r\n{header}\r\n\r\n{body}").into_bytes(),
            );
        }
        requests.push(format!("POST /p HTTP/1.0\r\n{header}\r\n\r\n{body}").into_bytes());
    }
    // Request lines.
    for line in [
        "GET /p HTTP/1.1",
        "GET /p  HTTP/1.1",
        "GET /p HTTP/1.1 ",
        "GET /p?x=\x01 HTTP/1.1",
        "GET http://a/p HTTP/1.1",
        "GET /p HTTP/1.2",
        "get /p HTTP/1.1",
        "GET /p\tHTTP/1.1",
    ] {
        requests.push(format!("{line}\r\nHost: a\r\n\r\n").into_bytes());
    }
    // Bare LF and bare CR line ends.
    requests.push(b"GET /p HTTP/1.1\nHost: a\n\n".to_vec());
    requests.push(b"GET /p HTTP/1.1\r\nHost: a\rX: y\r\n\r\n".to_vec());
    requests
}

#[tokio::test]
async fn ambiguous_requests_never_reach_a_backend_and_what_does_is_compliant() {
    let (backend, heads) = recording_backend().await;
    let proxy = Proxy::start(&format!(
        "[[listeners]]\nname = \"l7\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ndefault_pool = \"p\"\n[pools.p]\nbackends = [\"{}\"]\n",
        backend.addr
    ));
    let mut forwarded = 0;
    for raw in corpus() {
        let tier = classify(&raw);
        let before = heads.lock().expect("lock").len();
        let mut client = HttpClient::connect(proxy.addr("l7")).await;
        client.send(&raw).await;
        let reply = client.reply().await;
        let reached = heads.lock().expect("lock").len() > before;
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let status = reply.as_ref().map(|r| r.status);
        match tier {
            RequestSafetyTier::Severe => {
                assert!(!reached, "Severe request reached the backend: {shown:?}");
                assert!(
                    status.is_none_or(|s| s >= 400),
                    "Severe request got {status:?}: {shown:?}"
                );
                assert!(
                    client.closed().await,
                    "connection kept after Severe: {shown:?}"
                );
            }
            RequestSafetyTier::Ambiguous => {
                if reached {
                    assert!(
                        client.closed().await,
                        "forwarded Ambiguous request left the connection open: {shown:?}"
                    );
                } else {
                    assert!(
                        status.is_none_or(|s| s >= 400),
                        "Ambiguous request got {status:?}: {shown:?}"
                    );
                    assert!(
                        client.closed().await,
                        "connection kept after Ambiguous: {shown:?}"
                    );
                }
            }
            _ => {}
        }
        if reached {
            forwarded += 1;
        }
    }
    // Every head the backend saw, judged as the backend saw it.
    for head in heads.lock().expect("lock").iter() {
        let verdict = HttpRequestData::analyze_raw_request(head);
        let body_on_get = verdict.reason == ClassificationReason::UndefinedContentLengthSemantics;
        assert!(
            verdict.tier == RequestSafetyTier::Compliant || body_on_get,
            "the backend got a {:?} ({:?}) request: {:?}",
            verdict.tier,
            verdict.reason,
            String::from_utf8_lossy(head)
        );
    }
    assert!(
        forwarded > 5,
        "the corpus should also hold requests that pass"
    );
}
