//! Single-core plumbing of an iSCSI connection: a socket shared by the reader and the writer
//! task, and a local queue between tasks (the same shapes as the NBD frontend's, which keeps
//! its own private).
//!
//! Everything lives on one executor thread: sharing is `Rc` + `RefCell`, and no borrow is held
//! across an `.await`.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;

use futures_lite::io::{AsyncRead, AsyncWrite};
use glommio::sync::Semaphore;

/// A byte stream read by one task and written by another.
///
/// glommio's `TcpStream` keeps separate readiness sources for receiving and sending, so a read
/// parked in one task and a write parked in another do not disturb each other; each poll
/// borrows the stream only for the duration of that poll.
pub(super) struct SharedStream<S> {
    inner: RefCell<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> SharedStream<S> {
    pub(super) fn new(stream: S) -> Self {
        SharedStream {
            inner: RefCell::new(stream),
        }
    }

    async fn read_some(&self, buf: &mut [u8]) -> io::Result<usize> {
        poll_fn(|cx| Pin::new(&mut *self.inner.borrow_mut()).poll_read(cx, buf)).await
    }

    /// Fills `buf`; `Ok(false)` if the peer closed the stream before sending any of it (a clean
    /// end at a message boundary), `UnexpectedEof` if it closed part-way.
    pub(super) async fn read_exact_or_eof(&self, buf: &mut [u8]) -> io::Result<bool> {
        let mut filled = 0;
        while filled < buf.len() {
            let n = self.read_some(&mut buf[filled..]).await?;
            if n == 0 {
                if filled == 0 {
                    return Ok(false);
                }
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            filled += n;
        }
        Ok(true)
    }

    /// Fills `buf`; the peer closing first is `UnexpectedEof`.
    pub(super) async fn read_exact(&self, buf: &mut [u8]) -> io::Result<()> {
        if buf.is_empty() || self.read_exact_or_eof(buf).await? {
            Ok(())
        } else {
            Err(io::ErrorKind::UnexpectedEof.into())
        }
    }

    /// Writes all of `buf`.
    pub(super) async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let n =
                poll_fn(|cx| Pin::new(&mut *self.inner.borrow_mut()).poll_write(cx, buf)).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            buf = &buf[n..];
        }
        Ok(())
    }

    /// Flushes anything the stream buffers (a no-op for glommio sockets, kept for generality).
    pub(super) async fn flush(&self) -> io::Result<()> {
        poll_fn(|cx| Pin::new(&mut *self.inner.borrow_mut()).poll_flush(cx)).await
    }
}

/// A first-in first-out queue between tasks of one core.
///
/// The semaphore counts queued items, so `pop` parks without polling and a closed queue wakes
/// every waiter with `None`.
pub(super) struct LocalQueue<T> {
    items: RefCell<VecDeque<T>>,
    ready: Semaphore,
}

impl<T> LocalQueue<T> {
    pub(super) fn with_capacity(capacity: usize) -> Self {
        LocalQueue {
            items: RefCell::new(VecDeque::with_capacity(capacity)),
            ready: Semaphore::new(0),
        }
    }

    pub(super) fn push(&self, item: T) {
        self.items.borrow_mut().push_back(item);
        self.ready.signal(1);
    }

    /// Moves every queued item into `out` (waiting for at least one); `false` once closed.
    ///
    /// Only one task may wait on a queue drained this way.
    pub(super) async fn pop_all(&self, out: &mut Vec<T>) -> bool {
        if self.ready.acquire(1).await.is_err() {
            return false;
        }
        let mut items = self.items.borrow_mut();
        let extra = items
            .len()
            .checked_sub(1)
            .expect("count says one is queued");
        if extra > 0 {
            let taken = self.ready.try_acquire(extra as u64);
            assert!(
                matches!(taken, Ok(true)),
                "queue count and items out of step"
            );
        }
        out.extend(items.drain(..));
        true
    }
}
