//! Closes HTTP connections that stop making progress. A client that sends half its
//! headers or half its body and then nothing, or leaves a connection open and silent,
//! would otherwise hold it, and a file descriptor, for ever: enough of them and the
//! server accepts nobody else.
//!
//! A connection is closed once a whole period passes in which not one byte moved either
//! way while the server waited on it. Requests being worked on are not waited on, so a
//! slow answer does not count against its connection. A request's headers must also
//! arrive whole within the period ([`serve`]): a client sending a header byte now and
//! then is never idle, and would hold its connection for as long as the headers may be.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Default for `--idle-timeout-ms`.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(30);

/// A listener whose connections are closed after `limit` without progress.
pub struct IdleClosing<L> {
    inner: L,
    limit: Duration,
}

impl<L> IdleClosing<L> {
    /// Wraps `inner`.
    pub fn new(inner: L, limit: Duration) -> Self {
        IdleClosing { inner, limit }
    }
}

impl<L: axum::serve::Listener> axum::serve::Listener for IdleClosing<L> {
    type Io = IdleIo<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = self.inner.accept().await;
        (IdleIo::new(io, self.limit), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// Serves `app` on the connections of `listener` until `shutdown`, then waits for the
/// requests under way: `axum::serve`, with its headers limit.
pub async fn serve<L>(
    mut listener: IdleClosing<L>,
    app: axum::Router,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()>
where
    L: axum::serve::Listener,
{
    use axum::serve::Listener;
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;

    let headers_within = listener.limit;
    // Each connection holds a receiver: `closed` resolves once all of them are done.
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (io, _) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(app.clone());
        let mut stopping = stopping.clone();
        tokio::spawn(async move {
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(headers_within);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stopping.wait_for(|s| *s) => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
            drop(stopping);
        });
    }
    drop(listener);
    let _ = stop.send(true);
    drop(stopping);
    stop.closed().await;
    Ok(())
}

/// A connection that fails with `TimedOut` after a period without progress.
pub struct IdleIo<T> {
    io: T,
    limit: Duration,
    /// Reads and writes that moved bytes, so far.
    progress: u64,
    /// `progress` when the current period began.
    at_period_start: u64,
    /// Armed at the first wait and then reset once a period; never per request, which
    /// would cost a timer update on the hot path.
    period: Option<Pin<Box<Sleep>>>,
}

impl<T> IdleIo<T> {
    fn new(io: T, limit: Duration) -> Self {
        IdleIo {
            io,
            limit,
            progress: 0,
            at_period_start: 0,
            period: None,
        }
    }

    /// Called when the connection has to wait: pending until a period ends with nothing
    /// moved in it.
    fn wait(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let limit = self.limit;
        let period = self
            .period
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        while period.as_mut().poll(cx).is_ready() {
            if self.progress == self.at_period_start {
                return Poll::Ready(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no bytes moved for {} ms", limit.as_millis()),
                ));
            }
            self.at_period_start = self.progress;
            period.as_mut().reset(Instant::now() + limit);
        }
        Poll::Pending
    }

    /// Passes on what a read or write came to, counting it as progress if it moved
    /// `bytes`; one that has to wait waits on the period too.
    fn account<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
        bytes: usize,
    ) -> Poll<io::Result<R>> {
        match polled {
            Poll::Ready(r) => {
                if bytes > 0 {
                    self.progress += 1;
                }
                Poll::Ready(r)
            }
            Poll::Pending => self.wait(cx).map(Err),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        this.account(cx, polled, buf.filled().len() - before)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        let written = written(&polled);
        this.account(cx, polled, written)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        let written = written(&polled);
        this.account(cx, polled, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Bytes a write came to: none when it failed or has to wait.
fn written(polled: &Poll<io::Result<usize>>) -> usize {
    match polled {
        Poll::Ready(Ok(n)) => *n,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_fails_after_a_period_without_progress() {
        let (near, _far) = tokio::io::duplex(64);
        let mut io = IdleIo::new(near, Duration::from_secs(30));
        let started = Instant::now();
        let err = io.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_trickles_stays_open() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut io = IdleIo::new(near, Duration::from_secs(30));
        let writer = tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_secs(20)).await;
                far.write_all(b"x").await.unwrap();
            }
            far
        });
        let mut got = Vec::new();
        while got.len() < 10 {
            let mut byte = [0u8; 1];
            io.read_exact(&mut byte).await.unwrap();
            got.push(byte[0]);
        }
        // 200 s in, one byte every 20 s: never a whole period without one.
        let _far = writer.await.unwrap();
        let err = io.read(&mut [0u8; 1]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
