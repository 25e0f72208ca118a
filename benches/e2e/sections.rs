//! The measurements of one run. Each function measures h8 and then its
//! baselines, so h8 and the baselines alternate within a run, and stores
//! its figures in `values` under the keys that `ROWS` in e2e.rs reports.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use ed25519_dalek::{Signer as _, SigningKey};
use h8::identity::IdentityKey;
use h8::token_server::client::{AdminClient, TokenServerClient};
use rand_core::OsRng;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UnixStream};

use crate::cluster::{h8_connect, token_server_names, Cluster, TOKEN_SERVERS};
use crate::measure::{cpu_time, percentiles, rss_bytes};
use crate::quic::{HandshakeClient, RawQuinn};
use crate::Parameters;

type Values = BTreeMap<String, f64>;

const MIB: f64 = 1024.0 * 1024.0;
const CHUNK_LEN: usize = 64 * 1024;

fn cpu_of(pids: &[u32]) -> anyhow::Result<Duration> {
    pids.iter().map(|pid| cpu_time(*pid)).sum()
}

/// Writes `total` bytes, half-closes and reads the sink's 8-byte count.
async fn send_to_sink<S>(stream: &mut S, total: u64) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let chunk = vec![0x5au8; CHUNK_LEN];
    let mut left = total;
    while left > 0 {
        let n = left.min(CHUNK_LEN as u64) as usize;
        stream.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    stream.shutdown().await?;
    let mut count = [0u8; 8];
    stream.read_exact(&mut count).await?;
    let received = u64::from_le_bytes(count);
    ensure!(
        received == total,
        "the sink received {received} of {total} bytes"
    );
    Ok(())
}

/// Times one bulk transfer and the CPU time `pids` spent on it.
async fn timed<F>(pids: &[u32], total: u64, transfer: F) -> anyhow::Result<(f64, f64)>
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let cpu_before = cpu_of(pids)?;
    let start = Instant::now();
    transfer.await?;
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = (cpu_of(pids)? - cpu_before).as_secs_f64();
    let mib = total as f64 / MIB;
    Ok((mib / elapsed, mib / cpu))
}

/// Bulk throughput of one stream and bytes per CPU-second.
pub async fn bulk(
    cluster: &Cluster,
    raw: &RawQuinn,
    parameters: &Parameters,
    values: &mut Values,
) -> anyhow::Result<()> {
    let total = parameters.bulk_bytes;
    let daemons = [cluster.daemon_a.pid(), cluster.daemon_b.pid()];
    let harness = [std::process::id()];
    let stunnels = [cluster.stunnel_client.pid(), cluster.stunnel_server.pid()];

    let mut stream = h8_connect(&cluster.socket_a, "server-b", "sink").await?;
    let (rate, per_cpu) = timed(&daemons, total, send_to_sink(&mut stream, total)).await?;
    values.insert("bulk_h8".into(), rate);
    values.insert("cpu_h8".into(), per_cpu);

    let chunk = vec![0x5au8; CHUNK_LEN];
    let (rate, per_cpu) = timed(&harness, total, async {
        let received = raw.bulk(total, &chunk).await?;
        ensure!(
            received == total,
            "raw quinn sink received {received} of {total} bytes"
        );
        Ok(())
    })
    .await?;
    values.insert("bulk_quinn".into(), rate);
    values.insert("cpu_quinn".into(), per_cpu);

    let mut stream = TcpStream::connect(("127.0.0.1", cluster.sink_port)).await?;
    let (rate, _) = timed(&harness, total, send_to_sink(&mut stream, total)).await?;
    values.insert("bulk_tcp".into(), rate);

    let mut stream = TcpStream::connect(("127.0.0.1", cluster.stunnel_sink_port)).await?;
    let (rate, per_cpu) = timed(&stunnels, total, send_to_sink(&mut stream, total)).await?;
    values.insert("bulk_stunnel".into(), rate);
    values.insert("cpu_stunnel".into(), per_cpu);
    Ok(())
}

async fn echo_byte<S>(stream: &mut S) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(&[1]).await?;
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).await?;
    Ok(())
}

/// Opens a stream to the echo service through server-a's API and echoes
/// one byte.
async fn h8_open_and_echo(cluster: &Cluster) -> anyhow::Result<()> {
    let mut stream = h8_connect(&cluster.socket_a, "server-b", "echo").await?;
    echo_byte(&mut stream).await
}

fn insert_percentiles(values: &mut Values, prefix: &str, samples: &mut [Duration]) {
    let p = percentiles(samples);
    values.insert(format!("{prefix}_p50"), p.p50);
    values.insert(format!("{prefix}_p99"), p.p99);
    values.insert(format!("{prefix}_max"), p.max);
}

/// Latency of a stream open with a one-byte echo, and its baselines.
pub async fn open_latency(
    cluster: &Cluster,
    raw: &RawQuinn,
    parameters: &Parameters,
    values: &mut Values,
) -> anyhow::Result<()> {
    let count = parameters.latency_samples;

    let mut samples = Vec::with_capacity(count);
    let mut upgrades = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        let mut stream = h8_connect(&cluster.socket_a, "server-b", "echo").await?;
        upgrades.push(start.elapsed());
        echo_byte(&mut stream).await?;
        samples.push(start.elapsed());
    }
    insert_percentiles(values, "open_h8", &mut samples);
    insert_percentiles(values, "upgrade_h8", &mut upgrades);

    samples.clear();
    for _ in 0..count {
        let start = Instant::now();
        raw.open_and_echo().await?;
        samples.push(start.elapsed());
    }
    insert_percentiles(values, "open_quinn", &mut samples);

    samples.clear();
    let mut unix = UnixStream::connect(&cluster.unix_echo).await?;
    for _ in 0..count {
        let start = Instant::now();
        echo_byte(&mut unix).await?;
        samples.push(start.elapsed());
    }
    insert_percentiles(values, "unix_rtt", &mut samples);

    samples.clear();
    for _ in 0..parameters.stunnel_samples {
        let start = Instant::now();
        let mut stream = TcpStream::connect(("127.0.0.1", cluster.stunnel_echo_port)).await?;
        stream.set_nodelay(true)?;
        echo_byte(&mut stream).await?;
        samples.push(start.elapsed());
    }
    insert_percentiles(values, "stunnel_new", &mut samples);

    let budget = values["open_quinn_p50"] + 2.0 * values["unix_rtt_p50"] + 20.0;
    values.insert("open_budget_p50".into(), budget);
    Ok(())
}

/// New connections with their first stream: latency one at a time, and
/// the rate with 32 in flight.
pub async fn new_connections(
    cluster: &Cluster,
    raw: &RawQuinn,
    parameters: &Parameters,
    values: &mut Values,
) -> anyhow::Result<()> {
    let client = Arc::new(HandshakeClient::new(
        cluster.port_b,
        cluster.key_b,
        &cluster.clients,
    )?);

    let mut samples = Vec::new();
    for index in 0..parameters.new_connection_samples {
        let start = Instant::now();
        let connection = client.connect(index).await?;
        connection.open_and_echo("echo").await?;
        samples.push(start.elapsed());
        connection.close();
    }
    insert_percentiles(values, "newconn_h8", &mut samples);

    samples.clear();
    for _ in 0..parameters.new_connection_samples {
        let start = Instant::now();
        raw.connect_and_echo().await?;
        samples.push(start.elapsed());
    }
    insert_percentiles(values, "newconn_quinn", &mut samples);

    const WORKERS: usize = 32;
    let per_worker = parameters.connections_per_second_total / WORKERS;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..WORKERS {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            // Worker w dials as identities w, w + 32, ...: no two workers
            // share an identity, so server-b gets no simultaneous duplicates.
            for round in 0..per_worker {
                let connection = client.connect(worker + WORKERS * (round % 4)).await?;
                connection.open_and_echo("echo").await?;
                connection.close();
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let total = (per_worker * WORKERS) as f64;
    values.insert("cps_h8".into(), total / start.elapsed().as_secs_f64());

    let raw = Arc::new(raw.clone());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..WORKERS {
        let raw = raw.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..per_worker {
                raw.connect_and_echo().await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    values.insert("cps_quinn".into(), total / start.elapsed().as_secs_f64());
    Ok(())
}

/// Runs `concurrency` loops of `open` for `seconds` and returns opens per second.
async fn rate<F, Fut>(concurrency: usize, seconds: f64, open: F) -> anyhow::Result<f64>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let open = Arc::new(open);
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let open = open.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                open().await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

/// Stream opens per second at several concurrency levels.
pub async fn stream_rates(
    cluster: &Cluster,
    raw: &RawQuinn,
    parameters: &Parameters,
    values: &mut Values,
) -> anyhow::Result<()> {
    let socket = Arc::new(cluster.socket_a.clone());
    for &concurrency in &parameters.concurrency_levels {
        let socket = socket.clone();
        let opens = rate(concurrency, parameters.rate_seconds, move || {
            let socket = socket.clone();
            async move {
                let mut stream = h8_connect(&socket, "server-b", "echo").await?;
                echo_byte(&mut stream).await
            }
        })
        .await?;
        values.insert(format!("streams_h8_{concurrency}"), opens);
        if concurrency == 100 {
            let raw = Arc::new(raw.clone());
            let opens = rate(concurrency, parameters.rate_seconds, move || {
                let raw = raw.clone();
                async move { raw.open_and_echo().await }
            })
            .await?;
            values.insert("streams_quinn_100".into(), opens);
        }
    }
    Ok(())
}

/// Enrolled resource servers with open sessions, for token requests.
pub struct TokenClients {
    /// Each server's client (as each daemon has its own), source
    /// identifier and key.
    servers: Vec<(TokenServerClient, String, SigningKey)>,
    tokend_pid: u32,
}

impl TokenClients {
    /// Enrolls the servers of the token server's policy and opens a session
    /// for each.
    pub async fn enroll(cluster: &Cluster) -> anyhow::Result<TokenClients> {
        let ready = &cluster.tokend_ready;
        let admin = AdminClient::new(&ready.admin_socket);
        let client = TokenServerClient::new(&ready.listen, &ready.tls_pin)?;
        let mut servers = Vec::new();
        for name in token_server_names(TOKEN_SERVERS) {
            let key = IdentityKey::generate();
            let code = admin.enroll(&name, None).await?.enrollment_code;
            client.enroll(&name, &code, &key.public()).await?;
            let session = client.open_session(&name, key.signing_key()).await?;
            let own = TokenServerClient::new(&ready.listen, &ready.tls_pin)?;
            servers.push((own, session.source_id, key.signing_key().clone()));
        }
        Ok(TokenClients {
            servers,
            tokend_pid: cluster.tokend.pid(),
        })
    }
}

/// Tokens per second through the token server's API with one client per
/// enrolled server, and raw Ed25519 signatures per second on one core.
pub async fn token_issuance(
    tokens: &TokenClients,
    parameters: &Parameters,
    values: &mut Values,
) -> anyhow::Result<()> {
    let issued = Arc::new(AtomicU64::new(0));
    let cpu_before = cpu_time(tokens.tokend_pid)?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(parameters.rate_seconds);
    let mut tasks = Vec::new();
    for (client, source_id, key) in tokens.servers.clone() {
        let issued = issued.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let now = crate::quic::unix_now();
                client
                    .request_token(&source_id, "bench", &key, now)
                    .await
                    .context("token request failed")?;
                issued.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = (cpu_time(tokens.tokend_pid)? - cpu_before).as_secs_f64();
    let count = issued.load(Ordering::Relaxed) as f64;
    values.insert("tokens_api".into(), count / elapsed);
    values.insert("tokens_per_cpu".into(), count / cpu);

    let seconds = parameters.rate_seconds;
    let signs = tokio::task::spawn_blocking(move || {
        // A message the size of a client token with one grant.
        let key = SigningKey::generate(&mut OsRng);
        let message = vec![0x42u8; 300];
        let start = Instant::now();
        let mut count = 0u64;
        while start.elapsed().as_secs_f64() < seconds {
            std::hint::black_box(key.sign(std::hint::black_box(&message)));
            count += 1;
        }
        count as f64 / start.elapsed().as_secs_f64()
    })
    .await?;
    values.insert("sign_one_core".into(), signs);
    Ok(())
}

/// RSS growth of server-b per idle peer connection, and of both daemons
/// per open idle stream.
pub async fn memory(
    cluster: &Cluster,
    parameters: &Parameters,
    values: &mut Values,
) -> anyhow::Result<()> {
    let pid_a = cluster.daemon_a.pid();
    let pid_b = cluster.daemon_b.pid();
    // Connect server-a to server-b first, so the stream readings below do
    // not include that connection.
    h8_open_and_echo(cluster).await?;
    settle().await;

    let client = HandshakeClient::new(cluster.port_b, cluster.key_b, &cluster.clients)?;
    let count = parameters.memory_connections;
    let before = rss_bytes(pid_b)?;
    let mut connections = Vec::new();
    for index in 0..count {
        connections.push(client.connect(index).await?);
    }
    settle().await;
    let after = rss_bytes(pid_b)?;
    values.insert(
        "mem_connection".into(),
        (after as f64 - before as f64) / count as f64 / 1024.0,
    );
    for connection in &connections {
        connection.close();
    }
    drop(connections);
    settle().await;

    let count = parameters.memory_streams;
    let before_a = rss_bytes(pid_a)?;
    let before_b = rss_bytes(pid_b)?;
    let mut streams = Vec::new();
    for _ in 0..count {
        let mut stream = h8_connect(&cluster.socket_a, "server-b", "echo").await?;
        echo_byte(&mut stream).await?;
        streams.push(stream);
    }
    settle().await;
    let after_a = rss_bytes(pid_a)?;
    let after_b = rss_bytes(pid_b)?;
    values.insert(
        "mem_stream_a".into(),
        (after_a as f64 - before_a as f64) / count as f64 / 1024.0,
    );
    values.insert(
        "mem_stream_b".into(),
        (after_b as f64 - before_b as f64) / count as f64 / 1024.0,
    );
    drop(streams);
    settle().await;
    Ok(())
}

/// Gives the daemons time to finish the work a step started.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(500)).await;
}
