//! Keeping a vdisk's data on its replica nodes: the owner copies every change of the vdisk's
//! device state (oplog batches, extent-group allocations, slice writes and trims, flushes) to
//! RF-1 peers over a [`Transport`], and a write is acknowledged only when every copy has it.
//!
//! A replica keeps the copy in the same shape as the owner: the same extent-group ids and
//! slices, and an oplog of the same batches ([`Oplog::append_replica`]). The block map in the
//! metadata store is therefore valid on every replica's device, and a replica that takes the
//! vdisk over after its owner died opens it like its own: [`crate::vdisk::Vdisk::open`]
//! replays the undrained batches and loads the extent store.
//!
//! Who owns a vdisk, with which epoch, and where its replicas are is one record in the metadata
//! store ([`Ownership`], changed only by compare-and-swap). A replica checks every request
//! against it: a request from a node that is not the recorded owner, or with an older epoch, is
//! refused ([`reply::STALE`]), so an owner that lost the vdisk can never again get a write
//! acknowledged by a replica.
//!
//! ```text
//! request (Message.op)   payload (little-endian)              Message.sequence
//!   PING                 -                                    -
//!   RESET                egid u64 of each extent group to keep -
//!   OPLOG_BATCH          the batch: header slice, data slices batch sequence
//!   OPLOG_DRAINED        -                                    drained up to
//!   ALLOCATE             egid u64                             -
//!   TRIM                 egid u64, first u32, blocks u32      -
//!   WRITE                egid u64, first u32, data            -
//!   FLUSH                -                                    -
//!   FREE                 egid u64                             -
//!   READ                 egid u64, first u32, blocks u32      -
//!   OPLOG_READ           offset u32, blocks u32               batch sequence
//!   VERIFY               egid u64, first u32, crc32c u32 each -
//! reply: OK (payload: the data of a READ; of a PING, the host's [`HostLoad`]; of a RESET, the
//! kept extent groups it holds, u64 each; of a VERIFY, the slices, u32 each, whose copy here
//! does not match the owner's checksum or fails its own),
//! STALE, FAILED or BAD_REQUEST (payload: why)
//! ```
//!
//! Owners choose replica nodes with [`rank_replicas`]: current replicas keep their place, then
//! the nearest by round trip, the least loaded (fewest copies held) and the emptiest, with a
//! hash of (vdisk, node) to spread the rest; a node without room for the copy is passed over.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use blockstore::{BlockDevice, BlockStore, DmaBuf, ExtentGroupId, StoreError};

use crate::metadata::MetadataStore;
use crate::transport::{Handler, Message, NodeId, Transport, TransportError};
use crate::vdisk::extents::vdisk_prefix;
use crate::vdisk::oplog::{BLOCK_BYTES, OPLOG_EGID_BIT, Oplog, vdisk_of_egroup};

/// Request codes.
pub mod op {
    /// Is the node up (answers OK without looking at the vdisk).
    pub const PING: u16 = 0x0100;
    /// Start a stream: drop this replica's copy of the vdisk but the listed extent groups (the
    /// owner's: the copy that follows compares those and sends what differs).
    pub const RESET: u16 = 0x0101;
    /// Store an oplog batch.
    pub const OPLOG_BATCH: u16 = 0x0102;
    /// Oplog batches up to `sequence` are drained: free them.
    pub const OPLOG_DRAINED: u16 = 0x0103;
    /// Allocate an extent group.
    pub const ALLOCATE: u16 = 0x0104;
    /// Clear slices of an extent group.
    pub const TRIM: u16 = 0x0105;
    /// Write slices of an extent group.
    pub const WRITE: u16 = 0x0106;
    /// Make everything written durable.
    pub const FLUSH: u16 = 0x0107;
    /// Free an extent group.
    pub const FREE: u16 = 0x0108;
    /// Read slices of an extent group (the owner repairs a slice that failed its checksum).
    pub const READ: u16 = 0x0109;
    /// Read data slices of an oplog batch, by sequence and offset (the same repair).
    pub const OPLOG_READ: u16 = 0x010A;
    /// Compare slices of an extent group with the owner's checksums (the scrub).
    pub const VERIFY: u16 = 0x010B;
}

/// Reply codes.
pub mod reply {
    /// Done (durable if the request was a batch or a flush).
    pub const OK: u16 = 0x8000;
    /// The sender is not the vdisk's owner at that epoch (fenced).
    pub const STALE: u16 = 0x8001;
    /// The replica could not do it (device error, no space).
    pub const FAILED: u16 = 0x8002;
    /// The request does not decode.
    pub const BAD_REQUEST: u16 = 0x8003;
}

/// One change of a vdisk's device state, as it goes to the replicas.
#[derive(Debug, Clone)]
pub enum ReplicaOp {
    /// Drop the replica's copy (its oplog, and every extent group not in `keep`) and start a
    /// stream. The answer lists the extent groups of `keep` the replica holds.
    Reset {
        /// The owner's extent groups.
        keep: Vec<ExtentGroupId>,
    },
    /// An oplog batch (header and data slices).
    OplogBatch {
        /// Its sequence number.
        seq: u64,
        /// Its bytes.
        bytes: Rc<[u8]>,
    },
    /// Batches up to `seq` drained.
    OplogDrained {
        /// Drained watermark.
        seq: u64,
    },
    /// An extent group allocated.
    Allocate {
        /// It.
        egid: ExtentGroupId,
    },
    /// Slices cleared.
    Trim {
        /// Extent group.
        egid: ExtentGroupId,
        /// First slice.
        first: u32,
        /// Slices.
        blocks: u32,
    },
    /// Slices written.
    Write {
        /// Extent group.
        egid: ExtentGroupId,
        /// First slice.
        first: u32,
        /// Whole slices.
        data: Rc<[u8]>,
    },
    /// Everything before it made durable.
    Flush,
    /// An extent group freed.
    Free {
        /// It.
        egid: ExtentGroupId,
    },
    /// Data slices of an oplog batch read back (not a change: one replica answers).
    OplogRead {
        /// The batch.
        seq: u64,
        /// First data slice of the batch.
        offset: u32,
        /// Slices.
        blocks: u32,
    },
    /// Slices read back (not a change: one replica answers).
    Read {
        /// Extent group.
        egid: ExtentGroupId,
        /// First slice.
        first: u32,
        /// Slices.
        blocks: u32,
    },
    /// Slices `first..` compared with the owner's copy, given as one crc32c per slice (not a
    /// change: every replica answers with the slices whose copy differs or fails its own
    /// checksum, and the owner rewrites those).
    Verify {
        /// Extent group.
        egid: ExtentGroupId,
        /// First slice.
        first: u32,
        /// The owner's crc32c of each slice, at most [`MAX_READ_SLICES`].
        crcs: Vec<u32>,
    },
}

/// Most slices one READ asks for (1 MiB).
pub const MAX_READ_SLICES: u32 = 256;

impl ReplicaOp {
    /// The request for `vdisk` at `epoch`.
    pub fn to_message(&self, vdisk: u64, epoch: u64) -> Message {
        let mut m = Message {
            vdisk,
            epoch,
            ..Message::default()
        };
        let egid_first = |egid: u64, first: u32| {
            let mut p = egid.to_le_bytes().to_vec();
            p.extend_from_slice(&first.to_le_bytes());
            p
        };
        match self {
            Self::Reset { keep } => {
                m.op = op::RESET;
                m.payload = keep.iter().flat_map(|e| e.to_le_bytes()).collect();
            }
            Self::OplogBatch { seq, bytes } => {
                m.op = op::OPLOG_BATCH;
                m.sequence = *seq;
                m.payload = bytes.to_vec();
            }
            Self::OplogDrained { seq } => {
                m.op = op::OPLOG_DRAINED;
                m.sequence = *seq;
            }
            Self::Allocate { egid } => {
                m.op = op::ALLOCATE;
                m.payload = egid.to_le_bytes().to_vec();
            }
            Self::Trim {
                egid,
                first,
                blocks,
            } => {
                m.op = op::TRIM;
                m.payload = egid_first(*egid, *first);
                m.payload.extend_from_slice(&blocks.to_le_bytes());
            }
            Self::Write { egid, first, data } => {
                m.op = op::WRITE;
                m.payload = egid_first(*egid, *first);
                m.payload.extend_from_slice(data);
            }
            Self::Flush => m.op = op::FLUSH,
            Self::Free { egid } => {
                m.op = op::FREE;
                m.payload = egid.to_le_bytes().to_vec();
            }
            Self::OplogRead {
                seq,
                offset,
                blocks,
            } => {
                m.op = op::OPLOG_READ;
                m.sequence = *seq;
                m.payload = offset.to_le_bytes().to_vec();
                m.payload.extend_from_slice(&blocks.to_le_bytes());
            }
            Self::Read {
                egid,
                first,
                blocks,
            } => {
                m.op = op::READ;
                m.payload = egid_first(*egid, *first);
                m.payload.extend_from_slice(&blocks.to_le_bytes());
            }
            Self::Verify { egid, first, crcs } => {
                m.op = op::VERIFY;
                m.payload = egid_first(*egid, *first);
                for crc in crcs {
                    m.payload.extend_from_slice(&crc.to_le_bytes());
                }
            }
        }
        m
    }

    /// Decodes a request (not PING); `Err` says what is wrong with it.
    pub fn from_message(m: &Message) -> Result<Self, &'static str> {
        let p = &m.payload;
        let u64_at = |o: usize| -> Result<u64, &'static str> {
            p.get(o..o + 8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
                .ok_or("payload too short")
        };
        let u32_at = |o: usize| -> Result<u32, &'static str> {
            p.get(o..o + 4)
                .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
                .ok_or("payload too short")
        };
        let exact = |len: usize| {
            if p.len() == len {
                Ok(())
            } else {
                Err("payload length is wrong for the request")
            }
        };
        let egid = |e: u64| {
            if vdisk_of_egroup(e) == m.vdisk && e & OPLOG_EGID_BIT == 0 {
                Ok(e)
            } else {
                Err("extent group is not one of the vdisk's")
            }
        };
        Ok(match m.op {
            op::RESET => {
                if !p.len().is_multiple_of(8) {
                    return Err("payload length is wrong for the request");
                }
                Self::Reset {
                    keep: p
                        .chunks_exact(8)
                        .map(|b| egid(u64::from_le_bytes(b.try_into().unwrap_or_default())))
                        .collect::<Result<_, _>>()?,
                }
            }
            op::OPLOG_BATCH => Self::OplogBatch {
                seq: m.sequence,
                bytes: Rc::from(&p[..]),
            },
            op::OPLOG_DRAINED => {
                exact(0)?;
                Self::OplogDrained { seq: m.sequence }
            }
            op::ALLOCATE => {
                exact(8)?;
                Self::Allocate {
                    egid: egid(u64_at(0)?)?,
                }
            }
            op::TRIM => {
                exact(16)?;
                Self::Trim {
                    egid: egid(u64_at(0)?)?,
                    first: u32_at(8)?,
                    blocks: u32_at(12)?,
                }
            }
            op::WRITE => {
                let data = p.get(12..).ok_or("payload too short")?;
                if data.is_empty() || !data.len().is_multiple_of(BLOCK_BYTES) {
                    return Err("write data is not whole 4 KiB slices");
                }
                Self::Write {
                    egid: egid(u64_at(0)?)?,
                    first: u32_at(8)?,
                    data: Rc::from(data),
                }
            }
            op::FLUSH => {
                exact(0)?;
                Self::Flush
            }
            op::FREE => {
                exact(8)?;
                Self::Free {
                    egid: egid(u64_at(0)?)?,
                }
            }
            op::OPLOG_READ => {
                exact(8)?;
                let blocks = u32_at(4)?;
                if blocks == 0 || blocks > MAX_READ_SLICES {
                    return Err("read of 0 or more than 256 slices");
                }
                Self::OplogRead {
                    seq: m.sequence,
                    offset: u32_at(0)?,
                    blocks,
                }
            }
            op::READ => {
                exact(16)?;
                let blocks = u32_at(12)?;
                if blocks == 0 || blocks > MAX_READ_SLICES {
                    return Err("read of 0 or more than 256 slices");
                }
                Self::Read {
                    egid: egid(u64_at(0)?)?,
                    first: u32_at(8)?,
                    blocks,
                }
            }
            op::VERIFY => {
                let crcs = p.get(12..).ok_or("payload too short")?;
                if crcs.is_empty()
                    || !crcs.len().is_multiple_of(4)
                    || crcs.len() / 4 > MAX_READ_SLICES as usize
                {
                    return Err("verify of 0 or more than 256 slices, or a partial checksum");
                }
                Self::Verify {
                    egid: egid(u64_at(0)?)?,
                    first: u32_at(8)?,
                    crcs: crcs
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes(c.try_into().unwrap_or_default()))
                        .collect(),
                }
            }
            _ => return Err("unknown request code"),
        })
    }
}

const OWNERSHIP_V1: u8 = 1;
const OWNERSHIP_V2: u8 = 2;
/// Most replicas an ownership record names (RF 3 has two besides the owner; room to spare).
pub const MAX_REPLICAS: usize = 4;

/// Which node and device serve a vdisk, at which epoch, and which nodes hold its replicas: key
/// `v/<id>/owner` in the vdisk's metadata shard, changed only by compare-and-swap, so two
/// nodes never both serve it and a takeover (a higher epoch) fences the previous owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    /// The owner node.
    pub node_id: u64,
    /// Format uuid of the owner's device holding the vdisk's oplog and extents.
    pub device_uuid: u128,
    /// Ownership epoch (1 at the first claim; every change of owner or replicas raises it).
    pub epoch: u64,
    /// The replica nodes, each holding a full copy (empty at RF 1).
    pub replicas: Vec<u64>,
}

impl Ownership {
    /// The key of vdisk `vdisk`'s ownership record.
    pub fn key(vdisk: u64) -> Vec<u8> {
        let mut k = vdisk_prefix(vdisk);
        k.extend_from_slice(b"owner");
        k
    }

    /// Encodes the record: version 2, little-endian fields, crc32c over the rest.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(42 + 8 * self.replicas.len() + 4);
        v.push(OWNERSHIP_V2);
        v.extend_from_slice(&self.node_id.to_le_bytes());
        v.extend_from_slice(&self.device_uuid.to_le_bytes());
        v.extend_from_slice(&self.epoch.to_le_bytes());
        v.push(self.replicas.len() as u8);
        for r in &self.replicas {
            v.extend_from_slice(&r.to_le_bytes());
        }
        let crc = crc32c::crc32c(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }

    /// Decodes a record (version 1, without replicas, or 2), refusing an unknown version, a
    /// wrong length or a bad checksum.
    pub fn decode(b: &[u8]) -> Result<Self, String> {
        let Some(&version) = b.first() else {
            return Err("empty ownership record".into());
        };
        let count = match version {
            OWNERSHIP_V1 => 0,
            OWNERSHIP_V2 => usize::from(
                *b.get(33)
                    .ok_or_else(|| format!("ownership record of {} bytes is too short", b.len()))?,
            ),
            v => return Err(format!("ownership record version {v} is unknown")),
        };
        if count > MAX_REPLICAS {
            return Err(format!("ownership record names {count} replicas"));
        }
        let body = if version == OWNERSHIP_V1 {
            33
        } else {
            34 + 8 * count
        };
        if b.len() != body + 4 {
            return Err(format!(
                "ownership record of {} bytes, expected {}",
                b.len(),
                body + 4
            ));
        }
        let stored = u32::from_le_bytes(b[body..].try_into().map_err(|_| "short crc")?);
        if crc32c::crc32c(&b[..body]) != stored {
            return Err("ownership record fails its checksum".into());
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        Ok(Self {
            node_id: u64_at(1),
            device_uuid: u128::from_le_bytes(b[9..25].try_into().unwrap_or_default()),
            epoch: u64_at(25),
            replicas: (0..count).map(|i| u64_at(34 + 8 * i)).collect(),
        })
    }
}

/// How the owner sends a change to its replicas, or reads from one (the replication layer; see
/// [`ReplicaSet`]). Resolves to the data of a READ, the answers of every replica to a VERIFY
/// one after the other, empty for a change.
pub type Mirror = Rc<dyn Fn(ReplicaOp) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>>>>>;

/// How long a replica that cannot be reached is retried before the change fails (a restart of
/// the replica's process fits in it).
pub const PEER_RETRY_FOR: Duration = Duration::from_secs(10);
/// Pause between retries to an unreachable replica.
const PEER_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// The owner's side: sends each change to every replica of the vdisk and succeeds when all of
/// them have it.
pub struct ReplicaSet<T: Transport> {
    transport: Rc<T>,
    vdisk: u64,
    epoch: u64,
    peers: Vec<NodeId>,
    /// Set when a replica refused the epoch: this node no longer owns the vdisk.
    fenced: std::cell::Cell<bool>,
    /// How long an unreachable replica is retried.
    retry_for: Duration,
}

/// Why a change could not reach every replica.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// A replica says this node no longer owns the vdisk at this epoch.
    #[error("vdisk {vdisk}: node {peer} refused epoch {epoch}: {why}")]
    Fenced {
        /// Vdisk.
        vdisk: u64,
        /// The replica.
        peer: NodeId,
        /// Our epoch.
        epoch: u64,
        /// What it said.
        why: String,
    },
    /// A replica failed the change, or stayed unreachable.
    #[error("vdisk {vdisk}: replica on node {peer}: {why}")]
    Peer {
        /// Vdisk.
        vdisk: u64,
        /// The replica.
        peer: NodeId,
        /// What went wrong.
        why: String,
    },
}

impl<T: Transport + 'static> ReplicaSet<T> {
    /// The replicas `peers` of `vdisk`, owned by this node at `epoch`; an unreachable replica
    /// is retried for [`PEER_RETRY_FOR`].
    pub fn new(transport: Rc<T>, vdisk: u64, epoch: u64, peers: Vec<NodeId>) -> Rc<Self> {
        Self::with_retry(transport, vdisk, epoch, peers, PEER_RETRY_FOR)
    }

    /// [`ReplicaSet::new`] with another retry time (zero: a change fails at the first timeout
    /// or unreachable replica; the deterministic simulation, which has no real time, uses it).
    pub fn with_retry(
        transport: Rc<T>,
        vdisk: u64,
        epoch: u64,
        peers: Vec<NodeId>,
        retry_for: Duration,
    ) -> Rc<Self> {
        Rc::new(Self {
            transport,
            vdisk,
            epoch,
            peers,
            fenced: std::cell::Cell::new(false),
            retry_for,
        })
    }

    /// Whether a replica refused this owner's epoch (it must stop serving the vdisk).
    pub fn is_fenced(&self) -> bool {
        self.fenced.get()
    }

    /// Sends `change` to one replica, retrying while it is unreachable (up to
    /// [`PEER_RETRY_FOR`]).
    async fn send_to(&self, peer: NodeId, request: &Message) -> Result<Vec<u8>, ReplicaError> {
        let deadline = std::time::Instant::now() + self.retry_for;
        let fail = |why: String| ReplicaError::Peer {
            vdisk: self.vdisk,
            peer,
            why,
        };
        loop {
            match self.transport.call(peer, request.clone()).await {
                Ok(r) if r.op == reply::OK => return Ok(r.payload),
                Ok(r) if r.op == reply::STALE => {
                    self.fenced.set(true);
                    return Err(ReplicaError::Fenced {
                        vdisk: self.vdisk,
                        peer,
                        epoch: self.epoch,
                        why: String::from_utf8_lossy(&r.payload).into_owned(),
                    });
                }
                Ok(r) => {
                    return Err(fail(format!(
                        "reply {:#06x}: {}",
                        r.op,
                        String::from_utf8_lossy(&r.payload)
                    )));
                }
                Err(
                    e @ (TransportError::Unreachable { .. }
                    | TransportError::PeerClosed { .. }
                    | TransportError::Timeout { .. }),
                ) => {
                    if std::time::Instant::now() >= deadline {
                        return Err(fail(e.to_string()));
                    }
                    glommio::timer::sleep(PEER_RETRY_PAUSE).await;
                }
                Err(e) => return Err(fail(e.to_string())),
            }
        }
    }

    /// Sends `change` to every replica at once; succeeds when all have it, and returns their
    /// answers one after the other (a VERIFY's lists of slices; a change has none). A READ goes
    /// to one replica after the other until one answers, and returns its data.
    pub async fn send(&self, change: &ReplicaOp) -> Result<Vec<u8>, ReplicaError> {
        // Encoded once for every replica (a batch or a 1 MiB run is copied into it once).
        let request = change.to_message(self.vdisk, self.epoch);
        if self.fenced.get() {
            return Err(ReplicaError::Fenced {
                vdisk: self.vdisk,
                peer: self.peers.first().copied().unwrap_or_default(),
                epoch: self.epoch,
                why: "fenced earlier".into(),
            });
        }
        if let ReplicaOp::Read { .. } | ReplicaOp::OplogRead { .. } = change {
            let mut last = None;
            for &p in &self.peers {
                match self.send_to(p, &request).await {
                    Ok(data) => return Ok(data),
                    Err(e) => last = Some(e),
                }
            }
            return Err(last.unwrap_or(ReplicaError::Peer {
                vdisk: self.vdisk,
                peer: 0,
                why: "no replicas".into(),
            }));
        }
        let sends = self.peers.iter().map(|&p| self.send_to(p, &request));
        let mut answers = Vec::new();
        for r in futures_util::future::join_all(sends).await {
            answers.extend(r?);
        }
        Ok(answers)
    }

    /// The set as a [`Mirror`] for [`crate::vdisk::Vdisk::set_mirror`].
    pub fn mirror(self: &Rc<Self>) -> Mirror {
        let set = self.clone();
        Rc::new(move |change| {
            let set = set.clone();
            Box::pin(async move { set.send(&change).await.map_err(|e| e.to_string()) })
        })
    }
}

/// What a replica knows of one vdisk.
struct Replica<D: BlockDevice> {
    /// The recorded owner and epoch (from the ownership record).
    owner: NodeId,
    epoch: u64,
    /// This node serves the vdisk itself now: nothing is accepted for it.
    taken_over: bool,
    /// A stream (RESET, copy, changes) is under way since this process started. Without one,
    /// only RESET is accepted: changes acknowledged by an earlier run of this process but not
    /// yet flushed may be gone, which only a new copy (compared where kept) repairs.
    streaming: bool,
    oplog: Option<Rc<Oplog<D>>>,
}

/// The replica side on one node: applies the owners' changes to this node's copy (one device)
/// and answers pings. It is the transport [`Handler`] of the node's replication port.
pub struct ReplicaHost<D: BlockDevice, M: MetadataStore> {
    node: NodeId,
    store: RefCell<Rc<BlockStore<D>>>,
    /// The device is out of service: every request, pings included, is refused.
    offline: Cell<bool>,
    meta: Rc<M>,
    oplog_cap_bytes: u64,
    vdisks: RefCell<HashMap<u64, Replica<D>>>,
    /// Requests being applied, per vdisk (a takeover waits for them).
    in_flight: RefCell<HashMap<u64, usize>>,
    /// Signalled whenever a request finishes.
    finished: event_listener::Event,
    /// Serializes the (rare) refreshes of ownership records and oplog opens.
    lock: async_lock::Mutex<()>,
    /// See [`ReplicaHost::verify_mismatches`].
    verify_mismatches: Cell<u64>,
}

impl<D: BlockDevice + 'static, M: MetadataStore + 'static> ReplicaHost<D, M> {
    /// Replicas of node `node` kept on `store`, checked against the ownership records in `meta`.
    pub fn new(node: NodeId, store: Rc<BlockStore<D>>, meta: Rc<M>, oplog_cap_bytes: u64) -> Self {
        Self {
            node,
            store: RefCell::new(store),
            offline: Cell::new(false),
            meta,
            oplog_cap_bytes,
            vdisks: RefCell::new(HashMap::new()),
            in_flight: RefCell::new(HashMap::new()),
            finished: event_listener::Event::new(),
            lock: async_lock::Mutex::new(()),
            verify_mismatches: Cell::new(0),
        }
    }

    /// The device replicas are kept on.
    pub fn store(&self) -> Rc<BlockStore<D>> {
        self.store.borrow().clone()
    }

    /// What this host says of itself in its answer to PING.
    pub fn load(&self) -> HostLoad {
        let stats = self.store().stats();
        HostLoad {
            free_bytes: stats.capacity_bytes.saturating_sub(stats.allocated_bytes),
            copies: self
                .vdisks
                .borrow()
                .values()
                .filter(|r| r.streaming)
                .count() as u32,
        }
    }

    /// Whether the device is out of service.
    pub fn is_offline(&self) -> bool {
        self.offline.get()
    }

    /// Takes the device out of service: every request and ping is refused (owners choose
    /// other replicas), and every replica here is out of sync from now on: a stream must begin
    /// again with RESET.
    pub fn set_offline(&self) {
        self.offline.set(true);
        for r in self.vdisks.borrow_mut().values_mut() {
            r.streaming = false;
            r.oplog = None;
        }
    }

    /// Puts the device back in service, reopened as `store` after validation.
    pub fn readmit(&self, store: Rc<BlockStore<D>>) {
        *self.store.borrow_mut() = store;
        self.offline.set(false);
    }

    /// This node takes `vdisk` over at `epoch` (its ownership record already says so): the
    /// replica stops accepting changes for it, closes its oplog and waits for the requests
    /// already accepted, so the vdisk can then be opened from this device.
    pub async fn take_over(&self, vdisk: u64, epoch: u64) {
        let old = self.vdisks.borrow_mut().insert(
            vdisk,
            Replica {
                owner: self.node,
                epoch,
                taken_over: true,
                streaming: false,
                oplog: None,
            },
        );
        if let Some(o) = old.and_then(|r| r.oplog) {
            o.close();
        }
        self.wait_in_flight(vdisk, 0).await;
    }

    /// Waits until at most `n` requests for `vdisk` are being applied.
    async fn wait_in_flight(&self, vdisk: u64, n: usize) {
        loop {
            let listener = self.finished.listen();
            if self.in_flight.borrow().get(&vdisk).is_none_or(|&k| k <= n) {
                return;
            }
            listener.await;
        }
    }

    /// Frees this device's copy of `vdisk`, unless a stream of it is under way here. For a
    /// node that is neither the vdisk's owner nor one of its recorded replicas: an old owner or
    /// replica that came back after the vdisk moved on. Returns the extent groups freed.
    pub async fn trim_surplus(&self, vdisk: u64) -> Result<usize, StoreError> {
        let busy = self
            .vdisks
            .borrow()
            .get(&vdisk)
            .is_some_and(|r| r.streaming || r.taken_over)
            || self.in_flight.borrow().get(&vdisk).is_some_and(|&n| n > 0);
        if busy {
            return Ok(0);
        }
        // Freed with no await in between the check and the frees: a stream that starts later
        // (RESET) finds the device without the copy, as it would after its own RESET.
        let store = self.store();
        let freed = free_now(&store, vdisk, &Default::default())?;
        if freed > 0 {
            store.flush().await?;
        }
        Ok(freed)
    }

    /// The vdisks this host has heard of.
    pub fn known(&self) -> Vec<u64> {
        self.vdisks.borrow().keys().copied().collect()
    }

    /// Forgets `vdisk` (deleted, or served here no longer): the next request re-reads its record.
    pub fn forget(&self, vdisk: u64) {
        self.vdisks.borrow_mut().remove(&vdisk);
    }

    /// Checks that `from` owns `vdisk` at `epoch`, re-reading the ownership record when the
    /// request names an epoch newer than the one known.
    async fn check(&self, from: NodeId, vdisk: u64, epoch: u64) -> Result<(), (u16, String)> {
        let known = self
            .vdisks
            .borrow()
            .get(&vdisk)
            .map(|r| (r.owner, r.epoch, r.taken_over));
        let (owner, rec_epoch, taken) = match known {
            Some(k) if k.1 >= epoch => k,
            _ => {
                let _g = self.lock.lock().await;
                let rec = self
                    .meta
                    .get(&Ownership::key(vdisk))
                    .await
                    .map_err(|e| (reply::FAILED, format!("reading the ownership record: {e}")))?
                    .ok_or((reply::STALE, format!("vdisk {vdisk} has no owner")))?;
                let rec = Ownership::decode(&rec.value).map_err(|e| (reply::FAILED, e))?;
                let mut map = self.vdisks.borrow_mut();
                let r = map.entry(vdisk).or_insert(Replica {
                    owner: rec.node_id,
                    epoch: rec.epoch,
                    taken_over: false,
                    streaming: false,
                    oplog: None,
                });
                if rec.epoch > r.epoch || (rec.epoch == r.epoch && !r.taken_over) {
                    r.owner = rec.node_id;
                    r.epoch = rec.epoch;
                    r.taken_over = rec.node_id == self.node;
                }
                (r.owner, r.epoch, r.taken_over)
            }
        };
        if taken {
            return Err((
                reply::STALE,
                format!("node {} serves vdisk {vdisk} itself now", self.node),
            ));
        }
        if owner != from || epoch != rec_epoch {
            return Err((
                reply::STALE,
                format!(
                    "vdisk {vdisk} is owned by node {owner} at epoch {rec_epoch}, \
                     not node {from} at epoch {epoch}"
                ),
            ));
        }
        Ok(())
    }

    async fn oplog(&self, vdisk: u64) -> Result<Rc<Oplog<D>>, String> {
        if let Some(o) = self
            .vdisks
            .borrow()
            .get(&vdisk)
            .and_then(|r| r.oplog.clone())
        {
            return Ok(o);
        }
        let _g = self.lock.lock().await;
        match self.vdisks.borrow().get(&vdisk) {
            Some(r) if r.taken_over => return Err("the vdisk was taken over".into()),
            Some(Replica { oplog: Some(o), .. }) => return Ok(o.clone()),
            _ => {}
        }
        // Whatever this device holds of the vdisk's oplog (an earlier run of the same stream)
        // comes back; a new stream begins with RESET, which frees it first.
        let oplog = Rc::new(
            Oplog::recover(self.store(), vdisk, 0, self.oplog_cap_bytes)
                .await
                .map_err(|e| e.to_string())?,
        );
        if let Some(r) = self.vdisks.borrow_mut().get_mut(&vdisk) {
            r.oplog = Some(oplog.clone());
        }
        Ok(oplog)
    }

    async fn apply(&self, vdisk: u64, change: ReplicaOp) -> Result<Vec<u8>, String> {
        let store_err = |e: StoreError| e.to_string();
        match change {
            ReplicaOp::Reset { keep } => {
                // A new stream starts (at a new epoch: requests of the old one are refused from
                // now on); requests of the old one still being applied finish first, so none
                // lands on top of the copy that follows.
                self.wait_in_flight(vdisk, 1).await;
                if let Some(r) = self.vdisks.borrow_mut().get_mut(&vdisk) {
                    r.oplog = None;
                    r.streaming = false;
                }
                let store = self.store();
                let keep: std::collections::HashSet<ExtentGroupId> = keep.into_iter().collect();
                if free_now(&store, vdisk, &keep).map_err(store_err)? > 0 {
                    store.flush().await.map_err(store_err)?;
                }
                if let Some(r) = self.vdisks.borrow_mut().get_mut(&vdisk) {
                    r.streaming = true;
                }
                // Whatever stays is compared before the owner counts on it (VERIFY).
                return Ok(keep
                    .iter()
                    .filter(|&&e| store.contains(e))
                    .flat_map(|e| e.to_le_bytes())
                    .collect());
            }
            ReplicaOp::OplogBatch { bytes, .. } => {
                self.oplog(vdisk)
                    .await?
                    .append_replica(&bytes)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            ReplicaOp::OplogDrained { seq } => {
                let oplog = self
                    .vdisks
                    .borrow()
                    .get(&vdisk)
                    .and_then(|r| r.oplog.clone());
                if let Some(o) = oplog {
                    o.drained(seq).map_err(|e| e.to_string())?;
                }
            }
            ReplicaOp::Allocate { egid } => match self.store().allocate(egid) {
                Ok(()) | Err(StoreError::EgroupExists { .. }) => {}
                Err(e) => return Err(e.to_string()),
            },
            ReplicaOp::Trim {
                egid,
                first,
                blocks,
            } => self
                .store()
                .trim_slices(egid, first, blocks)
                .await
                .map_err(store_err)?,
            ReplicaOp::Write { egid, first, data } => {
                let mut buf = DmaBuf::new(data.len());
                buf.copy_from_slice(&data);
                self.store()
                    .write_slices(egid, first, &buf)
                    .await
                    .map_err(store_err)?;
            }
            ReplicaOp::Flush => self.store().flush().await.map_err(store_err)?,
            ReplicaOp::Free { egid } => match self.store().free(egid) {
                Ok(()) | Err(StoreError::NoSuchEgroup { .. }) => {}
                Err(e) => return Err(e.to_string()),
            },
            ReplicaOp::OplogRead {
                seq,
                offset,
                blocks,
            } => {
                let oplog = self.oplog(vdisk).await?;
                let b = oplog
                    .batch(seq)
                    .ok_or_else(|| format!("oplog batch {seq} is not held here"))?;
                if offset.saturating_add(blocks) > b.data_blocks {
                    return Err(format!(
                        "oplog batch {seq} has {} data slices, not {}",
                        b.data_blocks,
                        offset.saturating_add(blocks)
                    ));
                }
                let mut buf = DmaBuf::new(blocks as usize * BLOCK_BYTES);
                self.store()
                    .read_slices(b.egid, b.data_slice + offset, &mut buf)
                    .await
                    .map_err(store_err)?;
                return Ok(buf.to_vec());
            }
            ReplicaOp::Read {
                egid,
                first,
                blocks,
            } => {
                let mut buf = DmaBuf::new(blocks as usize * BLOCK_BYTES);
                self.store()
                    .read_slices(egid, first, &mut buf)
                    .await
                    .map_err(store_err)?;
                return Ok(buf.to_vec());
            }
            ReplicaOp::Verify { egid, first, crcs } => {
                let bad = differing_slices(&self.store(), egid, first, &crcs)
                    .await
                    .map_err(store_err)?;
                self.verify_mismatches
                    .set(self.verify_mismatches.get() + bad.len() as u64);
                return Ok(bad.iter().flat_map(|s| s.to_le_bytes()).collect());
            }
        }
        Ok(Vec::new())
    }

    /// Slices of this host's copies that a VERIFY (a scrub, or a stream that kept the copy)
    /// found different from their owner's or failing their own checksum; the owner rewrites
    /// each.
    pub fn verify_mismatches(&self) -> u64 {
        self.verify_mismatches.get()
    }
}

impl<D: BlockDevice + 'static, M: MetadataStore + 'static> Handler for ReplicaHost<D, M> {
    async fn handle(&self, from: NodeId, request: Message) -> Message {
        let answer = |op: u16, why: String| Message {
            op,
            vdisk: request.vdisk,
            epoch: request.epoch,
            sequence: request.sequence,
            payload: why.into_bytes(),
        };
        if self.offline.get() {
            let why = format!("node {}: the replica device is offline", self.node);
            return answer(reply::FAILED, why);
        }
        if request.op == op::PING {
            let mut pong = answer(reply::OK, String::new());
            pong.payload = self.load().encode();
            return pong;
        }
        let change = match ReplicaOp::from_message(&request) {
            Ok(c) => c,
            Err(why) => return answer(reply::BAD_REQUEST, why.to_string()),
        };
        if let Err((code, why)) = self.check(from, request.vdisk, request.epoch).await {
            return answer(code, why);
        }
        let streaming = self
            .vdisks
            .borrow()
            .get(&request.vdisk)
            .is_some_and(|r| r.streaming);
        if request.op != op::RESET && !streaming {
            return answer(
                reply::FAILED,
                format!(
                    "node {} has no stream of vdisk {} (restarted?): it needs a new copy",
                    self.node, request.vdisk
                ),
            );
        }
        // Counted from the check on (no await in between), so a takeover that starts later
        // waits for it.
        *self
            .in_flight
            .borrow_mut()
            .entry(request.vdisk)
            .or_default() += 1;
        let result = self.apply(request.vdisk, change).await;
        if let Some(n) = self.in_flight.borrow_mut().get_mut(&request.vdisk) {
            *n -= 1;
        }
        self.finished.notify(usize::MAX);
        match result {
            Ok(data) => Message {
                payload: data,
                ..answer(reply::OK, String::new())
            },
            Err(why) => answer(reply::FAILED, why),
        }
    }
}

/// Slices `first..first + crcs.len()` of `egid` on `store` whose data fails its own checksum or
/// has a crc32c other than `crcs` gives.
async fn differing_slices<D: BlockDevice>(
    store: &BlockStore<D>,
    egid: ExtentGroupId,
    first: u32,
    crcs: &[u32],
) -> Result<Vec<u32>, StoreError> {
    let mut buf = DmaBuf::new(crcs.len() * BLOCK_BYTES);
    let mut bad = Vec::new();
    match store.read_slices(egid, first, &mut buf).await {
        Ok(()) => {
            for (i, (data, &crc)) in buf.chunks(BLOCK_BYTES).zip(crcs).enumerate() {
                if crc32c::crc32c(data) != crc {
                    bad.push(first + i as u32);
                }
            }
        }
        Err(StoreError::ChecksumMismatch { .. }) => {
            // Which ones: slice by slice (rare).
            let mut one = DmaBuf::new(BLOCK_BYTES);
            for (i, &crc) in crcs.iter().enumerate() {
                let slice = first + i as u32;
                match store.read_slices(egid, slice, &mut one).await {
                    Ok(()) if crc32c::crc32c(&one) == crc => {}
                    Ok(()) | Err(StoreError::ChecksumMismatch { .. }) => bad.push(slice),
                    Err(e) => return Err(e),
                }
            }
        }
        Err(e) => return Err(e),
    }
    Ok(bad)
}

/// Frees every extent group of `vdisk` on `store` (oplog and extent store), durably. Returns
/// how many.
pub async fn free_vdisk_egroups<D: BlockDevice>(
    store: &BlockStore<D>,
    vdisk: u64,
) -> Result<usize, StoreError> {
    let freed = free_now(store, vdisk, &Default::default())?;
    if freed > 0 {
        store.flush().await?;
    }
    Ok(freed)
}

/// What a replica host says about itself in its answer to PING (little-endian): version `1`
/// u8, free bytes of its device u64, copies it keeps (vdisks streamed to it) u32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostLoad {
    /// Unallocated bytes of the replica device.
    pub free_bytes: u64,
    /// Vdisk copies the host keeps.
    pub copies: u32,
}

impl HostLoad {
    const VERSION: u8 = 1;
    const LEN: usize = 13;

    /// The ping payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN);
        out.push(Self::VERSION);
        out.extend_from_slice(&self.free_bytes.to_le_bytes());
        out.extend_from_slice(&self.copies.to_le_bytes());
        out
    }

    /// Decodes a ping payload; `None` if empty (an older node), of another version or short.
    pub fn decode(b: &[u8]) -> Option<HostLoad> {
        if b.len() < Self::LEN || b[0] != Self::VERSION {
            return None;
        }
        Some(HostLoad {
            free_bytes: u64::from_le_bytes(b[1..9].try_into().ok()?),
            copies: u32::from_le_bytes(b[9..13].try_into().ok()?),
        })
    }
}

/// A node that answered an owner's ping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaCandidate {
    /// The node.
    pub node: NodeId,
    /// Its ping's round trip.
    pub rtt: std::time::Duration,
    /// What it said of itself (`None`: nothing, an older node).
    pub load: Option<HostLoad>,
}

/// Orders the candidate replica nodes of `vdisk`, best first: current replicas (they hold the
/// copy already), then by round trip in 250 µs steps, copies held, free space in 1 GiB steps
/// (more first), and a hash of (vdisk, node) that spreads vdisks over equal nodes. Nodes that
/// report less free space than `need_bytes` (the copy's size) are left out.
pub fn rank_replicas(
    vdisk: u64,
    current: &[NodeId],
    need_bytes: u64,
    candidates: &[ReplicaCandidate],
) -> Vec<NodeId> {
    let mut ranked: Vec<&ReplicaCandidate> = candidates
        .iter()
        .filter(|c| current.contains(&c.node) || c.load.is_none_or(|l| l.free_bytes >= need_bytes))
        .collect();
    ranked.sort_by_key(|c| {
        let (copies, free_gib) = c
            .load
            .map_or((u32::MAX, 0), |l| (l.copies, l.free_bytes >> 30));
        (
            !current.contains(&c.node),
            c.rtt.as_micros() / 250,
            copies,
            std::cmp::Reverse(free_gib),
            spread_hash(vdisk, c.node),
        )
    });
    ranked.into_iter().map(|c| c.node).collect()
}

/// A hash of (vdisk, node) that orders otherwise equal candidate nodes (splitmix64).
fn spread_hash(vdisk: u64, node: u64) -> u64 {
    let mut z = vdisk
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(node)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Bytes of `vdisk`'s extent groups on `store` (what a full copy of it takes).
pub fn vdisk_bytes<D: BlockDevice>(store: &BlockStore<D>, vdisk: u64) -> u64 {
    let egroup = u64::from(store.layout().egroup_bytes);
    let held = store
        .egroups()
        .iter()
        .filter(|e| vdisk_of_egroup(e.egid) == vdisk)
        .count() as u64;
    held * egroup
}

/// Frees every extent group of `vdisk` on `store` but those in `keep` (not yet durable: flush
/// after).
fn free_now<D: BlockDevice>(
    store: &BlockStore<D>,
    vdisk: u64,
    keep: &std::collections::HashSet<ExtentGroupId>,
) -> Result<usize, StoreError> {
    let mut freed = 0;
    for e in store.egroups() {
        if vdisk_of_egroup(e.egid) == vdisk && !keep.contains(&e.egid) {
            store.free(e.egid)?;
            freed += 1;
        }
    }
    Ok(freed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_are_ranked_by_place_distance_load_and_room() {
        use std::time::Duration;
        let c = |node, rtt_us, copies, free_gib: u64| ReplicaCandidate {
            node,
            rtt: Duration::from_micros(rtt_us),
            load: Some(HostLoad {
                free_bytes: free_gib << 30,
                copies,
            }),
        };
        let all = [
            c(2, 100, 5, 100),
            c(3, 120, 1, 100),
            c(4, 110, 1, 500),
            c(5, 900, 0, 900),
            c(6, 100, 0, 0),
        ];
        // Same distance bucket for 2, 3, 4, 6: fewest copies first, then most room; 6 has no
        // room for a 1 GiB copy; 5 is far.
        assert_eq!(rank_replicas(7, &[], 1 << 30, &all), vec![4, 3, 2, 5]);
        // A current replica keeps its place even when full.
        assert_eq!(rank_replicas(7, &[6], 1 << 30, &all)[0], 6);
        // Nodes that said nothing (older) rank after those that did, in the same bucket.
        let old = ReplicaCandidate {
            node: 9,
            rtt: Duration::from_micros(100),
            load: None,
        };
        assert_eq!(
            rank_replicas(7, &[], 0, &[old, c(2, 100, 5, 1)]),
            vec![2, 9]
        );
        // The ping payload round-trips; an empty or foreign one is unknown.
        let l = HostLoad {
            free_bytes: 123 << 30,
            copies: 7,
        };
        assert_eq!(HostLoad::decode(&l.encode()), Some(l));
        assert_eq!(HostLoad::decode(&[]), None);
        assert_eq!(HostLoad::decode(&[2; 13]), None);
    }

    #[test]
    fn ownership_round_trips_and_refuses_damage() {
        let o = Ownership {
            node_id: 3,
            device_uuid: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
            epoch: 9,
            replicas: vec![1, 2],
        };
        let mut b = o.encode();
        assert_eq!(Ownership::decode(&b).unwrap(), o);
        b[5] ^= 1;
        assert!(Ownership::decode(&b).unwrap_err().contains("checksum"));
        b[5] ^= 1;
        b[0] = 7;
        assert!(Ownership::decode(&b).unwrap_err().contains("version 7"));
        b[0] = 2;
        assert!(
            Ownership::decode(&b[..10])
                .unwrap_err()
                .contains("10 bytes")
        );
        assert_eq!(Ownership::key(1), b"v/0000000000000001/owner".to_vec());
        // Version 1 records (no replicas) still decode.
        let mut v1 = vec![1u8];
        v1.extend_from_slice(&3u64.to_le_bytes());
        v1.extend_from_slice(&o.device_uuid.to_le_bytes());
        v1.extend_from_slice(&1u64.to_le_bytes());
        let crc = crc32c::crc32c(&v1);
        v1.extend_from_slice(&crc.to_le_bytes());
        let d = Ownership::decode(&v1).unwrap();
        assert_eq!((d.node_id, d.epoch, d.replicas.len()), (3, 1, 0));
    }

    #[test]
    fn requests_round_trip_and_bad_ones_are_refused() {
        let vd = 5u64;
        let egid = vd << 24 | 7;
        let ops = [
            ReplicaOp::Reset { keep: vec![] },
            ReplicaOp::Reset {
                keep: vec![egid, egid + 1],
            },
            ReplicaOp::OplogDrained { seq: 11 },
            ReplicaOp::Allocate { egid },
            ReplicaOp::Trim {
                egid,
                first: 3,
                blocks: 9,
            },
            ReplicaOp::Write {
                egid,
                first: 2,
                data: Rc::from(vec![7u8; 8192]),
            },
            ReplicaOp::Flush,
            ReplicaOp::Free { egid },
            ReplicaOp::Read {
                egid,
                first: 5,
                blocks: 256,
            },
            ReplicaOp::OplogRead {
                seq: 9,
                offset: 3,
                blocks: 2,
            },
            ReplicaOp::Verify {
                egid,
                first: 256,
                crcs: vec![1, 2, 0xFFFF_FFFF],
            },
        ];
        for o in ops {
            let m = o.to_message(vd, 4);
            let back = ReplicaOp::from_message(&m).unwrap();
            assert_eq!(back.to_message(vd, 4), m);
        }
        // Another vdisk's extent group, an oplog extent group, short payloads, odd data.
        let other = ReplicaOp::Allocate { egid: 6 << 24 }.to_message(vd, 1);
        assert!(ReplicaOp::from_message(&other).is_err());
        let oplog = ReplicaOp::Free {
            egid: OPLOG_EGID_BIT | egid,
        }
        .to_message(vd, 1);
        assert!(ReplicaOp::from_message(&oplog).is_err());
        let mut short = ReplicaOp::Trim {
            egid,
            first: 0,
            blocks: 1,
        }
        .to_message(vd, 1);
        short.payload.truncate(10);
        assert!(ReplicaOp::from_message(&short).is_err());
        let mut odd = ReplicaOp::Write {
            egid,
            first: 0,
            data: Rc::from(vec![0u8; 4096]),
        }
        .to_message(vd, 1);
        odd.payload.push(1);
        assert!(ReplicaOp::from_message(&odd).is_err());
        // A verify with a partial checksum, with none, or with more than 256.
        let verify = |n: usize| {
            ReplicaOp::Verify {
                egid,
                first: 0,
                crcs: vec![9; n],
            }
            .to_message(vd, 1)
        };
        let mut partial = verify(2);
        partial.payload.pop();
        assert!(ReplicaOp::from_message(&partial).is_err());
        assert!(ReplicaOp::from_message(&verify(0)).is_err());
        assert!(ReplicaOp::from_message(&verify(257)).is_err());
        assert!(ReplicaOp::from_message(&verify(256)).is_ok());
        let unknown = Message {
            op: 0x0199,
            vdisk: vd,
            ..Message::default()
        };
        assert!(ReplicaOp::from_message(&unknown).is_err());
    }
}
