//! A minimal HTTP/1.1 client for the admin API (used by `braid status`, `braid cluster up`,
//! `braid bench`, `braid drill` and the end-to-end tests), so none of them needs a full HTTP
//! client library.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response read: status documents are a few KiB.
const RESPONSE_BYTES_MAX: usize = 4 * 1024 * 1024;

/// A failed request.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Connecting, writing or reading failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// No answer in time.
    #[error("timed out")]
    Timeout,
    /// Not an HTTP response, or too large.
    #[error("bad response: {0}")]
    Bad(String),
    /// A status other than 200.
    #[error("HTTP {0}: {1}")]
    Status(u16, String),
}

/// GETs `path` from `addr` and returns the body of a 200 response.
pub async fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String, HttpError> {
    tokio::time::timeout(timeout, get_inner(addr, path))
        .await
        .map_err(|_| HttpError::Timeout)?
}

/// POSTs a JSON `body` to `path` on `addr` and returns the body of a 200 response.
pub async fn post_json(
    addr: SocketAddr,
    path: &str,
    body: &str,
    timeout: Duration,
) -> Result<String, HttpError> {
    tokio::time::timeout(timeout, request(addr, "POST", path, Some(body)))
        .await
        .map_err(|_| HttpError::Timeout)?
}

async fn get_inner(addr: SocketAddr, path: &str) -> Result<String, HttpError> {
    request(addr, "GET", path, None).await
}

async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<String, HttpError> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        request.push_str("\r\n");
    }
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream
        .take(RESPONSE_BYTES_MAX as u64 + 1)
        .read_to_end(&mut raw)
        .await?;
    if raw.len() > RESPONSE_BYTES_MAX {
        return Err(HttpError::Bad("response too large".into()));
    }
    let text = String::from_utf8(raw).map_err(|_| HttpError::Bad("not UTF-8".into()))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| HttpError::Bad("no header end".into()))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| HttpError::Bad("no status".into()))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    if status != 200 {
        return Err(HttpError::Status(status, body));
    }
    Ok(body)
}

fn dechunk(mut body: &str) -> Result<String, HttpError> {
    let mut out = String::new();
    loop {
        let (size, rest) = body
            .split_once("\r\n")
            .ok_or_else(|| HttpError::Bad("bad chunk".into()))?;
        let size = usize::from_str_radix(size.trim(), 16)
            .map_err(|_| HttpError::Bad("bad chunk size".into()))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest
            .get(..size)
            .ok_or_else(|| HttpError::Bad("short chunk".into()))?;
        out.push_str(chunk);
        body = rest
            .get(size + 2..)
            .ok_or_else(|| HttpError::Bad("short chunk".into()))?;
    }
}
