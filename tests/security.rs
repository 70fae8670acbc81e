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
