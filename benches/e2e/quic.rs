//! QUIC inside the harness: the raw quinn baseline (two plain endpoints with
//! h8's TLS setup and transport windows, but no h8 handshake and no stream
//! header) and a client that speaks the h8 handshake to `server-b` directly.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use ed25519_dalek::VerifyingKey;
use h8::daemon::credentials::machine_token;
use h8::daemon::tls::{peer_tls_key, quic_crypto};
use h8::handshake::{
    ConnectionContext, Initiator, LocalIdentity, Trust, EXPORTER_LABEL, EXPORTER_LEN,
};
use h8::identity::IdentityKey;
use h8::wire::{self, StreamHeader, StreamOpen, StreamReply, MAX_FRAME_LEN};
use quinn::{Endpoint, TransportConfig, VarInt};
use rand_core::{OsRng, RngCore as _};

use crate::cluster::ClientIdentity;

/// The transport settings of `h8d` with its default config
/// (`src/daemon/connection.rs`, `transport`): windows of 8 MiB per stream
/// and 32 MiB per connection, with `streams` concurrent incoming streams.
/// `h8d` starts every connection at 64 and raises the limit as streams are
/// used. The raw quinn server takes 128, enough for its 100 in flight.
pub fn h8_transport(streams: u32) -> Arc<TransportConfig> {
    let mut transport = TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(10)));
    transport.max_idle_timeout(Some(VarInt::from_u32(60_000).into()));
    transport.max_concurrent_bidi_streams(VarInt::from_u32(streams));
    transport.max_concurrent_uni_streams(VarInt::from_u32(0));
    transport.stream_receive_window(VarInt::from_u32(8 * 1024 * 1024));
    transport.receive_window(VarInt::from_u32(32 * 1024 * 1024));
    transport.send_window(32 * 1024 * 1024);
    Arc::new(transport)
}

fn client_config(identity: &IdentityKey, name: &str) -> anyhow::Result<quinn::ClientConfig> {
    let (client, _) = quic_crypto(identity, name).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut config = quinn::ClientConfig::new(Arc::new(client));
    config.transport_config(h8_transport(64));
    Ok(config)
}

/// A raw quinn server that sinks or echoes each stream, and a client
/// endpoint with a live connection to it. Clones share the endpoints.
#[derive(Clone)]
pub struct RawQuinn {
    pub server_address: SocketAddr,
    pub client: Endpoint,
    pub client_config: quinn::ClientConfig,
    pub connection: quinn::Connection,
}

/// First byte of a raw stream: what the server does with it.
const RAW_SINK: u8 = b's';
const RAW_ECHO: u8 = b'e';

impl RawQuinn {
    pub async fn start() -> anyhow::Result<RawQuinn> {
        let server_identity = IdentityKey::generate();
        let (_, server_crypto) =
            quic_crypto(&server_identity, "raw-server").map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server_config.transport_config(h8_transport(128));
        let server = Endpoint::server(server_config, "127.0.0.1:0".parse()?)?;
        let server_address = server.local_addr()?;
        tokio::spawn(serve_raw(server.clone()));

        let client = Endpoint::client("127.0.0.1:0".parse()?)?;
        let client_config = client_config(&IdentityKey::generate(), "raw-client")?;
        let connection = client
            .connect_with(client_config.clone(), server_address, "h8")?
            .await?;
        Ok(RawQuinn {
            server_address,
            client,
            client_config,
            connection,
        })
    }

    /// Opens a new connection, then its first stream with a one-byte echo.
    pub async fn connect_and_echo(&self) -> anyhow::Result<()> {
        let connection = self
            .client
            .connect_with(self.client_config.clone(), self.server_address, "h8")?
            .await?;
        echo_on(&connection).await?;
        connection.close(VarInt::from_u32(0), b"done");
        Ok(())
    }

    /// Sends `total` bytes on one stream and waits for the count.
    pub async fn bulk(&self, total: u64, chunk: &[u8]) -> anyhow::Result<u64> {
        let (mut send, mut recv) = self.connection.open_bi().await?;
        send.write_all(&[RAW_SINK]).await?;
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            send.write_all(&chunk[..n]).await?;
            left -= n as u64;
        }
        send.finish()?;
        let mut count = [0u8; 8];
        recv.read_exact(&mut count).await?;
        Ok(u64::from_le_bytes(count))
    }

    /// Opens a stream on the live connection and echoes one byte.
    pub async fn open_and_echo(&self) -> anyhow::Result<()> {
        echo_on(&self.connection).await
    }
}

async fn echo_on(connection: &quinn::Connection) -> anyhow::Result<()> {
    let (mut send, mut recv) = connection.open_bi().await?;
    send.write_all(&[RAW_ECHO, 1]).await?;
    let mut byte = [0u8; 1];
    recv.read_exact(&mut byte).await?;
    send.finish()?;
    Ok(())
}

async fn serve_raw(server: Endpoint) {
    while let Some(incoming) = server.accept().await {
        tokio::spawn(async move {
            let Ok(connection) = incoming.await else {
                return;
            };
            while let Ok((send, recv)) = connection.accept_bi().await {
                tokio::spawn(serve_raw_stream(send, recv));
            }
        });
    }
}

async fn serve_raw_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let mut kind = [0u8; 1];
    if recv.read_exact(&mut kind).await.is_err() {
        return;
    }
    if kind[0] == RAW_ECHO {
        let mut byte = [0u8; 1];
        if recv.read_exact(&mut byte).await.is_ok() {
            let _ = send.write_all(&byte).await;
        }
        let _ = send.finish();
        return;
    }
    let mut total = 0u64;
    loop {
        match recv.read_chunk(256 * 1024, true).await {
            Ok(Some(chunk)) => total += chunk.bytes.len() as u64,
            Ok(None) => break,
            Err(_) => return,
        }
    }
    let _ = send.write_all(&total.to_le_bytes()).await;
    let _ = send.finish();
}

/// A client that dials `server-b` as one of its pinned client identities
/// and runs the same handshake code as `h8d` (`h8::handshake::Initiator`).
pub struct HandshakeClient {
    endpoint: Endpoint,
    server: SocketAddr,
    server_key: VerifyingKey,
    identities: Vec<(String, IdentityKey, quinn::ClientConfig, Vec<u8>)>,
}

/// A connection that finished the h8 handshake.
pub struct H8Connection {
    pub connection: quinn::Connection,
}

impl HandshakeClient {
    pub fn new(
        server_port: u16,
        server_key: VerifyingKey,
        clients: &[ClientIdentity],
    ) -> anyhow::Result<HandshakeClient> {
        let mut identities = Vec::new();
        for client in clients {
            let key = IdentityKey::from_signing_key(client.key.signing_key().clone());
            let config = client_config(&key, &client.name)?;
            // Signed once, as h8d does: a daemon reuses its machine token
            // for every connection until the token is rotated.
            let (token, _) = machine_token(&key, &client.name, unix_now(), 3600);
            identities.push((client.name.clone(), key, config, token));
        }
        Ok(HandshakeClient {
            endpoint: Endpoint::client("127.0.0.1:0".parse()?)?,
            server: SocketAddr::from(([127, 0, 0, 1], server_port)),
            server_key,
            identities,
        })
    }

    /// Connects as identity `index` and runs the h8 handshake.
    pub async fn connect(&self, index: usize) -> anyhow::Result<H8Connection> {
        let (name, key, config, token) = &self.identities[index % self.identities.len()];
        let connection = self
            .endpoint
            .connect_with(config.clone(), self.server, "h8")?
            .await?;
        let mut exporter = [0u8; EXPORTER_LEN];
        connection
            .export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
            .map_err(|_| anyhow::anyhow!("TLS exporter unavailable"))?;
        let context = ConnectionContext {
            exporter,
            peer_tls_key: peer_tls_key(&connection)
                .context("server-b sent no Ed25519 certificate")?,
        };
        let local = LocalIdentity {
            name: name.clone(),
            key: key.signing_key().clone(),
            token: token.clone(),
        };
        let trust = Trust::Sidecar {
            pinned: HashMap::from([("server-b".to_owned(), self.server_key)]),
            leeway: 30,
        };
        let mut seed = [0u8; 32];
        OsRng.fill_bytes(&mut seed);

        let (mut send, mut recv) = connection.open_bi().await?;
        let (initiator, hello) = Initiator::start(local, trust, context, "server-b", seed);
        send.write_all(&hello).await?;
        let server_hello = read_frame(&mut recv).await?;
        let (initiator, finish) = initiator
            .handle_server_hello(&server_hello, unix_now())
            .map_err(|reject| anyhow::anyhow!("handshake rejected: {}", reject.reason))?;
        send.write_all(&finish).await?;
        send.finish()?;
        let done = read_frame(&mut recv).await?;
        initiator
            .handle_done(&done)
            .map_err(|reject| anyhow::anyhow!("handshake rejected: {}", reject.reason))?;
        Ok(H8Connection { connection })
    }
}

impl H8Connection {
    /// Opens `service`, waits for the accept reply and echoes one byte.
    pub async fn open_and_echo(&self, service: &str) -> anyhow::Result<()> {
        let (mut send, mut recv) = self.connection.open_bi().await?;
        let open = wire::encode(&StreamHeader::Open(StreamOpen {
            service: service.to_owned(),
        }));
        send.write_all(&open).await?;
        let reply: StreamReply = wire::decode_body(&read_frame(&mut recv).await?)?;
        if let StreamReply::Reject(reject) = reply {
            bail!("server-b rejected the stream: {}", reject.reason);
        }
        send.write_all(&[1]).await?;
        let mut byte = [0u8; 1];
        recv.read_exact(&mut byte).await?;
        send.finish()?;
        Ok(())
    }

    pub fn close(&self) {
        self.connection.close(VarInt::from_u32(0), b"done");
    }
}

async fn read_frame(recv: &mut quinn::RecvStream) -> anyhow::Result<Vec<u8>> {
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix).await?;
    let len = wire::frame_len(prefix, MAX_FRAME_LEN)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await?;
    Ok(body)
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
