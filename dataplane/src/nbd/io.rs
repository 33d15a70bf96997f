//! The single-core plumbing a connection is built from: a socket shared by a reader and a
//! writer, a local work queue, a one-shot signal, and a pool of request buffers. The iSCSI
//! frontend uses the same pieces (`crate::iscsi`).
//!
//! Everything here lives on one executor thread, so sharing is `Rc` + `RefCell`/`Cell`; no
//! `RefCell` borrow is ever held across an `.await`. Waiting is done on glommio's
//! [`Semaphore`], whose waiters are intrusive (no allocation per wait) and cancel-safe.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::rc::Rc;

use futures_lite::io::{AsyncRead, AsyncWrite};
use glommio::sync::Semaphore;

/// A byte stream read by one task and written by another.
///
/// glommio's `TcpStream` keeps separate readiness sources for receiving and sending, so a read
/// parked in one task and a write parked in another do not disturb each other; each poll
/// borrows the stream only for the duration of that poll.
pub(crate) struct SharedStream<S> {
    inner: RefCell<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> SharedStream<S> {
    pub(crate) fn new(stream: S) -> Self {
        SharedStream {
            inner: RefCell::new(stream),
        }
    }

    /// Reads what is available (at least one byte); `Ok(0)` when the peer closed.
    pub(crate) async fn read_some(&self, buf: &mut [u8]) -> io::Result<usize> {
        poll_fn(|cx| Pin::new(&mut *self.inner.borrow_mut()).poll_read(cx, buf)).await
    }

    /// Fills `buf`; `Ok(false)` if the peer closed the stream before sending any of it (a clean
    /// end at a message boundary), `UnexpectedEof` if it closed part-way.
    pub(crate) async fn read_exact_or_eof(&self, buf: &mut [u8]) -> io::Result<bool> {
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
    pub(crate) async fn read_exact(&self, buf: &mut [u8]) -> io::Result<()> {
        if buf.is_empty() || self.read_exact_or_eof(buf).await? {
            Ok(())
        } else {
            Err(io::ErrorKind::UnexpectedEof.into())
        }
    }

    /// Reads and drops `len` bytes through `scratch`.
    pub(crate) async fn discard(&self, mut len: usize, scratch: &mut [u8]) -> io::Result<()> {
        assert!(!scratch.is_empty());
        while len > 0 {
            let chunk = len.min(scratch.len());
            self.read_exact(&mut scratch[..chunk]).await?;
            len -= chunk;
        }
        Ok(())
    }

    /// Writes all of `buf`.
    pub(crate) async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
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
    pub(crate) async fn flush(&self) -> io::Result<()> {
        poll_fn(|cx| Pin::new(&mut *self.inner.borrow_mut()).poll_flush(cx)).await
    }

    /// Closes the sending side (for a glommio socket: `shutdown(SHUT_WR)`); reads go on.
    pub(crate) async fn close(&self) -> io::Result<()> {
        poll_fn(|cx| Pin::new(&mut *self.inner.borrow_mut()).poll_close(cx)).await
    }
}

/// A one-shot broadcast: once fired, every current and future [`Signal::wait`] returns.
///
/// Built on a closed-on-fire zero-unit semaphore, so a `wait` raced against a socket read each
/// request costs a link into an intrusive list, not an allocation.
#[derive(Clone)]
pub(crate) struct Signal {
    inner: Rc<SignalInner>,
}

struct SignalInner {
    fired: Cell<bool>,
    waiters: Semaphore,
}

impl Signal {
    pub(crate) fn new() -> Self {
        Signal {
            inner: Rc::new(SignalInner {
                fired: Cell::new(false),
                waiters: Semaphore::new(0),
            }),
        }
    }

    pub(crate) fn fire(&self) {
        self.inner.fired.set(true);
        self.inner.waiters.close();
    }

    pub(crate) fn is_fired(&self) -> bool {
        self.inner.fired.get()
    }

    /// Returns once [`Signal::fire`] has been called.
    pub(crate) async fn wait(&self) {
        while !self.is_fired() {
            // Nothing ever signals units, so acquire only returns when the semaphore closes.
            let _closed = self.inner.waiters.acquire(1).await;
        }
    }
}

/// A first-in first-out queue between tasks of one core.
///
/// The semaphore counts queued items, so `pop` parks without polling and a closed queue wakes
/// every waiter with `None`.
pub(crate) struct LocalQueue<T> {
    items: RefCell<VecDeque<T>>,
    ready: Semaphore,
}

impl<T> LocalQueue<T> {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        LocalQueue {
            items: RefCell::new(VecDeque::with_capacity(capacity)),
            ready: Semaphore::new(0),
        }
    }

    pub(crate) fn push(&self, item: T) {
        self.items.borrow_mut().push_back(item);
        self.ready.signal(1);
    }

    pub(crate) fn len(&self) -> usize {
        self.items.borrow().len()
    }

    /// The next item, or `None` once the queue is closed.
    pub(crate) async fn pop(&self) -> Option<T> {
        self.ready.acquire(1).await.ok()?;
        let item = self.items.borrow_mut().pop_front();
        assert!(item.is_some(), "queue count and items out of step");
        item
    }

    /// Moves every queued item into `out` (waiting for at least one); `false` once closed.
    ///
    /// Only one task may wait on a queue drained this way.
    pub(crate) async fn pop_all(&self, out: &mut Vec<T>) -> bool {
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

    /// Wakes every waiter with `None`; items still queued are dropped with the queue.
    pub(crate) fn close(&self) {
        self.ready.close();
    }

    /// Moves the items still queued into `out`: after [`LocalQueue::close`], the way a consumer
    /// finishes the work queued before the close (which `pop` and `pop_all` no longer return).
    pub(crate) fn take_remaining(&self, out: &mut Vec<T>) {
        out.extend(self.items.borrow_mut().drain(..));
    }
}

/// A request buffer from a [`BufPool`]: a reused `Vec` viewed at the request's length.
pub(crate) struct IoBuf {
    vec: Vec<u8>,
    len: usize,
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.vec[..self.len]
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.vec[..self.len]
    }
}

/// Per-connection request buffers with a byte budget.
///
/// `get` waits while the bytes handed out would exceed the budget: that, with the request-slot
/// limit, is the connection's back-pressure. Returned buffers are kept for reuse while their
/// total capacity stays under `retain_bytes`, so a steady workload allocates nothing per I/O
/// after warm-up; the pool holds at most `retain_bytes` idle plus `budget_bytes` in flight.
pub(crate) struct BufPool {
    free: RefCell<Vec<Vec<u8>>>,
    retained_bytes: Cell<usize>,
    retain_bytes: usize,
    budget_bytes: u64,
    budget: Semaphore,
}

impl BufPool {
    pub(crate) fn new(budget_bytes: u64, retain_bytes: usize, slots: usize) -> Self {
        BufPool {
            free: RefCell::new(Vec::with_capacity(slots)),
            retained_bytes: Cell::new(0),
            retain_bytes,
            budget_bytes,
            budget: Semaphore::new(budget_bytes),
        }
    }

    /// A buffer of `len` bytes (contents unspecified), once the budget allows it.
    pub(crate) async fn get(&self, len: usize) -> IoBuf {
        let units = len as u64;
        assert!(
            units <= self.budget_bytes,
            "request larger than the pool budget"
        );
        self.budget
            .acquire(units)
            .await
            .expect("the pool budget is never closed");
        let mut vec = self.free.borrow_mut().pop().unwrap_or_default();
        self.retained_bytes
            .set(self.retained_bytes.get() - vec.capacity());
        if vec.len() < len {
            vec.resize(len, 0);
        }
        IoBuf { vec, len }
    }

    /// Returns a buffer and its budget.
    pub(crate) fn put(&self, buf: IoBuf) {
        self.budget.signal(buf.len as u64);
        let capacity = buf.vec.capacity();
        let retained = self.retained_bytes.get();
        let mut free = self.free.borrow_mut();
        if retained + capacity <= self.retain_bytes && free.len() < free.capacity() {
            self.retained_bytes.set(retained + capacity);
            free.push(buf.vec);
        }
    }
}

/// Accept errors that say "not now" rather than "never": the peer gave up before we accepted,
/// or the process ran out of descriptors or memory for a moment.
pub(crate) fn is_transient(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::OutOfMemory
    ) || matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EPROTO)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use glommio::LocalExecutorBuilder;

    fn run<T>(fut: impl std::future::Future<Output = T>) -> T {
        LocalExecutorBuilder::default()
            .io_memory(1 << 20)
            .make()
            .expect("glommio executor")
            .run(fut)
    }

    #[test]
    fn queue_pop_all_takes_everything_and_close_ends() {
        run(async {
            let q = Rc::new(LocalQueue::with_capacity(4));
            for i in 0..5 {
                q.push(i);
            }
            let mut out = Vec::new();
            assert!(q.pop_all(&mut out).await);
            assert_eq!(out, [0, 1, 2, 3, 4]);
            q.push(9);
            assert_eq!(q.pop().await, Some(9));
            let q2 = q.clone();
            let waiter = glommio::spawn_local(async move { q2.pop().await });
            futures_lite::future::yield_now().await;
            q.close();
            assert_eq!(waiter.await, None);
            assert!(!q.pop_all(&mut out).await);
        });
    }

    #[test]
    fn signal_wakes_waiters_once_fired() {
        run(async {
            let s = Signal::new();
            let s2 = s.clone();
            let waiter = glommio::spawn_local(async move { s2.wait().await });
            assert!(!s.is_fired());
            s.fire();
            waiter.await;
            s.wait().await; // already fired: returns at once
        });
    }

    #[test]
    fn pool_reuses_buffers_and_enforces_the_budget() {
        run(async {
            let pool = Rc::new(BufPool::new(8192, 1 << 20, 4));
            let a = pool.get(4096).await;
            let ptr = a.as_ptr();
            pool.put(a);
            let b = pool.get(1024).await;
            assert_eq!(b.len(), 1024);
            assert_eq!(b.as_ptr(), ptr, "a returned buffer is reused");
            let c = pool.get(4096).await;
            // The budget has 3 KiB left: a 4 KiB request waits until `b` comes back.
            let p2 = pool.clone();
            let waiter = glommio::spawn_local(async move { p2.get(4096).await.len() });
            futures_lite::future::yield_now().await;
            pool.put(b);
            assert_eq!(waiter.await, 4096);
            pool.put(c);
        });
    }
}
