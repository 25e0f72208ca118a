//! Incoming streams forwarded to a service's local target.

use std::net::SocketAddr;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpStream, UnixStream};

use super::pipe::{pipe, PipeError, PipeStats};
use super::PeerIdentity;
use crate::config::{IdentityHeader, Target};
use crate::proxy_v2;

/// A byte stream to a local program.
pub trait LocalIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> LocalIo for T {}

/// A connected local target.
pub struct LocalTarget {
    io: Pin<Box<dyn LocalIo>>,
    local_addr: Option<SocketAddr>,
    tcp: bool,
}

impl std::fmt::Debug for LocalTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalTarget")
            .field("tcp", &self.tcp)
            .finish_non_exhaustive()
    }
}

/// Connects to a service's `unix:` or `tcp:` target.
pub async fn connect_target(target: &Target) -> std::io::Result<LocalTarget> {
    match target {
        Target::Unix(path) => Ok(LocalTarget {
            io: Box::pin(UnixStream::connect(path).await?),
            local_addr: None,
            tcp: false,
        }),
        Target::Tcp(address) => {
            let stream = TcpStream::connect(address).await?;
            stream.set_nodelay(true)?;
            let local_addr = stream.local_addr().ok();
            Ok(LocalTarget {
                io: Box::pin(stream),
                local_addr,
                tcp: true,
            })
        }
        Target::Accept => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "accept services have no target to connect to",
        )),
    }
}

/// Sends the identity header the service asks for, then pipes the stream.
pub async fn serve(
    mut local: LocalTarget,
    identity: IdentityHeader,
    caller: &PeerIdentity,
    caller_address: SocketAddr,
    local_address: SocketAddr,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) -> Result<PipeStats, PipeError> {
    match identity {
        IdentityHeader::None => {}
        IdentityHeader::ProxyV2 => {
            let header = proxy_v2::encode(
                caller_address,
                local.local_addr.unwrap_or(local_address),
                &[
                    (proxy_v2::TLV_PEER_NAME, caller.name.as_bytes()),
                    (proxy_v2::TLV_CLIENT_ID, caller.client_id.as_bytes()),
                    (proxy_v2::TLV_SOURCE_ID, caller.source_id.as_bytes()),
                ],
            );
            local
                .io
                .write_all(&header)
                .await
                .map_err(PipeError::Local)?;
        }
        IdentityHeader::HttpHeaders => {
            return super::http_identity::serve(local.io, caller, send, recv).await;
        }
    }
    pipe(local.io, send, recv, Vec::new()).await
}
