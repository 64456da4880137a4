//! `keyward serve`: first start, later starts, health, graceful shutdown.

use reqwest::Method;

use crate::harness::TestServer;

#[tokio::test]
async fn first_start_prints_a_management_key_once_and_later_starts_print_none() {
    let mut first = TestServer::start().await;
    assert!(first.mgmt_key.starts_with("kw_live_"), "{}", first.stderr());
    let key_line = first
        .stderr()
        .lines()
        .filter(|l| l.trim() == first.mgmt_key)
        .count();
    assert_eq!(key_line, 1, "the key stands on a line of its own");
    let org = first.admin(Method::GET, "/v1/org", None).await;
    assert_eq!(org.status, 200);
    let projects = first.admin(Method::GET, "/v1/projects", None).await;
    assert_eq!(projects.body["data"][0]["slug"], "default");
    let key = first.mgmt_key.clone();
    assert!(first.stop().await.success());

    let dir = first.dir.clone();
    drop(first);
    let second = TestServer::start_in(dir, &[]).await;
    assert!(second.mgmt_key.is_empty());
    assert!(!second.stderr().contains("kw_live_"), "{}", second.stderr());
    // Same store: the first key still works, and there is still one organisation.
    let org2 = second.call(Method::GET, "/v1/org", Some(&key), None).await;
    assert_eq!(org2.status, 200);
    assert_eq!(org2.body["id"], org.body["id"]);
}

#[tokio::test]
async fn health_readiness_and_request_ids() {
    let s = TestServer::start().await;
    let health = s
        .client
        .get(format!("{}/healthz", s.internal))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let ready = s
        .client
        .get(format!("{}/readyz", s.internal))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let ok = s.admin(Method::GET, "/v1/org", None).await;
    let id = ok.header("x-request-id").unwrap();
    assert!(id.starts_with("req_") && id.len() == 30);
    let other = s.admin(Method::GET, "/v1/org", None).await;
    assert_ne!(other.header("x-request-id"), Some(id));
}

#[tokio::test]
async fn sigterm_drains_and_exits_cleanly() {
    let mut s = TestServer::start().await;
    assert_eq!(s.admin(Method::GET, "/v1/org", None).await.status, 200);
    let status = s.stop().await;
    assert!(status.success(), "{status}");
    assert!(s.stdout().contains("keyward stopped"));
}

/// Slow or idle clients do not keep sockets: a connection that has not delivered a request's
/// headers within `server.header_read_timeout` is closed, whether it sent part of them,
/// nothing at all, or went quiet after a request.
#[tokio::test]
async fn slow_and_idle_clients_are_disconnected_after_the_header_read_timeout() {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let s = TestServer::start_with_config("[server]\nheader_read_timeout = 1\n", &[]).await;
    let addr = s.base.trim_start_matches("http://").to_owned();
    // Reads until the server closes; returns what it sent and how long that took.
    async fn until_closed(stream: &mut tokio::net::TcpStream, what: &str) -> (String, Duration) {
        let started = Instant::now();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
                Err(_) => panic!("{what}: still open after 10 s"),
            }
        }
        (
            String::from_utf8_lossy(&seen).into_owned(),
            started.elapsed(),
        )
    }

    let mut partial = tokio::net::TcpStream::connect(&addr).await.unwrap();
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (_, took) = until_closed(&mut partial, "partial headers").await;
    assert!(took < Duration::from_secs(5), "closed after {took:?}");

    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (sent, took) = until_closed(&mut silent, "nothing sent").await;
    assert!(sent.is_empty());
    assert!(took < Duration::from_secs(5), "closed after {took:?}");

    // A whole request is answered; then the idle keep-alive connection is closed.
    let mut kept = tokio::net::TcpStream::connect(&addr).await.unwrap();
    kept.write_all(b"GET /v1/org HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (sent, took) = until_closed(&mut kept, "idle after a request").await;
    assert!(sent.starts_with("HTTP/1.1 401"), "{sent}");
    assert!(took < Duration::from_secs(5), "closed after {took:?}");
}

#[tokio::test]
async fn a_connection_that_never_sent_a_byte_does_not_hold_up_the_drain() {
    // The header read timeout (30 s by default) would otherwise keep the drain waiting: HTTP
    // clients open spare connections that may never carry a request.
    let mut s = TestServer::start().await;
    let address = s.base.trim_start_matches("http://").to_owned();
    let _silent = tokio::net::TcpStream::connect(&address).await.unwrap();
    assert_eq!(
        s.call(Method::GET, "/v1/org", Some(&s.mgmt_key.clone()), None)
            .await
            .status,
        200
    );
    let started = std::time::Instant::now();
    assert!(s.stop().await.success());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}
