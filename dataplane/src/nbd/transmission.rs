//! The transmission phase of one connection: a reader, a pool of workers and a writer.
//!
//! ```text
//!            socket ──► reader ──jobs──► workers (≤ MAX_IN_FLIGHT) ──replies──► writer ──► socket
//!                         │  (parse, check, read WRITE payload)      ▲
//!                         └──────────── error replies ───────────────┘
//! ```
//!
//! * The **reader** (the connection task itself) parses each 28-byte header, checks it against
//!   the export ([`Request::check`]), reads a WRITE payload into a pooled buffer and queues a
//!   job. Requests that fail the check are answered without reaching a worker; a rejected
//!   WRITE's payload is still read and dropped so the stream stays in step, unless it is longer
//!   than [`ExportGeometry::discard_limit_bytes`], which closes the connection. A bad request
//!   magic closes it too: there is no way to find the next header.
//! * **Workers** run jobs against the [`BlockTarget`] concurrently, so replies may leave out of
//!   order (NBD allows it). They are spawned on demand, up to [`MAX_IN_FLIGHT`], and live as
//!   long as the connection, so a steady workload spawns nothing per I/O.
//! * The **writer** drains every reply queued since it last ran and sends them with as few
//!   socket writes as possible (small READ data is copied into one output buffer; large data is
//!   written in place).
//!
//! Back-pressure: a request takes a slot (of [`MAX_IN_FLIGHT`]) before its buffer is allocated
//! and gives it back only when its reply has been written, and READ/WRITE buffers come from a
//! pool with a byte budget of max([`IN_FLIGHT_BYTES`], maximum payload). When either runs out
//! the reader stops reading the socket, and TCP pushes back on the client.
//!
//! `NBD_CMD_DISC`, a clean end of stream, or server shutdown stop the reader; the connection
//! then waits until every accepted request has been answered before it returns.
//!
//! Semantics worth knowing:
//! * FUA on TRIM is a trim followed by a flush (the target's trim takes no FUA flag); FUA on
//!   READ and FLUSH is accepted and has nothing to add.
//! * WRITE_ZEROES without `NBD_CMD_FLAG_NO_HOLE` is the target's thin `write_zeroes`. With
//!   `NO_HOLE` the range must stay allocated, so the zeroes are written as data (from a static
//!   zero page run, no allocation).
//! * TRIM and WRITE_ZEROES longer than the maximum payload are split into maximum-payload
//!   chunks, since the target's limit is per request.

use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;

use futures_lite::future;
use futures_lite::io::{AsyncRead, AsyncWrite};
use glommio::Task;
use glommio::sync::Semaphore;

use super::io::{BufPool, IoBuf, LocalQueue, SharedStream, Signal};
use super::proto::{self, Command, Errno, ExportGeometry, Op, Request};
use super::server::{Shutdown, TransmissionError};
use crate::target::{BlockTarget, TargetError};

/// Requests accepted but not yet answered, per connection.
pub const MAX_IN_FLIGHT: usize = 128;
/// READ/WRITE buffer bytes in flight per connection (raised to the maximum payload if that is
/// larger, so one maximal request always fits).
pub const IN_FLIGHT_BYTES: u64 = 64 << 20;
/// Idle buffer capacity a connection keeps for reuse.
pub const RETAINED_BUFFER_BYTES: usize = 16 << 20;
/// Output buffer the writer coalesces reply headers and small READ data into.
const OUT_BUFFER_BYTES: usize = 256 << 10;
/// READ data up to this size is copied into the output buffer rather than written alone.
const COALESCE_DATA_BYTES: usize = 64 << 10;
/// Scratch buffer for reading and dropping the payload of a rejected WRITE.
const DISCARD_SCRATCH_BYTES: usize = 64 << 10;
/// Zeroes written for WRITE_ZEROES with `NO_HOLE`, one chunk at a time.
static ZEROES: [u8; ZEROES_BYTES] = [0; ZEROES_BYTES];
const ZEROES_BYTES: usize = 1 << 20;

const _: () = assert!(COALESCE_DATA_BYTES + proto::SIMPLE_REPLY_LEN <= OUT_BUFFER_BYTES);
const _: () = assert!(ZEROES_BYTES.is_power_of_two());
const _: () = assert!(ZEROES_BYTES >= proto::MAX_MIN_BLOCK as usize);
const _: () = assert!(MAX_IN_FLIGHT > 0);

struct Job {
    handle: u64,
    op: JobOp,
}

enum JobOp {
    Read {
        offset: u64,
        buf: IoBuf,
    },
    Write {
        offset: u64,
        buf: IoBuf,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        no_hole: bool,
    },
}

struct Reply {
    handle: u64,
    error: u32,
    data: Option<IoBuf>,
}

impl Reply {
    fn ok(handle: u64) -> Reply {
        Reply {
            handle,
            error: 0,
            data: None,
        }
    }

    fn error(handle: u64, errno: Errno) -> Reply {
        Reply {
            handle,
            error: errno.code(),
            data: None,
        }
    }
}

/// State shared by the reader, the workers and the writer of one connection.
struct Conn<T, S> {
    target: Rc<T>,
    geometry: ExportGeometry,
    stream: Rc<SharedStream<S>>,
    jobs: LocalQueue<Job>,
    replies: LocalQueue<Reply>,
    pool: BufPool,
    /// Free request slots; a slot is held from header to written reply.
    slots: Semaphore,
    idle_workers: Cell<usize>,
    /// Fired by the writer when the socket fails, to stop the reader.
    broken: Signal,
    write_error: RefCell<Option<io::Error>>,
}

/// Maps a target failure to the error number the spec asks for.
pub(super) fn errno_for(error: &TargetError, is_write: bool) -> Errno {
    match error {
        TargetError::OutOfRange { .. } if is_write => Errno::NoSpc,
        TargetError::OutOfRange { .. } => Errno::Inval,
        TargetError::NoSpace { .. } => Errno::NoSpc,
        TargetError::Io { .. } => Errno::Io,
        TargetError::Unavailable { .. } => Errno::Shutdown,
    }
}

/// Serves requests on `stream` for `target` until the client disconnects or `shutdown` fires.
pub(super) async fn run<T, S>(
    stream: Rc<SharedStream<S>>,
    target: Rc<T>,
    geometry: ExportGeometry,
    shutdown: &Shutdown,
) -> Result<(), TransmissionError>
where
    T: BlockTarget + 'static,
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let budget = IN_FLIGHT_BYTES.max(u64::from(geometry.max_payload_bytes));
    let conn = Rc::new(Conn {
        target,
        geometry,
        stream,
        jobs: LocalQueue::with_capacity(MAX_IN_FLIGHT),
        replies: LocalQueue::with_capacity(MAX_IN_FLIGHT),
        pool: BufPool::new(budget, RETAINED_BUFFER_BYTES, MAX_IN_FLIGHT),
        slots: Semaphore::new(MAX_IN_FLIGHT as u64),
        idle_workers: Cell::new(0),
        broken: Signal::new(),
        write_error: RefCell::new(None),
    });
    let writer = glommio::spawn_local(write_replies(conn.clone()));
    let mut workers = Vec::new();

    let result = read_requests(&conn, &mut workers, shutdown).await;

    // Every accepted request is answered (or its reply dropped, if the socket failed) before
    // the connection closes.
    conn.slots
        .acquire(MAX_IN_FLIGHT as u64)
        .await
        .expect("slots are never closed");
    conn.jobs.close();
    for worker in workers {
        worker.await;
    }
    conn.replies.close();
    writer.await;
    let flushed = conn.stream.flush().await;

    result?;
    if let Some(error) = conn.write_error.borrow_mut().take() {
        return Err(TransmissionError::Io(error));
    }
    flushed.map_err(TransmissionError::Io)
}

/// The reader: headers in, jobs and early error replies out.
async fn read_requests<T, S>(
    conn: &Rc<Conn<T, S>>,
    workers: &mut Vec<Task<()>>,
    shutdown: &Shutdown,
) -> Result<(), TransmissionError>
where
    T: BlockTarget + 'static,
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let mut header = [0u8; proto::REQUEST_LEN];
    let mut scratch = Vec::new();
    loop {
        let read = async { Some(conn.stream.read_exact_or_eof(&mut header).await) };
        let stop = async {
            future::or(shutdown.wait(), conn.broken.wait()).await;
            None
        };
        match future::or(read, stop).await {
            None => return Ok(()),
            Some(Ok(true)) => {}
            Some(Ok(false)) => return Ok(()), // hard disconnect by the client between requests
            Some(Err(error)) => return Err(TransmissionError::Io(error)),
        }
        let request = proto::parse_request(&header)?;
        if request.command == Command::Disc {
            return Ok(());
        }
        conn.slots.acquire(1).await.expect("slots are never closed");
        // Waiting for buffer budget or for a WRITE payload from a stalled client must not hold
        // up shutdown. Abandoning `accept` is safe: it queues nothing before its last step, and
        // a buffer it drops only leaks budget of a pool about to be dropped.
        let accepted = async { Some(accept(conn, &request, &mut scratch).await) };
        let stop = async {
            future::or(shutdown.wait(), conn.broken.wait()).await;
            None
        };
        match future::or(accepted, stop).await {
            Some(Ok(())) => {}
            Some(Err(error)) => {
                conn.slots.signal(1);
                return Err(error);
            }
            None => {
                conn.slots.signal(1);
                return Ok(());
            }
        }
        if conn.jobs.len() > conn.idle_workers.get() && workers.len() < MAX_IN_FLIGHT {
            workers.push(glommio::spawn_local(work(conn.clone())));
        }
    }
}

/// Turns one checked-in request (holding a slot) into a job or a reply.
async fn accept<T, S>(
    conn: &Conn<T, S>,
    request: &Request,
    scratch: &mut Vec<u8>,
) -> Result<(), TransmissionError>
where
    T: BlockTarget,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let handle = request.handle;
    let op = match request.check(&conn.geometry) {
        Ok(op) => op,
        Err(errno) => {
            let payload = request.payload_len();
            if payload > conn.geometry.discard_limit_bytes() {
                return Err(TransmissionError::PayloadTooLarge {
                    handle,
                    offset: request.offset,
                    len: payload,
                    limit: conn.geometry.discard_limit_bytes(),
                });
            }
            if payload > 0 {
                scratch.resize(DISCARD_SCRATCH_BYTES, 0);
                conn.stream
                    .discard(payload as usize, scratch)
                    .await
                    .map_err(TransmissionError::Io)?;
            }
            conn.replies.push(Reply::error(handle, errno));
            return Ok(());
        }
    };
    let job = match op {
        Op::Read { len: 0, .. }
        | Op::Trim { len: 0, .. }
        | Op::WriteZeroes { len: 0, .. }
        | Op::Write { len: 0, .. } => {
            conn.replies.push(Reply::ok(handle));
            return Ok(());
        }
        Op::Read { offset, len } => JobOp::Read {
            offset,
            buf: conn.pool.get(len as usize).await,
        },
        Op::Write { offset, len, fua } => {
            let mut buf = conn.pool.get(len as usize).await;
            if let Err(error) = conn.stream.read_exact(&mut buf).await {
                conn.pool.put(buf);
                return Err(TransmissionError::Io(error));
            }
            JobOp::Write { offset, buf, fua }
        }
        Op::Flush => JobOp::Flush,
        Op::Trim { offset, len, fua } => JobOp::Trim { offset, len, fua },
        Op::WriteZeroes {
            offset,
            len,
            fua,
            no_hole,
        } => JobOp::WriteZeroes {
            offset,
            len,
            fua,
            no_hole,
        },
        Op::Disc => unreachable!("DISC is handled before a slot is taken"),
    };
    conn.jobs.push(Job { handle, op: job });
    Ok(())
}

/// A worker: runs jobs until the queue closes.
async fn work<T, S>(conn: Rc<Conn<T, S>>)
where
    T: BlockTarget,
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        conn.idle_workers.set(conn.idle_workers.get() + 1);
        let job = conn.jobs.pop().await;
        conn.idle_workers.set(conn.idle_workers.get() - 1);
        let Some(job) = job else {
            return;
        };
        let reply = execute(&conn, job).await;
        conn.replies.push(reply);
    }
}

async fn execute<T, S>(conn: &Conn<T, S>, job: Job) -> Reply
where
    T: BlockTarget,
{
    let target = &*conn.target;
    let handle = job.handle;
    let result = match job.op {
        JobOp::Read { offset, mut buf } => match target.read(offset, &mut buf).await {
            Ok(()) => {
                return Reply {
                    handle,
                    error: 0,
                    data: Some(buf),
                };
            }
            Err(error) => {
                conn.pool.put(buf);
                Err(errno_for(&error, false))
            }
        },
        JobOp::Write { offset, buf, fua } => {
            let result = target.write(offset, &buf, fua).await;
            conn.pool.put(buf);
            result.map_err(|e| errno_for(&e, true))
        }
        JobOp::Flush => target.flush().await.map_err(|e| errno_for(&e, true)),
        JobOp::Trim { offset, len, fua } => trim(conn, offset, len, fua).await,
        JobOp::WriteZeroes {
            offset,
            len,
            fua,
            no_hole,
        } => write_zeroes(conn, offset, len, fua, no_hole).await,
    };
    match result {
        Ok(()) => Reply::ok(handle),
        Err(errno) => Reply::error(handle, errno),
    }
}

/// Chunks of at most `chunk` bytes covering `offset..offset + len`.
fn chunks(offset: u64, len: u32, chunk: u32) -> impl Iterator<Item = (u64, u32)> {
    assert!(chunk > 0);
    let end = offset + u64::from(len);
    let mut at = offset;
    std::iter::from_fn(move || {
        (at < end).then(|| {
            let this = (end - at).min(u64::from(chunk));
            let piece = (at, this as u32);
            at += this;
            piece
        })
    })
}

async fn trim<T: BlockTarget, S>(
    conn: &Conn<T, S>,
    offset: u64,
    len: u32,
    fua: bool,
) -> Result<(), Errno> {
    let target = &*conn.target;
    for (at, piece) in chunks(offset, len, conn.geometry.effect_chunk_bytes()) {
        target
            .trim(at, u64::from(piece))
            .await
            .map_err(|e| errno_for(&e, true))?;
    }
    if fua {
        target.flush().await.map_err(|e| errno_for(&e, true))?;
    }
    Ok(())
}

async fn write_zeroes<T: BlockTarget, S>(
    conn: &Conn<T, S>,
    offset: u64,
    len: u32,
    fua: bool,
    no_hole: bool,
) -> Result<(), Errno> {
    let target = &*conn.target;
    let max = conn.geometry.effect_chunk_bytes();
    if no_hole {
        // Both are multiples of the minimum block, so every chunk stays aligned.
        let chunk = max.min(ZEROES_BYTES as u32);
        for (at, piece) in chunks(offset, len, chunk) {
            target
                .write(at, &ZEROES[..piece as usize], fua)
                .await
                .map_err(|e| errno_for(&e, true))?;
        }
    } else {
        for (at, piece) in chunks(offset, len, max) {
            target
                .write_zeroes(at, u64::from(piece), fua)
                .await
                .map_err(|e| errno_for(&e, true))?;
        }
    }
    Ok(())
}

/// The writer: drains queued replies each time it runs and sends them in as few writes as it
/// can. After a socket error it keeps draining (dropping replies) so that slots and buffers
/// come back and the connection can wind down.
async fn write_replies<T, S>(conn: Rc<Conn<T, S>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut batch = Vec::with_capacity(MAX_IN_FLIGHT);
    let mut out = Vec::with_capacity(OUT_BUFFER_BYTES);
    while conn.replies.pop_all(&mut batch).await {
        let count = batch.len() as u64;
        if conn.broken.is_fired() {
            release(&conn, batch.drain(..));
        } else if let Err(error) = send_batch(&conn, &mut batch, &mut out).await {
            *conn.write_error.borrow_mut() = Some(error);
            conn.broken.fire();
        }
        debug_assert!(batch.is_empty());
        conn.slots.signal(count);
    }
}

/// Returns the buffers of replies that will not be sent.
fn release<T, S>(conn: &Conn<T, S>, replies: impl Iterator<Item = Reply>) {
    for reply in replies {
        if let Some(buf) = reply.data {
            conn.pool.put(buf);
        }
    }
}

/// Writes and empties `batch`, returning each buffer to the pool once its data is on the
/// socket (or copied into `out`), or at once if the socket fails.
async fn send_batch<T, S>(
    conn: &Conn<T, S>,
    batch: &mut Vec<Reply>,
    out: &mut Vec<u8>,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    out.clear();
    let mut replies = batch.drain(..);
    while let Some(reply) = replies.next() {
        if out.len() + proto::SIMPLE_REPLY_LEN > OUT_BUFFER_BYTES {
            if let Err(error) = conn.stream.write_all(out).await {
                release(conn, replies.chain(Some(reply)));
                return Err(error);
            }
            out.clear();
        }
        out.extend_from_slice(&proto::encode_simple_reply(reply.error, reply.handle));
        let Some(data) = reply.data else {
            continue;
        };
        if data.len() <= COALESCE_DATA_BYTES && out.len() + data.len() <= OUT_BUFFER_BYTES {
            out.extend_from_slice(&data);
            conn.pool.put(data);
            continue;
        }
        let sent = async {
            conn.stream.write_all(out).await?;
            conn.stream.write_all(&data).await
        }
        .await;
        out.clear();
        conn.pool.put(data);
        if let Err(error) = sent {
            release(conn, replies);
            return Err(error);
        }
    }
    if !out.is_empty() {
        conn.stream.write_all(out).await?;
        out.clear();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_range() {
        let pieces: Vec<_> = chunks(4096, 10_240, 4096).collect();
        assert_eq!(pieces, [(4096, 4096), (8192, 4096), (12288, 2048)]);
        assert_eq!(chunks(0, 0, 512).count(), 0);
        let pieces: Vec<_> = chunks(u64::MAX - 1024, 1024, 1 << 20).collect();
        assert_eq!(pieces, [(u64::MAX - 1024, 1024)]);
    }

    #[test]
    fn target_errors_map_to_spec_errnos() {
        let range = TargetError::OutOfRange {
            offset: 0,
            len: 1,
            size: 0,
        };
        assert_eq!(errno_for(&range, true), Errno::NoSpc);
        assert_eq!(errno_for(&range, false), Errno::Inval);
        let nospace = TargetError::NoSpace { offset: 0, len: 1 };
        assert_eq!(errno_for(&nospace, true), Errno::NoSpc);
        let io = TargetError::Io {
            offset: 0,
            reason: "bad".into(),
        };
        assert_eq!(errno_for(&io, false), Errno::Io);
        let gone = TargetError::Unavailable {
            reason: "moved".into(),
        };
        assert_eq!(errno_for(&gone, false), Errno::Shutdown);
    }
}
