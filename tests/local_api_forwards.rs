//! `[[forwards]]` and identity for backends: plain curl through a Unix
//! forward, PROXY v2 bytes, HTTP identity headers, reload, and a peer
//! killed mid-stream.

#[path = "common/api.rs"]
mod api;

use std::convert::Infallible;
use std::time::Duration;

use api::{allow_a, curl, pattern, start_echo_pair, start_pair, tcp_service, NodeSpec};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_unix_forward() {
    let root = tempfile::tempdir().expect("tempdir");
    let site = root.path().join("site");
    std::fs::create_dir_all(&site).expect("site dir");
    let file = pattern(2 << 20, 3);
    std::fs::write(site.join("file.bin"), &file).expect("write file");

    let port = free_tcp_port();
    let server = std::process::Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(&site)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(mut server) = server else {
        eprintln!("NOTE: python3 is not installed; skipping curl_through_unix_forward");
        return;
    };
    let address: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    for _ in 0..100 {
        if TcpStream::connect(address).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let b_spec = NodeSpec {
        services: tcp_service("web", address, "none"),
        policy: allow_a(&["web"]),
        ..NodeSpec::default()
    };
    let a_spec = NodeSpec {
        forwards: "[[forwards]]\nlisten = \"unix:{dir}/web.sock\"\npeer = \"server-b\"\nservice = \"web\"\n"
            .to_owned(),
        ..NodeSpec::default()
    };
    let (a, _b) = start_pair(root.path(), a_spec, b_spec);
    let forward = a.dir.join("web.sock");
    let output_path = root.path().join("downloaded.bin");
    let output = curl(&[
        "-sS",
        "--fail",
        "--max-time",
        "30",
        "--unix-socket",
        &forward.display().to_string(),
        "-o",
        &output_path.display().to_string(),
        "http://x/file.bin",
    ]);
    let _ = server.kill();
    let _ = server.wait();
    let Some(output) = output else {
        return;
    };
    assert!(
        output.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(std::fs::read(&output_path).expect("downloaded"), file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_v2_header_is_exact() {
    let backend = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let backend_address = backend.local_addr().expect("address");
    let (headers, mut received) = mpsc::channel::<(Vec<u8>, std::net::SocketAddr)>(1);
    tokio::spawn(async move {
        let (mut stream, from) = backend.accept().await.expect("accept");
        let mut fixed = [0u8; 16];
        stream
            .read_exact(&mut fixed)
            .await
            .expect("read fixed part");
        let len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
        let mut rest = vec![0u8; len];
        stream
            .read_exact(&mut rest)
            .await
            .expect("read addresses and TLVs");
        let mut header = fixed.to_vec();
        header.extend_from_slice(&rest);
        headers.send((header, from)).await.expect("report");
        let (mut read, mut write) = stream.into_split();
        let _ = tokio::io::copy(&mut read, &mut write).await;
    });

    let root = tempfile::tempdir().expect("tempdir");
    let b_spec = NodeSpec {
        services: tcp_service("pp", backend_address, "proxy-v2"),
        policy: allow_a(&["pp"]),
        ..NodeSpec::default()
    };
    let (a, _b) = start_pair(root.path(), NodeSpec::default(), b_spec);
    let (_, mut stream) = a.upgrade("/v1/connect/server-b/pp").await.expect("connect");
    stream.write_all(b"after-header").await.expect("write");
    let mut echoed = [0u8; 12];
    stream.read_exact(&mut echoed).await.expect("read");
    assert_eq!(&echoed, b"after-header");

    let (header, daemon_side) = received.recv().await.expect("header");
    let mut expected = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    expected.push(0x21); // version 2, PROXY
    expected.push(0x11); // TCP over IPv4
    let mut body = vec![127, 0, 0, 1, 127, 0, 0, 1];
    body.extend_from_slice(&a.port.to_be_bytes());
    body.extend_from_slice(&daemon_side.port().to_be_bytes());
    for (kind, value) in [(0xE0u8, "server-a"), (0xE1, ""), (0xE2, "machine:server-a")] {
        body.push(kind);
        body.extend_from_slice(&(value.len() as u16).to_be_bytes());
        body.extend_from_slice(value.as_bytes());
    }
    expected.extend_from_slice(&(body.len() as u16).to_be_bytes());
    expected.extend_from_slice(&body);
    assert_eq!(header, expected);
}

/// An HTTP backend whose response body lists the `h8-*` request headers, sorted.
async fn header_echo_server() -> std::net::SocketAddr {
    use hyper::body::Incoming;
    use hyper::{Request, Response};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                    let mut lines: Vec<String> = request
                        .headers()
                        .iter()
                        .filter(|(name, _)| name.as_str().starts_with("h8-"))
                        .map(|(name, value)| format!("{name}: {}\n", value.to_str().unwrap_or("?")))
                        .collect();
                    lines.sort();
                    let lines = lines.concat();
                    Ok::<_, Infallible>(Response::new(http_body_util::Full::new(
                        bytes::Bytes::from(lines),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_headers_are_set_and_stripped() {
    let backend = header_echo_server().await;
    let root = tempfile::tempdir().expect("tempdir");
    let b_spec = NodeSpec {
        services: tcp_service("web", backend, "http-headers"),
        policy: allow_a(&["web"]),
        ..NodeSpec::default()
    };
    let a_spec = NodeSpec {
        forwards: "[[forwards]]\nlisten = \"unix:{dir}/web.sock\"\npeer = \"server-b\"\nservice = \"web\"\n"
            .to_owned(),
        ..NodeSpec::default()
    };
    let (a, _b) = start_pair(root.path(), a_spec, b_spec);
    let forward = a.dir.join("web.sock").display().to_string();
    // Two URLs: curl sends both requests on one connection, so one stream.
    let Some(output) = curl(&[
        "-sS",
        "--max-time",
        "20",
        "--unix-socket",
        &forward,
        "-H",
        "H8-Peer: mallory",
        "-H",
        "h8-source-id: forged",
        "http://x/one",
        "http://x/two",
    ]) else {
        return;
    };
    assert!(
        output.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let expected = "h8-client-id: \nh8-peer: server-a\nh8-source-id: machine:server-a\n";
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("{expected}{expected}")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_starts_and_stops_forwards() {
    let root = tempfile::tempdir().expect("tempdir");
    let (a, _b) = start_echo_pair(root.path()).await;
    let forward = a.dir.join("added.sock");
    assert!(!forward.exists());

    let config = a.dir.join("h8d.toml");
    let original = std::fs::read_to_string(&config).expect("config");
    let added = format!(
        "{original}\n[[forwards]]\nlisten = \"unix:{}\"\npeer = \"server-b\"\nservice = \"echo\"\n",
        forward.display()
    );
    std::fs::write(&config, added).expect("write config");
    let reload = b"POST /v1/reload HTTP/1.1\r\nHost: h8\r\nConnection: close\r\n\r\n";
    let (status, body) = a.raw_request(reload).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"forwards\":1"), "{body}");
    for _ in 0..100 {
        if forward.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut stream = tokio::net::UnixStream::connect(&forward)
        .await
        .expect("forward listens");
    stream.write_all(b"via forward").await.expect("write");
    stream.shutdown().await.expect("shutdown");
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await.expect("read");
    assert_eq!(reply, b"via forward");

    std::fs::write(&config, original).expect("restore config");
    let (status, body) = a.raw_request(reload).await;
    assert_eq!(status, 200, "{body}");
    for _ in 0..100 {
        if !forward.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!forward.exists(), "removed forward's socket is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_peer_resets_tcp_forward() {
    // "source": streams data until the connection breaks.
    let source = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let source_address = source.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = source.accept().await {
            tokio::spawn(async move {
                let block = vec![7u8; 16 * 1024];
                while stream.write_all(&block).await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
        }
    });
    let root = tempfile::tempdir().expect("tempdir");
    let port = free_tcp_port();
    let b_spec = NodeSpec {
        services: tcp_service("source", source_address, "none"),
        policy: allow_a(&["source"]),
        ..NodeSpec::default()
    };
    let a_spec = NodeSpec {
        forwards: format!(
            "[[forwards]]\nlisten = \"tcp:127.0.0.1:{port}\"\npeer = \"server-b\"\nservice = \"source\"\n"
        ),
        ..NodeSpec::default()
    };
    let (a, mut b) = start_pair(root.path(), a_spec, b_spec);
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect forward");
    let mut buffer = vec![0u8; 64 * 1024];
    let mut total = 0;
    while total < 256 * 1024 {
        let n = stream
            .read(&mut buffer)
            .await
            .expect("read before the kill");
        assert!(n > 0, "stream ended before the kill");
        total += n;
    }

    b.kill();
    // The QUIC idle timeout in the test config is 3 s.
    let outcome = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(error) => return Err(error),
            }
        }
    })
    .await
    .expect("the local end learns of the failure within 30 s");
    let error = outcome.expect_err("a killed peer must not look like a clean end of stream");
    assert_eq!(
        error.kind(),
        std::io::ErrorKind::ConnectionReset,
        "{error}; log:\n{}",
        a.log_text()
    );
}
