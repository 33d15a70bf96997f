//! Cross-core messaging: how a frontend on one core reaches a vdisk owned by another.
//!
//! Each vdisk is owned by one core. A host connection may land on any core (every core listens
//! on the frontend ports with `SO_REUSEPORT`); when its vdisk lives elsewhere, each request
//! travels as a message over a single-producer single-consumer glommio shared channel to the
//! owner core, which runs it and sends the reply back on the paired channel. No lock is taken on
//! the I/O path and idle channels cost nothing (the receiving executor sleeps).
//!
//! [`Mesh::links`] builds one request and one reply channel for every ordered pair of cores before
//! the executors start; each executor takes its [`CoreLinks`] and connects them.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use glommio::channels::shared_channel::{self, ConnectedSender, SharedReceiver, SharedSender};

use crate::target::{BlockTarget, TargetError};

/// Requests in flight per pair of cores before senders wait (back-pressure).
pub const CHANNEL_DEPTH: usize = 256;

/// An operation for the owner core.
#[derive(Debug)]
pub enum Op {
    /// Read `len` bytes.
    Read {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Write `data`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Data.
        data: Vec<u8>,
        /// Force unit access.
        fua: bool,
    },
    /// Flush.
    Flush,
    /// Trim.
    Trim {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Write zeroes.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Force unit access.
        fua: bool,
    },
}

/// A request with its routing.
#[derive(Debug)]
pub struct Envelope {
    id: u64,
    vdisk: u64,
    op: Op,
}

/// The answer to an [`Envelope`]: the read data, or nothing.
#[derive(Debug)]
pub struct Reply {
    id: u64,
    result: Result<Vec<u8>, TargetError>,
}

/// The unconnected channel ends one core needs.
pub struct CoreLinks {
    core: usize,
    /// To each other core: requests out, replies in.
    outgoing: Vec<(usize, SharedSender<Envelope>, SharedReceiver<Reply>)>,
    /// From each other core: requests in, replies out.
    incoming: Vec<(usize, SharedReceiver<Envelope>, SharedSender<Reply>)>,
}

/// Builds the channels of a node with `cores` executors.
pub struct Mesh;

impl Mesh {
    /// One [`CoreLinks`] per core, to be moved into its executor.
    pub fn links(cores: usize) -> Vec<CoreLinks> {
        let mut links: Vec<CoreLinks> = (0..cores)
            .map(|core| CoreLinks {
                core,
                outgoing: Vec::new(),
                incoming: Vec::new(),
            })
            .collect();
        for from in 0..cores {
            for to in 0..cores {
                if from == to {
                    continue;
                }
                let (req_tx, req_rx) = shared_channel::new_bounded(CHANNEL_DEPTH);
                let (rep_tx, rep_rx) = shared_channel::new_bounded(CHANNEL_DEPTH);
                links[from].outgoing.push((to, req_tx, rep_rx));
                links[to].incoming.push((from, req_rx, rep_tx));
            }
        }
        links
    }
}

struct Slot {
    result: RefCell<Option<Result<Vec<u8>, TargetError>>>,
    done: event_listener::Event,
}

/// A connected link from this core to one owner core.
pub struct PeerLink {
    to: usize,
    sender: ConnectedSender<Envelope>,
    pending: RefCell<HashMap<u64, Rc<Slot>>>,
    next_id: Cell<u64>,
}

impl PeerLink {
    /// Requests sent over this link so far.
    pub fn calls(&self) -> u64 {
        self.next_id.get()
    }

    /// Sends `op` for `vdisk` and waits for the owner core's reply.
    pub async fn call(&self, vdisk: u64, op: Op) -> Result<Vec<u8>, TargetError> {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let slot = Rc::new(Slot {
            result: RefCell::new(None),
            done: event_listener::Event::new(),
        });
        self.pending.borrow_mut().insert(id, slot.clone());
        if self.sender.send(Envelope { id, vdisk, op }).await.is_err() {
            self.pending.borrow_mut().remove(&id);
            return Err(TargetError::Unavailable {
                reason: format!("core {} is not running", self.to),
            });
        }
        loop {
            let listener = slot.done.listen();
            if let Some(r) = slot.result.borrow_mut().take() {
                return r;
            }
            listener.await;
        }
    }
}

/// Runs `op` on a local target (the owner side of a message).
pub async fn run_local<T: BlockTarget>(target: &T, op: Op) -> Result<Vec<u8>, TargetError> {
    match op {
        Op::Read { offset, len } => {
            let mut out = vec![0u8; len as usize];
            target.read(offset, &mut out).await.map(|()| out)
        }
        Op::Write { offset, data, fua } => {
            target.write(offset, &data, fua).await.map(|()| Vec::new())
        }
        Op::Flush => target.flush().await.map(|()| Vec::new()),
        Op::Trim { offset, len } => target.trim(offset, len).await.map(|()| Vec::new()),
        Op::WriteZeroes { offset, len, fua } => target
            .write_zeroes(offset, len, fua)
            .await
            .map(|()| Vec::new()),
    }
}

/// The connected links of one core.
pub struct CoreMesh {
    /// This core.
    pub core: usize,
    peers: HashMap<usize, Rc<PeerLink>>,
}

impl CoreMesh {
    /// The link to `core`.
    pub fn peer(&self, core: usize) -> Option<Rc<PeerLink>> {
        self.peers.get(&core).cloned()
    }

    /// Requests this core forwarded to other cores.
    pub fn forwarded(&self) -> u64 {
        self.peers.values().map(|p| p.calls()).sum()
    }
}

impl CoreLinks {
    /// Connects this core's channel ends (inside its executor) and starts the tasks that serve
    /// requests from other cores with `lookup` (vdisk id -> local target) and that deliver
    /// replies to waiting callers.
    pub async fn connect<T, F>(self, lookup: F) -> CoreMesh
    where
        T: BlockTarget + 'static,
        F: Fn(u64) -> Option<Rc<T>> + 'static,
    {
        let lookup = Rc::new(lookup);
        // A channel connects only when both ends connect: start every connection at once so
        // that no two cores wait on each other in opposite orders.
        let outgoing: Vec<_> = self
            .outgoing
            .into_iter()
            .map(|(to, req_tx, rep_rx)| {
                glommio::spawn_local(
                    async move { (to, req_tx.connect().await, rep_rx.connect().await) },
                )
            })
            .collect();
        let incoming: Vec<_> = self
            .incoming
            .into_iter()
            .map(|(from, req_rx, rep_tx)| {
                glommio::spawn_local(async move {
                    (from, req_rx.connect().await, rep_tx.connect().await)
                })
            })
            .collect();
        let mut peers = HashMap::new();
        for task in outgoing {
            let (to, sender, replies) = task.await;
            let link = Rc::new(PeerLink {
                to,
                sender,
                pending: RefCell::new(HashMap::new()),
                next_id: Cell::new(0),
            });
            let weak = Rc::downgrade(&link);
            glommio::spawn_local(async move {
                while let Some(reply) = replies.recv().await {
                    let Some(link) = weak.upgrade() else { break };
                    if let Some(slot) = link.pending.borrow_mut().remove(&reply.id) {
                        *slot.result.borrow_mut() = Some(reply.result);
                        slot.done.notify(usize::MAX);
                    }
                }
            })
            .detach();
            peers.insert(to, link);
        }
        for task in incoming {
            let (from, requests, replies) = task.await;
            let replies = Rc::new(replies);
            let lookup = lookup.clone();
            glommio::spawn_local(async move {
                while let Some(env) = requests.recv().await {
                    let lookup = lookup.clone();
                    let replies = replies.clone();
                    // Each request runs as its own task so one slow I/O does not hold up others.
                    glommio::spawn_local(async move {
                        let result = match lookup(env.vdisk) {
                            Some(t) => run_local(&*t, env.op).await,
                            None => Err(TargetError::Unavailable {
                                reason: format!(
                                    "vdisk {} is not owned by core {from}'s peer",
                                    env.vdisk
                                ),
                            }),
                        };
                        let _ = replies.send(Reply { id: env.id, result }).await;
                    })
                    .detach();
                }
            })
            .detach();
        }
        CoreMesh {
            core: self.core,
            peers,
        }
    }
}

/// A vdisk owned by another core, reached through the mesh.
pub struct RemoteTarget {
    vdisk: u64,
    size_bytes: u64,
    link: Rc<PeerLink>,
}

impl RemoteTarget {
    /// A proxy for `vdisk` (of `size_bytes`) over `link`.
    pub fn new(vdisk: u64, size_bytes: u64, link: Rc<PeerLink>) -> Self {
        Self {
            vdisk,
            size_bytes,
            link,
        }
    }
}

impl BlockTarget for RemoteTarget {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn min_block_bytes(&self) -> u32 {
        1
    }

    async fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), TargetError> {
        let data = self
            .link
            .call(
                self.vdisk,
                Op::Read {
                    offset,
                    len: out.len() as u32,
                },
            )
            .await?;
        out.copy_from_slice(&data);
        Ok(())
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), TargetError> {
        let op = Op::Write {
            offset,
            data: data.to_vec(),
            fua,
        };
        self.link.call(self.vdisk, op).await.map(|_| ())
    }

    async fn flush(&self) -> Result<(), TargetError> {
        self.link.call(self.vdisk, Op::Flush).await.map(|_| ())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), TargetError> {
        self.link
            .call(self.vdisk, Op::Trim { offset, len })
            .await
            .map(|_| ())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), TargetError> {
        self.link
            .call(self.vdisk, Op::WriteZeroes { offset, len, fua })
            .await
            .map(|_| ())
    }
}

/// A vdisk as a core's frontends see it: owned here, or reached through the mesh.
pub enum CoreTarget<T> {
    /// Owned by this core.
    Local(Rc<T>),
    /// Owned by another core.
    Remote(RemoteTarget),
}

impl<T: BlockTarget> BlockTarget for CoreTarget<T> {
    fn size_bytes(&self) -> u64 {
        match self {
            CoreTarget::Local(t) => t.size_bytes(),
            CoreTarget::Remote(r) => r.size_bytes(),
        }
    }
    fn min_block_bytes(&self) -> u32 {
        match self {
            CoreTarget::Local(t) => t.min_block_bytes(),
            CoreTarget::Remote(r) => r.min_block_bytes(),
        }
    }
    fn preferred_block_bytes(&self) -> u32 {
        match self {
            CoreTarget::Local(t) => t.preferred_block_bytes(),
            CoreTarget::Remote(r) => r.preferred_block_bytes(),
        }
    }
    fn max_request_bytes(&self) -> u32 {
        match self {
            CoreTarget::Local(t) => t.max_request_bytes(),
            CoreTarget::Remote(r) => r.max_request_bytes(),
        }
    }
    async fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), TargetError> {
        match self {
            CoreTarget::Local(t) => t.read(offset, out).await,
            CoreTarget::Remote(r) => r.read(offset, out).await,
        }
    }
    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), TargetError> {
        match self {
            CoreTarget::Local(t) => t.write(offset, data, fua).await,
            CoreTarget::Remote(r) => r.write(offset, data, fua).await,
        }
    }
    async fn flush(&self) -> Result<(), TargetError> {
        match self {
            CoreTarget::Local(t) => t.flush().await,
            CoreTarget::Remote(r) => r.flush().await,
        }
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<(), TargetError> {
        match self {
            CoreTarget::Local(t) => t.trim(offset, len).await,
            CoreTarget::Remote(r) => r.trim(offset, len).await,
        }
    }
    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), TargetError> {
        match self {
            CoreTarget::Local(t) => t.write_zeroes(offset, len, fua).await,
            CoreTarget::Remote(r) => r.write_zeroes(offset, len, fua).await,
        }
    }
}
