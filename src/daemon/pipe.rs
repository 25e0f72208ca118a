//! Copies bytes between a QUIC stream and a local byte stream.
//!
//! Both directions run at once. End of stream on one side becomes a
//! half-close on the other (QUIC `finish`, or `shutdown` of the local write
//! half). An error in either direction resets the QUIC stream, so the far
//! end sees a broken stream rather than a clean end.

use std::io::IoSlice;

use bytes::{Buf as _, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// QUIC application error code sent when the local side of a stream failed.
pub const LOCAL_ERROR_CODE: u32 = 0x1;
/// QUIC application error code sent when the daemon shuts down a stream.
pub const SHUTDOWN_CODE: u32 = 0x2;

const BUFFER_LEN: usize = 64 * 1024;
/// Maximum number of received chunks per vectored write.
const MAX_CHUNKS: usize = 32;
/// How long a finished stream waits for the peer to acknowledge the rest.
const DELIVERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Bytes moved in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PipeStats {
    /// Bytes from the local side to the peer.
    pub sent: u64,
    /// Bytes from the peer to the local side.
    pub received: u64,
}

/// Errors that ended a pipe.
#[derive(Debug, thiserror::Error)]
pub enum PipeError {
    /// Reading from or writing to the local stream failed.
    #[error("local stream failed: {0}")]
    Local(std::io::Error),
    /// The peer reset or stopped the stream, or the connection broke.
    #[error("peer stream failed: {0}")]
    Peer(String),
}

/// Pipes `local` to and from a QUIC stream until both directions end.
pub async fn pipe<L>(
    local: L,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    initial: Vec<u8>,
) -> Result<PipeStats, PipeError>
where
    L: AsyncRead + AsyncWrite + Unpin,
{
    let (mut local_read, mut local_write) = tokio::io::split(local);

    let outbound = async {
        let mut buffer = BytesMut::new();
        let mut total = 0u64;
        loop {
            // Reading into spare capacity and handing the filled part to
            // quinn as `Bytes` moves the data without copying it again.
            buffer.reserve(BUFFER_LEN);
            let n = match local_read.read_buf(&mut buffer).await {
                Ok(n) => n,
                Err(e) => return Err(PipeError::Local(e)),
            };
            if n == 0 {
                let _ = send.finish();
                // Wait until the peer acknowledges all data, so that closing
                // the connection right after this stream cannot discard data
                // still in flight.
                let _ = tokio::time::timeout(DELIVERY_TIMEOUT, send.stopped()).await;
                return Ok(total);
            }
            send.write_chunk(buffer.split().freeze())
                .await
                .map_err(|e| PipeError::Peer(e.to_string()))?;
            total += n as u64;
        }
    };

    let inbound = async {
        let mut total = 0u64;
        if !initial.is_empty() {
            local_write
                .write_all(&initial)
                .await
                .map_err(PipeError::Local)?;
            total += initial.len() as u64;
        }
        // quinn returns received data one packet at a time. The chunks that
        // are ready go out in one vectored write, so a bulk transfer makes
        // one local write per batch rather than per packet.
        let mut chunks: [Bytes; MAX_CHUNKS] = std::array::from_fn(|_| Bytes::new());
        loop {
            match recv.read_chunks(&mut chunks).await {
                Ok(Some(count)) => {
                    total += write_chunks(&mut local_write, &mut chunks[..count])
                        .await
                        .map_err(PipeError::Local)?;
                    // Release quinn's receive buffers now, not at the next read.
                    chunks[..count].fill(Bytes::new());
                }
                Ok(None) => {
                    let _ = local_write.shutdown().await;
                    return Ok(total);
                }
                Err(e) => return Err(PipeError::Peer(e.to_string())),
            }
        }
    };

    // Run both directions to completion. The first failure ends the pipe,
    // and both QUIC directions are then reset explicitly: quinn finishes a
    // dropped send stream cleanly, which would hide the failure from the peer.
    let result = tokio::try_join!(outbound, inbound);
    match result {
        Ok((sent, received)) => Ok(PipeStats { sent, received }),
        Err(error) => {
            let _ = send.reset(LOCAL_ERROR_CODE.into());
            let _ = recv.stop(LOCAL_ERROR_CODE.into());
            Err(error)
        }
    }
}

/// Writes every byte of `chunks` with vectored writes and returns the count.
async fn write_chunks<W>(local: &mut W, chunks: &mut [Bytes]) -> std::io::Result<u64>
where
    W: AsyncWrite + Unpin,
{
    let total: usize = chunks.iter().map(Bytes::len).sum();
    let mut first = 0;
    while first < chunks.len() {
        let slices: Vec<IoSlice<'_>> = chunks[first..]
            .iter()
            .map(|chunk| IoSlice::new(chunk))
            .collect();
        let mut written = local.write_vectored(&slices).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let chunk = &mut chunks[first];
            let step = written.min(chunk.len());
            chunk.advance(step);
            written -= step;
            if chunk.is_empty() {
                first += 1;
            }
        }
        while first < chunks.len() && chunks[first].is_empty() {
            first += 1;
        }
    }
    Ok(total as u64)
}
