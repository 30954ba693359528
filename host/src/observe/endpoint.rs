//! The metrics endpoint: `GET /metrics` over plain HTTP/1.1 on a TCP listener, one request per
//! connection, answered with [`Metrics::encode`](super::Metrics::encode)'s text.
//!
//! Nothing here is a web framework: a request head is read (at most [`MAX_HEAD_BYTES`], within
//! [`HEAD_TIMEOUT`]), parsed by `httparse`, answered and the connection closed. Every peer is
//! hostile: a head too large is answered 431, one not finished in time is dropped, and at most
//! [`MAX_CONNECTIONS`] are served at once (more wait in the listener's accept queue), so a slow
//! client holds a slot for at most a few seconds and cannot grow the agent's memory.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bridge_protocol::AgentStats;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::metrics::{Format, Metrics};
use super::Observer;

/// The largest request head read, in bytes.
pub const MAX_HEAD_BYTES: usize = 8 << 10;

/// How long a client has to send its request head (and then to read the answer).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;

/// Where the state series come from at each scrape (the agent's stats).
pub type StatsSource = Arc<dyn Fn() -> AgentStats + Send + Sync>;

/// Binds the endpoint's listener at `addr` (port 0: any free port; see
/// [`TcpListener::local_addr`]).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint to {addr}"))
}

/// Serves `listener` until `shutdown`: the observer's metrics, the states read from `stats`.
/// Without metrics in `observer`, every request is answered 404.
pub async fn serve(
    listener: TcpListener,
    observer: Arc<Observer>,
    stats: StatsSource,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        // A slot first, then a connection: beyond the limit clients wait in the accept queue.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors or the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (observer, stats) = (observer.clone(), stats.clone());
        tokio::spawn(async move {
            if let Err(e) = answer(stream, observer.metrics(), &stats).await {
                tracing::debug!(%peer, error = %e, "metrics endpoint: connection closed");
            }
            drop(permit);
        });
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Ask {
    Metrics(Format),
    NotFound,
    WrongMethod,
    Bad,
    TooLarge,
}

/// Reads one request head (bounded in bytes and time) and answers it.
async fn answer(
    mut stream: TcpStream,
    metrics: Option<&Metrics>,
    stats: &StatsSource,
) -> std::io::Result<()> {
    let ask = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "no request head in time")
        })??;
    let (status, content_type, body) = match (ask, metrics) {
        (Ask::Metrics(format), Some(m)) => {
            ("200 OK", format.content_type(), m.encode(&stats(), format))
        }
        (Ask::Metrics(_) | Ask::NotFound, _) => {
            ("404 Not Found", "text/plain", "not found\n".into())
        }
        (Ask::WrongMethod, _) => ("405 Method Not Allowed", "text/plain", "only GET\n".into()),
        (Ask::Bad, _) => ("400 Bad Request", "text/plain", "bad request\n".into()),
        (Ask::TooLarge, _) => (
            "431 Request Header Fields Too Large",
            "text/plain",
            "request head too large\n".into(),
        ),
    };
    let allow = if status.starts_with("405") {
        "Allow: GET\r\n"
    } else {
        ""
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        body.len()
    );
    tokio::time::timeout(HEAD_TIMEOUT, async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "answer not read in time"))?
}

/// Reads until a complete request head, at most [`MAX_HEAD_BYTES`].
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Ask> {
    let mut buf = vec![0u8; MAX_HEAD_BYTES];
    let mut len = 0;
    loop {
        if len == buf.len() {
            return Ok(Ask::TooLarge);
        }
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before the end of the request head",
            ));
        }
        len += n;
        if let Some(ask) = parse_head(&buf[..len]) {
            return Ok(ask);
        }
    }
}

/// What a complete head asks for; `None` while it is incomplete.
fn parse_head(bytes: &[u8]) -> Option<Ask> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Partial) => None,
        Err(httparse::Error::TooManyHeaders) => Some(Ask::TooLarge),
        Err(_) => Some(Ask::Bad),
        Ok(httparse::Status::Complete(_)) => {
            let path = request.path.unwrap_or("");
            let path = path.split_once('?').map_or(path, |(p, _)| p);
            let accept = request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("accept"))
                .and_then(|h| std::str::from_utf8(h.value).ok());
            Some(match (request.method, path) {
                (Some("GET"), "/metrics") => Ask::Metrics(Format::from_accept(accept)),
                (Some("GET"), _) => Ask::NotFound,
                _ => Ask::WrongMethod,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_parsed() {
        let ask = |h: &str| parse_head(h.as_bytes());
        assert_eq!(ask("GET /metrics HTTP/1.1\r\n"), None, "incomplete");
        assert_eq!(
            ask("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Ask::Metrics(Format::Text))
        );
        assert_eq!(
            ask("GET /metrics?name[]=x HTTP/1.0\r\nACCEPT: application/openmetrics-text\r\n\r\n"),
            Some(Ask::Metrics(Format::OpenMetrics))
        );
        assert_eq!(ask("GET / HTTP/1.1\r\n\r\n"), Some(Ask::NotFound));
        assert_eq!(ask("GET /metricsx HTTP/1.1\r\n\r\n"), Some(Ask::NotFound));
        assert_eq!(
            ask("POST /metrics HTTP/1.1\r\n\r\n"),
            Some(Ask::WrongMethod)
        );
        assert_eq!(
            ask("HEAD /metrics HTTP/1.1\r\n\r\n"),
            Some(Ask::WrongMethod)
        );
        assert_eq!(ask("\x16\x03\x01 hello\r\n\r\n"), Some(Ask::Bad));
        let many: String = (0..40).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(
            ask(&format!("GET /metrics HTTP/1.1\r\n{many}\r\n")),
            Some(Ask::TooLarge)
        );
    }
}
