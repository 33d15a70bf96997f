//! SCSI command emulation (SPC-5, SBC-4) for the one logical unit (LUN 0) behind each target.
//!
//! [`execute`] takes a CDB, the Data-Out bytes already collected by the connection, and the
//! I_T nexus that sent it, and returns the status, the Data-In bytes and sense data. It knows
//! nothing of iSCSI: residuals, Data-In segmentation and R2T are the connection's business.
//!
//! State that outlives a session lives in [`LuShared`], one per target on the owning core and
//! shared (`Rc`) by every session to that target: persistent reservations (enforced across
//! I_T nexuses), the legacy RESERVE(6) holder, the write-cache-enable mode bit, and a range lock
//! that serialises COMPARE AND WRITE against other writes to the same blocks (the target runs on
//! one core, so a local lock is enough for atomicity), and the unit attentions pending for each
//! I_T nexus with a session: BUS DEVICE RESET FUNCTION OCCURRED after a LUN or target reset,
//! CAPACITY DATA HAS CHANGED after the vdisk grew, MODE PARAMETERS CHANGED when another nexus
//! changed the caching page, and the reservation conditions of SPC-5 5.14.11 (REGISTRATIONS
//! PREEMPTED, RESERVATIONS PREEMPTED, RESERVATIONS RELEASED), so that a cluster node learns
//! that another one took the disk from it.
//!
//! Sense data is always fixed format (D_SENSE is 0 and not changeable). Unsupported opcodes get
//! ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE; bad CDB fields INVALID FIELD IN CDB; ranges
//! past the end LOGICAL BLOCK ADDRESS OUT OF RANGE. GET LBA STATUS has no allocation map to ask,
//! so it reports blocks that read back as zeroes as deallocated (consistent with LBPRZ=1).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use crate::target::{BlockTarget, TargetError};

/// SCSI status codes.
pub mod status {
    /// GOOD.
    pub const GOOD: u8 = 0x00;
    /// CHECK CONDITION.
    pub const CHECK_CONDITION: u8 = 0x02;
    /// RESERVATION CONFLICT.
    pub const RESERVATION_CONFLICT: u8 = 0x18;
}

/// Sense keys.
mod key {
    pub const NO_SENSE: u8 = 0x0;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const DATA_PROTECT: u8 = 0x7;
    pub const MISCOMPARE: u8 = 0xe;
}

/// Sense data to report with CHECK CONDITION.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    /// Sense key.
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
    /// INFORMATION field (VALID set when present).
    pub info: Option<u32>,
}

impl Sense {
    const fn new(key: u8, asc: u8, ascq: u8) -> Sense {
        Sense {
            key,
            asc,
            ascq,
            info: None,
        }
    }

    /// INVALID COMMAND OPERATION CODE.
    pub const INVALID_OPCODE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00);
    /// INVALID FIELD IN CDB.
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00);
    /// LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00);
    /// INVALID FIELD IN PARAMETER LIST.
    pub const INVALID_FIELD_IN_PARAMETER_LIST: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x00);
    /// PARAMETER LIST LENGTH ERROR.
    pub const PARAMETER_LIST_LENGTH: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x1a, 0x00);
    /// LOGICAL UNIT NOT SUPPORTED.
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x25, 0x00);
    /// SAVING PARAMETERS NOT SUPPORTED.
    pub const SAVING_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x39, 0x00);
    /// INVALID RELEASE OF PERSISTENT RESERVATION.
    pub const INVALID_RELEASE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x04);
    /// MISCOMPARE DURING VERIFY OPERATION.
    pub const MISCOMPARE: Sense = Sense::new(key::MISCOMPARE, 0x1d, 0x00);
    /// UNRECOVERED READ ERROR.
    pub const READ_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x11, 0x00);
    /// WRITE ERROR.
    pub const WRITE_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x0c, 0x00);
    /// SPACE ALLOCATION FAILED WRITE PROTECT.
    pub const NO_SPACE: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x07);
    /// UNIT ATTENTION: BUS DEVICE RESET FUNCTION OCCURRED.
    pub const RESET_OCCURRED: Sense = Sense::new(0x6, 0x29, 0x03);
    /// UNIT ATTENTION: CAPACITY DATA HAS CHANGED.
    pub const CAPACITY_CHANGED: Sense = Sense::new(0x6, 0x2a, 0x09);
    /// UNIT ATTENTION: MODE PARAMETERS CHANGED (another I_T nexus changed a shared page).
    pub const MODE_PARAMETERS_CHANGED: Sense = Sense::new(0x6, 0x2a, 0x01);
    /// UNIT ATTENTION: RESERVATIONS PREEMPTED (another I_T nexus cleared them).
    pub const RESERVATIONS_PREEMPTED: Sense = Sense::new(0x6, 0x2a, 0x03);
    /// UNIT ATTENTION: RESERVATIONS RELEASED (a registrants-only or all-registrants
    /// reservation this nexus took part in ended, or changed type).
    pub const RESERVATIONS_RELEASED: Sense = Sense::new(0x6, 0x2a, 0x04);
    /// UNIT ATTENTION: REGISTRATIONS PREEMPTED (this nexus's registration was removed).
    pub const REGISTRATIONS_PREEMPTED: Sense = Sense::new(0x6, 0x2a, 0x05);
    /// ABORTED COMMAND: DATA PHASE ERROR (Data-Out out of sequence).
    pub const DATA_PHASE_ERROR: Sense = Sense::new(0xb, 0x4b, 0x00);
    /// HARDWARE ERROR: INTERNAL TARGET FAILURE (the reservation state could not be saved).
    pub const INTERNAL_TARGET_FAILURE: Sense = Sense::new(0x4, 0x44, 0x00);
    /// LOGICAL UNIT NOT READY, CAUSE NOT REPORTABLE.
    pub const NOT_READY: Sense = Sense::new(key::NOT_READY, 0x04, 0x00);

    /// Fixed-format sense data (18 bytes).
    pub fn fixed(&self) -> [u8; 18] {
        let mut s = [0u8; 18];
        s[0] = 0x70;
        s[2] = self.key;
        if let Some(info) = self.info {
            s[0] |= 0x80;
            s[3..7].copy_from_slice(&info.to_be_bytes());
        }
        s[7] = 10;
        s[12] = self.asc;
        s[13] = self.ascq;
        s
    }
}

/// What a command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// SCSI status.
    pub status: u8,
    /// Data-In bytes (before truncation to the expected transfer length).
    pub data: Vec<u8>,
    /// Sense data, with CHECK CONDITION.
    pub sense: Option<Sense>,
}

enum Fail {
    Check(Sense),
    Conflict,
}

impl From<Sense> for Fail {
    fn from(s: Sense) -> Fail {
        Fail::Check(s)
    }
}

type Res<T> = Result<T, Fail>;

/// An I_T nexus: initiator port (name + ISID) to our one target port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Nexus {
    /// `<initiator name>,i,0x<isid>` (the iSCSI initiator port name).
    pub id: String,
}

impl Nexus {
    /// The nexus of an initiator session.
    pub fn new(initiator: &str, isid: &[u8; 6]) -> Nexus {
        let mut id = format!("{initiator},i,0x");
        for b in isid {
            id.push_str(&format!("{b:02x}"));
        }
        Nexus { id }
    }

    /// The iSCSI TransportID (initiator port format) for READ FULL STATUS.
    fn transport_id(&self) -> Vec<u8> {
        let mut name = self.id.as_bytes().to_vec();
        name.push(0);
        while !name.len().is_multiple_of(4) || name.len() < 16 {
            name.push(0);
        }
        let mut t = vec![0x40 | 0x05, 0];
        t.extend_from_slice(&(name.len() as u16).to_be_bytes());
        t.extend_from_slice(&name);
        t
    }
}

/// Persistent reservation state of one logical unit.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PrState {
    generation: u32,
    registrations: Vec<(Nexus, u64)>,
    reservation: Option<(Nexus, u8)>,
    /// The APTPL bit of the last REGISTER (reported as PTPL_A). The state is saved either way
    /// (see [`persistent_reserve_out`]).
    aptpl: bool,
}

/// Reservation types.
mod pr_type {
    pub const WRITE_EXCLUSIVE: u8 = 1;
    pub const EXCLUSIVE_ACCESS: u8 = 3;
    pub const WRITE_EXCLUSIVE_RO: u8 = 5;
    pub const EXCLUSIVE_ACCESS_RO: u8 = 6;
    pub const WRITE_EXCLUSIVE_AR: u8 = 7;
    pub const EXCLUSIVE_ACCESS_AR: u8 = 8;
}

fn registrants_only(t: u8) -> bool {
    matches!(
        t,
        pr_type::WRITE_EXCLUSIVE_RO | pr_type::EXCLUSIVE_ACCESS_RO
    )
}

fn all_registrants(t: u8) -> bool {
    matches!(
        t,
        pr_type::WRITE_EXCLUSIVE_AR | pr_type::EXCLUSIVE_ACCESS_AR
    )
}

/// Reads the fields of saved reservation state in order.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], PrDecodeError> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or(PrDecodeError::Truncated)?;
        self.0 = rest;
        Ok(*head)
    }

    fn nexus(&mut self) -> Result<Nexus, PrDecodeError> {
        let len = usize::from(u16::from_le_bytes(self.take()?));
        let name = self.0.get(..len).ok_or(PrDecodeError::Truncated)?;
        self.0 = &self.0[len..];
        let id = std::str::from_utf8(name).map_err(|_| PrDecodeError::Name)?;
        Ok(Nexus { id: id.to_owned() })
    }
}

/// Why saved reservation state was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrDecodeError {
    /// Shorter than its header or its declared contents.
    #[error("reservation state truncated")]
    Truncated,
    /// A version this code does not read.
    #[error("reservation state version {0} is unknown")]
    Version(u8),
    /// The checksum does not match.
    #[error("reservation state checksum mismatch")]
    Checksum,
    /// A nexus name is not UTF-8.
    #[error("reservation state holds a malformed initiator port name")]
    Name,
}

impl PrState {
    const VERSION: u8 = 2;

    /// The saved form: version u8 (2), generation u32, registrations u32, each (key u64, name
    /// length u16, name), reservation flag u8 [+ type u8, name length u16, name], APTPL u8,
    /// crc32c u32 of everything before it; integers little-endian. Version 1 is the same
    /// without the APTPL byte (read as 0).
    pub fn encode(&self) -> Vec<u8> {
        fn name(out: &mut Vec<u8>, n: &Nexus) {
            out.extend_from_slice(&(n.id.len() as u16).to_le_bytes());
            out.extend_from_slice(n.id.as_bytes());
        }
        let mut out = vec![Self::VERSION];
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(&(self.registrations.len() as u32).to_le_bytes());
        for (n, key) in &self.registrations {
            out.extend_from_slice(&key.to_le_bytes());
            name(&mut out, n);
        }
        match &self.reservation {
            None => out.push(0),
            Some((n, t)) => {
                out.push(1);
                out.push(*t);
                name(&mut out, n);
            }
        }
        out.push(u8::from(self.aptpl));
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Reads [`Self::encode`]'s form back.
    pub fn decode(bytes: &[u8]) -> Result<PrState, PrDecodeError> {
        let (body, crc) = bytes
            .split_last_chunk::<4>()
            .ok_or(PrDecodeError::Truncated)?;
        if crc32c::crc32c(body) != u32::from_le_bytes(*crc) {
            return Err(PrDecodeError::Checksum);
        }
        let mut r = Cursor(body);
        let version = r.take::<1>()?[0];
        if !(1..=Self::VERSION).contains(&version) {
            return Err(PrDecodeError::Version(version));
        }
        let generation = u32::from_le_bytes(r.take()?);
        let count = u32::from_le_bytes(r.take()?);
        let mut registrations = Vec::new();
        for _ in 0..count {
            let key = u64::from_le_bytes(r.take()?);
            registrations.push((r.nexus()?, key));
        }
        let reservation = match r.take::<1>()?[0] {
            0 => None,
            _ => {
                let t = r.take::<1>()?[0];
                Some((r.nexus()?, t))
            }
        };
        let aptpl = version >= 2 && r.take::<1>()?[0] != 0;
        Ok(PrState {
            generation,
            registrations,
            reservation,
            aptpl,
        })
    }

    fn key_of(&self, nexus: &Nexus) -> Option<u64> {
        self.registrations
            .iter()
            .find(|(n, _)| n == nexus)
            .map(|(_, k)| *k)
    }

    fn is_holder(&self, nexus: &Nexus) -> bool {
        match &self.reservation {
            Some((_, t)) if all_registrants(*t) => self.key_of(nexus).is_some(),
            Some((holder, _)) => holder == nexus,
            None => false,
        }
    }

    fn unregister(&mut self, nexus: &Nexus) {
        self.registrations.retain(|(n, _)| n != nexus);
        // An all-registrants reservation lasts while anyone is registered; others end with
        // their holder's registration.
        let release = match &self.reservation {
            Some((_, t)) if all_registrants(*t) => self.registrations.is_empty(),
            Some((holder, _)) => holder == nexus,
            None => false,
        };
        if release {
            self.reservation = None;
        }
    }
}

/// A set of locked block ranges; holders of overlapping ranges wait for each other.
#[derive(Debug, Default)]
pub struct RangeLock {
    held: RefCell<Vec<(u64, u64, u64)>>,
    next_id: Cell<u64>,
    released: event_listener::Event,
}

struct RangeGuard<'a> {
    lock: &'a RangeLock,
    id: u64,
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        self.lock
            .held
            .borrow_mut()
            .retain(|&(_, _, id)| id != self.id);
        self.lock.released.notify(usize::MAX);
    }
}

impl RangeLock {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.held
            .borrow()
            .iter()
            .any(|&(s, e, _)| s < end && start < e)
    }

    async fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        loop {
            if !self.overlaps(start, end) {
                break;
            }
            let listener = self.released.listen();
            if !self.overlaps(start, end) {
                break;
            }
            listener.await;
        }
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        self.held.borrow_mut().push((start, end, id));
        RangeGuard { lock: self, id }
    }
}

/// Where a logical unit's persistent-reservation state is kept, so that it survives restarts
/// and failover (the node keeps it in the metadata store, under the vdisk's prefix).
pub trait ReservationStore {
    /// The saved state, if any.
    fn load(&self) -> StoreFuture<'_, Option<Vec<u8>>>;
    /// Saves `state` (durable when this returns).
    fn save(&self, state: Vec<u8>) -> StoreFuture<'_, ()>;
}

/// What a [`ReservationStore`] call returns (the error says what went wrong).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, String>> + 'a>>;

/// Logical-unit state shared by every session to one target on the owning core.
pub struct LuShared {
    /// Persistent reservations.
    pub pr: RefCell<PrState>,
    /// Where they are saved (`None`: in memory only).
    pub pr_store: RefCell<Option<Rc<dyn ReservationStore>>>,
    /// Serialises PERSISTENT RESERVE OUT commands (each saves the state before it applies).
    pr_lock: async_lock::Mutex<()>,
    /// The RESERVE(6) holder.
    pub reserve6: RefCell<Option<Nexus>>,
    /// Write cache enabled (caching mode page WCE); when off every write is FUA.
    pub wce: Cell<bool>,
    /// Serialises COMPARE AND WRITE with other writes to the same blocks.
    pub locks: RangeLock,
    /// I_T nexuses with a session to this unit (one entry per session).
    pub nexuses: RefCell<Vec<Nexus>>,
    /// Pending unit attention conditions, reported once each.
    pub unit_attentions: RefCell<Vec<(Nexus, Sense)>>,
    /// The capacity the initiators were last told of (0: not yet seen).
    pub capacity: Cell<u64>,
}

impl Default for LuShared {
    fn default() -> Self {
        LuShared {
            pr: RefCell::default(),
            pr_store: RefCell::default(),
            pr_lock: async_lock::Mutex::new(()),
            reserve6: RefCell::default(),
            wce: Cell::new(true),
            locks: RangeLock::default(),
            nexuses: RefCell::default(),
            unit_attentions: RefCell::default(),
            capacity: Cell::new(0),
        }
    }
}

impl std::fmt::Debug for LuShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LuShared")
            .field("pr", &self.pr)
            .field("reserve6", &self.reserve6)
            .field("nexuses", &self.nexuses)
            .finish_non_exhaustive()
    }
}

impl LuShared {
    /// Attaches `store` and loads the reservation state saved there, unless sessions are
    /// open on the unit (then the state in memory, saved at every change, is the newest).
    pub async fn attach_reservations(&self, store: Rc<dyn ReservationStore>) -> Result<(), String> {
        if !self.nexuses.borrow().is_empty() && self.pr_store.borrow().is_some() {
            return Ok(());
        }
        let _g = self.pr_lock.lock().await;
        let saved = store.load().await?;
        let state = match saved {
            Some(bytes) => PrState::decode(&bytes).map_err(|e| e.to_string())?,
            None => PrState::default(),
        };
        *self.pr.borrow_mut() = state;
        *self.pr_store.borrow_mut() = Some(store);
        Ok(())
    }

    /// A session of `nexus` started.
    pub fn nexus_added(&self, nexus: &Nexus) {
        self.nexuses.borrow_mut().push(nexus.clone());
    }

    /// A session of `nexus` ended: ends what does not survive the loss of the I_T nexus
    /// (RESERVE(6), pending unit attentions).
    pub fn nexus_lost(&self, nexus: &Nexus) {
        let mut nexuses = self.nexuses.borrow_mut();
        if let Some(at) = nexuses.iter().position(|n| n == nexus) {
            nexuses.swap_remove(at);
        }
        if nexuses.contains(nexus) {
            return;
        }
        drop(nexuses);
        self.release6(nexus);
        self.unit_attentions
            .borrow_mut()
            .retain(|(n, _)| n != nexus);
    }

    fn release6(&self, nexus: &Nexus) {
        let mut r = self.reserve6.borrow_mut();
        if r.as_ref() == Some(nexus) {
            *r = None;
        }
    }

    /// A LUN or target reset: clears RESERVE(6) (persistent reservations survive) and raises
    /// a unit attention (BUS DEVICE RESET FUNCTION OCCURRED) for every I_T nexus.
    pub fn reset(&self) {
        *self.reserve6.borrow_mut() = None;
        let mut ua = self.unit_attentions.borrow_mut();
        for nexus in self.nexuses.borrow().iter() {
            if !ua.iter().any(|(n, _)| n == nexus) {
                ua.push((nexus.clone(), Sense::RESET_OCCURRED));
            }
        }
    }

    /// The unit's capacity is `bytes` now: when it changed (the vdisk was grown while served),
    /// every I_T nexus gets a unit attention (CAPACITY DATA HAS CHANGED), as SBC-4 asks.
    pub fn note_capacity(&self, bytes: u64) {
        let known = self.capacity.replace(bytes);
        if known == 0 || known == bytes {
            return;
        }
        self.raise_all(None, Sense::CAPACITY_CHANGED);
    }

    /// [`Self::raise`] for every I_T nexus with a session but `except`.
    fn raise_all(&self, except: Option<&Nexus>, sense: Sense) {
        let nexuses = self.nexuses.borrow().clone();
        for n in nexuses.iter().filter(|n| Some(*n) != except) {
            self.raise(n, sense);
        }
    }

    /// Establishes unit attention `sense` for `nexus`, if it has a session to this unit (a
    /// nexus without one has nothing to be told) and the same condition is not pending.
    fn raise(&self, nexus: &Nexus, sense: Sense) {
        if !self.nexuses.borrow().contains(nexus) {
            return;
        }
        let mut ua = self.unit_attentions.borrow_mut();
        if !ua.iter().any(|(n, s)| n == nexus && *s == sense) {
            ua.push((nexus.clone(), sense));
        }
    }

    fn take_unit_attention(&self, nexus: &Nexus) -> Option<Sense> {
        let mut ua = self.unit_attentions.borrow_mut();
        let at = ua.iter().position(|(n, _)| n == nexus)?;
        Some(ua.remove(at).1)
    }
}

/// A logical unit: a target with its shared state and name.
pub struct Lu<T> {
    /// The disk.
    pub target: Rc<T>,
    /// Shared state.
    pub shared: Rc<LuShared>,
    /// Export (vdisk) name, for identifiers.
    pub name: String,
}

/// Largest WRITE SAME in blocks we accept.
const MAX_WRITE_SAME_BLOCKS: u64 = 1 << 22;
/// Largest COMPARE AND WRITE in blocks.
const MAX_CAW_BLOCKS: u8 = 128;
/// Largest UNMAP: blocks, and descriptors.
const MAX_UNMAP_BLOCKS: u32 = 1 << 20;
const MAX_UNMAP_DESCRIPTORS: u32 = 256;
/// Chunk in which WRITE SAME patterns and GET LBA STATUS scans are processed.
const CHUNK_BYTES: usize = 1 << 20;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn truncate(mut v: Vec<u8>, alloc: usize) -> Vec<u8> {
    v.truncate(alloc);
    v
}

fn target_error(e: &TargetError, write: bool) -> Sense {
    match e {
        TargetError::OutOfRange { .. } => Sense::LBA_OUT_OF_RANGE,
        TargetError::NoSpace { .. } => Sense::NO_SPACE,
        TargetError::Io { .. } if write => Sense::WRITE_ERROR,
        TargetError::Io { .. } => Sense::READ_ERROR,
        TargetError::Unavailable { .. } => Sense::NOT_READY,
    }
}

/// Medium access class of a command, for reservation checks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Allowed under any reservation.
    Any,
    /// Reads the medium.
    Read,
    /// Writes the medium or changes state.
    Write,
}

/// The commands we implement: opcode, service action, CDB length, access class.
const COMMANDS: &[(u8, Option<u16>, u8, Access)] = &[
    (0x00, None, 6, Access::Any),         // TEST UNIT READY
    (0x03, None, 6, Access::Any),         // REQUEST SENSE
    (0x08, None, 6, Access::Read),        // READ(6)
    (0x0a, None, 6, Access::Write),       // WRITE(6)
    (0x12, None, 6, Access::Any),         // INQUIRY
    (0x15, None, 6, Access::Write),       // MODE SELECT(6)
    (0x16, None, 6, Access::Any),         // RESERVE(6)
    (0x17, None, 6, Access::Any),         // RELEASE(6)
    (0x1a, None, 6, Access::Any),         // MODE SENSE(6)
    (0x25, None, 10, Access::Any),        // READ CAPACITY(10)
    (0x28, None, 10, Access::Read),       // READ(10)
    (0x2a, None, 10, Access::Write),      // WRITE(10)
    (0x2e, None, 10, Access::Write),      // WRITE AND VERIFY(10)
    (0x2f, None, 10, Access::Read),       // VERIFY(10)
    (0x35, None, 10, Access::Write),      // SYNCHRONIZE CACHE(10)
    (0x41, None, 10, Access::Write),      // WRITE SAME(10)
    (0x42, None, 10, Access::Write),      // UNMAP
    (0x55, None, 10, Access::Write),      // MODE SELECT(10)
    (0x5a, None, 10, Access::Any),        // MODE SENSE(10)
    (0x5e, Some(0), 10, Access::Any),     // PERSISTENT RESERVE IN: READ KEYS
    (0x5e, Some(1), 10, Access::Any),     // READ RESERVATION
    (0x5e, Some(2), 10, Access::Any),     // REPORT CAPABILITIES
    (0x5e, Some(3), 10, Access::Any),     // READ FULL STATUS
    (0x5f, Some(0), 10, Access::Any),     // PERSISTENT RESERVE OUT: REGISTER
    (0x5f, Some(1), 10, Access::Any),     // RESERVE
    (0x5f, Some(2), 10, Access::Any),     // RELEASE
    (0x5f, Some(3), 10, Access::Any),     // CLEAR
    (0x5f, Some(4), 10, Access::Any),     // PREEMPT
    (0x5f, Some(5), 10, Access::Any),     // PREEMPT AND ABORT
    (0x5f, Some(6), 10, Access::Any),     // REGISTER AND IGNORE EXISTING KEY
    (0x34, None, 10, Access::Read),       // PRE-FETCH(10)
    (0x88, None, 16, Access::Read),       // READ(16)
    (0x8b, None, 16, Access::Write),      // ORWRITE(16)
    (0x90, None, 16, Access::Read),       // PRE-FETCH(16)
    (0x89, None, 16, Access::Write),      // COMPARE AND WRITE
    (0x8a, None, 16, Access::Write),      // WRITE(16)
    (0x8e, None, 16, Access::Write),      // WRITE AND VERIFY(16)
    (0x8f, None, 16, Access::Read),       // VERIFY(16)
    (0x91, None, 16, Access::Write),      // SYNCHRONIZE CACHE(16)
    (0x93, None, 16, Access::Write),      // WRITE SAME(16)
    (0x9e, Some(0x10), 16, Access::Any),  // READ CAPACITY(16)
    (0x9e, Some(0x12), 16, Access::Read), // GET LBA STATUS
    (0xa0, None, 12, Access::Any),        // REPORT LUNS
    (0xa3, Some(0x0c), 12, Access::Any),  // REPORT SUPPORTED OPERATION CODES
    (0xa8, None, 12, Access::Read),       // READ(12)
    (0xaa, None, 12, Access::Write),      // WRITE(12)
    (0xae, None, 12, Access::Write),      // WRITE AND VERIFY(12)
    (0xaf, None, 12, Access::Read),       // VERIFY(12)
];

fn service_action(cdb: &[u8; 16]) -> u16 {
    u16::from(cdb[1] & 0x1f)
}

fn lookup(cdb: &[u8; 16]) -> Option<&'static (u8, Option<u16>, u8, Access)> {
    let sa = service_action(cdb);
    COMMANDS
        .iter()
        .find(|(op, s, _, _)| *op == cdb[0] && s.is_none_or(|s| s == sa))
}

/// The CDB length of `opcode` (from its group code), for commands we do not know.
pub fn cdb_len(opcode: u8) -> usize {
    match opcode >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 16,
    }
}

/// The logical block size LUN 0 reports for `target`.
pub fn block_bytes<T: BlockTarget>(target: &T) -> u32 {
    Geometry::of(target).block
}

/// Data-Out bytes a CDB asks for (`None` for commands that take none), for residuals.
pub fn data_out_bytes(cdb: &[u8; 16], block: u32) -> Option<u64> {
    let block = u64::from(block);
    let (_, blocks) = rw_fields(cdb);
    match cdb[0] {
        0x0a | 0x2a | 0xaa | 0x8a | 0x8b | 0x2e | 0xae | 0x8e => Some(blocks * block),
        0x2f | 0xaf | 0x8f => match (cdb[1] >> 1) & 0x03 {
            1 => Some(blocks * block),
            3 => Some(block),
            _ => Some(0),
        },
        0x41 => Some(block),
        0x93 => Some(if cdb[1] & 0x01 != 0 { 0 } else { block }),
        0x89 => Some(2 * u64::from(cdb[13]) * block),
        0x42 | 0x55 => Some(u64::from(be16(cdb, 7))),
        0x15 => Some(u64::from(cdb[4])),
        0x5f => Some(u64::from(be32(cdb, 5))),
        _ => None,
    }
}

/// Runs one SCSI command for `nexus` on logical unit `lun`.
pub async fn execute<T: BlockTarget>(
    lu: &Lu<T>,
    nexus: &Nexus,
    lun: u64,
    cdb: &[u8; 16],
    data_out: &[u8],
) -> Outcome {
    let result = if lun != 0 {
        match cdb[0] {
            0x12 => inquiry(lu, cdb, false),
            0xa0 => report_luns(cdb),
            0x03 => request_sense(cdb),
            _ => Err(Sense::LUN_NOT_SUPPORTED.into()),
        }
    } else {
        dispatch(lu, nexus, cdb, data_out).await
    };
    match result {
        Ok(data) => Outcome {
            status: status::GOOD,
            data,
            sense: None,
        },
        Err(Fail::Check(sense)) => Outcome {
            status: status::CHECK_CONDITION,
            data: Vec::new(),
            sense: Some(sense),
        },
        Err(Fail::Conflict) => Outcome {
            status: status::RESERVATION_CONFLICT,
            data: Vec::new(),
            sense: None,
        },
    }
}

fn check_reservations<T>(lu: &Lu<T>, nexus: &Nexus, cdb: &[u8; 16], access: Access) -> Res<()> {
    if let Some(holder) = lu.shared.reserve6.borrow().as_ref()
        && holder != nexus
        && !matches!(cdb[0], 0x12 | 0xa0 | 0x03 | 0x17 | 0xa3)
    {
        return Err(Fail::Conflict);
    }
    if access == Access::Any {
        return Ok(());
    }
    let pr = lu.shared.pr.borrow();
    let Some((_, rtype)) = &pr.reservation else {
        return Ok(());
    };
    if pr.is_holder(nexus) {
        return Ok(());
    }
    let registered = pr.key_of(nexus).is_some();
    let conflict = match *rtype {
        pr_type::WRITE_EXCLUSIVE => access == Access::Write,
        pr_type::EXCLUSIVE_ACCESS => true,
        pr_type::WRITE_EXCLUSIVE_RO | pr_type::WRITE_EXCLUSIVE_AR => {
            access == Access::Write && !registered
        }
        pr_type::EXCLUSIVE_ACCESS_RO | pr_type::EXCLUSIVE_ACCESS_AR => !registered,
        _ => false,
    };
    if conflict {
        Err(Fail::Conflict)
    } else {
        Ok(())
    }
}

async fn dispatch<T: BlockTarget>(
    lu: &Lu<T>,
    nexus: &Nexus,
    cdb: &[u8; 16],
    data_out: &[u8],
) -> Res<Vec<u8>> {
    let Some(&(_, _, _, access)) = lookup(cdb) else {
        return Err(match cdb[0] {
            0x5e | 0x5f | 0x9e | 0xa3 => Sense::INVALID_FIELD_IN_CDB,
            _ => Sense::INVALID_OPCODE,
        }
        .into());
    };
    lu.shared.note_capacity(lu.target.size_bytes());
    if !matches!(cdb[0], 0x12 | 0xa0 | 0x03)
        && let Some(ua) = lu.shared.take_unit_attention(nexus)
    {
        return Err(ua.into());
    }
    check_reservations(lu, nexus, cdb, access)?;
    let g = Geometry::of(&*lu.target);
    match cdb[0] {
        0x00 => Ok(Vec::new()),
        0x03 => match lu.shared.take_unit_attention(nexus) {
            Some(ua) => Ok(truncate(ua.fixed().to_vec(), usize::from(cdb[4]))),
            None => request_sense(cdb),
        },
        0x12 => inquiry(lu, cdb, true),
        0x25 => read_capacity10(&g, cdb),
        0x9e if service_action(cdb) == 0x10 => read_capacity16(&g, cdb),
        0x9e => get_lba_status(lu, &g, cdb).await,
        0x08 | 0x28 | 0xa8 | 0x88 => read(lu, &g, cdb).await,
        0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e => write(lu, &g, cdb, data_out).await,
        0x2f | 0xaf | 0x8f => verify(lu, &g, cdb, data_out).await,
        0x41 | 0x93 => write_same(lu, &g, cdb, data_out).await,
        0x42 => unmap(lu, &g, cdb, data_out).await,
        0x89 => compare_and_write(lu, &g, cdb, data_out).await,
        0x8b => or_write(lu, &g, cdb, data_out).await,
        0x34 | 0x90 => {
            // PRE-FETCH: there is no cache to fill; a valid range completes at once.
            let (lba, blocks) = rw_fields(cdb);
            g.range(lba, blocks)?;
            Ok(Vec::new())
        }
        0x35 | 0x91 => synchronize_cache(lu, &g, cdb).await,
        0x1a | 0x5a => mode_sense(lu, &g, cdb),
        0x15 | 0x55 => mode_select(lu, nexus, cdb, data_out),
        0xa0 => report_luns(cdb),
        0xa3 => report_supported_opcodes(cdb),
        0x5e => persistent_reserve_in(lu, cdb),
        0x5f => persistent_reserve_out(lu, nexus, cdb, data_out).await,
        0x16 => reserve6(lu, nexus),
        0x17 => {
            lu.shared.release6(nexus);
            Ok(Vec::new())
        }
        _ => Err(Sense::INVALID_OPCODE.into()),
    }
}

/// Block geometry derived from the target.
struct Geometry {
    block: u32,
    blocks: u64,
    max_transfer_blocks: u32,
    optimal_blocks: u32,
    physical_exponent: u8,
}

impl Geometry {
    fn of<T: BlockTarget>(t: &T) -> Geometry {
        let block = t.min_block_bytes().max(512);
        let preferred = t.preferred_block_bytes().max(block);
        let optimal = preferred / block;
        Geometry {
            block,
            blocks: t.size_bytes() / u64::from(block),
            max_transfer_blocks: (t.max_request_bytes() / block).max(1),
            optimal_blocks: optimal.max(1),
            // Reported as 0 (one logical block per physical block): the preferred size is
            // advertised as the optimal transfer granularity instead, and GET LBA STATUS then
            // reports at logical-block granularity, as libiscsi's tests expect.
            physical_exponent: 0,
        }
    }

    /// Byte offset and length of `blocks` blocks at `lba`, checked against the capacity.
    fn range(&self, lba: u64, blocks: u64) -> Res<(u64, u64)> {
        match lba.checked_add(blocks) {
            Some(end) if end <= self.blocks => {
                Ok((lba * u64::from(self.block), blocks * u64::from(self.block)))
            }
            _ => Err(Sense::LBA_OUT_OF_RANGE.into()),
        }
    }
}

/// LBA, block count and flags byte of a READ/WRITE/VERIFY-family CDB.
fn rw_fields(cdb: &[u8; 16]) -> (u64, u64) {
    match cdb[0] {
        0x08 | 0x0a => {
            let lba = u64::from(u32::from_be_bytes([0, cdb[1] & 0x1f, cdb[2], cdb[3]]));
            let n = if cdb[4] == 0 { 256 } else { u64::from(cdb[4]) };
            (lba, n)
        }
        0x28 | 0x2a | 0x2e | 0x2f | 0x34 | 0x35 | 0x41 => {
            (u64::from(be32(cdb, 2)), u64::from(be16(cdb, 7)))
        }
        0xa8 | 0xaa | 0xae | 0xaf => (u64::from(be32(cdb, 2)), u64::from(be32(cdb, 6))),
        _ => (be64(cdb, 2), u64::from(be32(cdb, 10))),
    }
}

async fn read_into<T: BlockTarget>(lu: &Lu<T>, offset: u64, out: &mut [u8]) -> Res<()> {
    let chunk = lu.target.max_request_bytes().max(512) as usize;
    let mut at = 0;
    while at < out.len() {
        let n = chunk.min(out.len() - at);
        lu.target
            .read(offset + at as u64, &mut out[at..at + n])
            .await
            .map_err(|e| target_error(&e, false))?;
        at += n;
    }
    Ok(())
}

async fn write_from<T: BlockTarget>(lu: &Lu<T>, offset: u64, data: &[u8], fua: bool) -> Res<()> {
    let chunk = lu.target.max_request_bytes().max(512) as usize;
    let fua = fua || !lu.shared.wce.get();
    for (i, piece) in data.chunks(chunk).enumerate() {
        lu.target
            .write(offset + (i * chunk) as u64, piece, fua)
            .await
            .map_err(|e| target_error(&e, true))?;
    }
    Ok(())
}

async fn read<T: BlockTarget>(lu: &Lu<T>, g: &Geometry, cdb: &[u8; 16]) -> Res<Vec<u8>> {
    if cdb[0] != 0x08 && cdb[1] & 0xe0 != 0 {
        return Err(Sense::INVALID_FIELD_IN_CDB.into()); // RDPROTECT: no protection info
    }
    let (lba, blocks) = rw_fields(cdb);
    let (offset, len) = g.range(lba, blocks)?;
    if blocks > u64::from(g.max_transfer_blocks) {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    let mut data = vec![0u8; len as usize];
    read_into(lu, offset, &mut data).await?;
    Ok(data)
}

async fn write<T: BlockTarget>(
    lu: &Lu<T>,
    g: &Geometry,
    cdb: &[u8; 16],
    data_out: &[u8],
) -> Res<Vec<u8>> {
    if cdb[0] != 0x0a && cdb[1] & 0xe0 != 0 {
        return Err(Sense::INVALID_FIELD_IN_CDB.into()); // WRPROTECT
    }
    let (lba, blocks) = rw_fields(cdb);
    let (offset, len) = g.range(lba, blocks)?;
    if blocks > u64::from(g.max_transfer_blocks) {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    // An Expected Data Transfer Length below the CDB's (iSCSI overflow) writes only the whole
    // blocks that were sent; the residual tells the initiator the rest was not.
    let whole = (data_out.len() as u64 / u64::from(g.block)) * u64::from(g.block);
    let data = &data_out[..len.min(whole) as usize];
    if data.is_empty() {
        return Ok(Vec::new());
    }
    let verify = matches!(cdb[0], 0x2e | 0xae | 0x8e);
    let fua = verify || (cdb[0] != 0x0a && cdb[1] & 0x08 != 0);
    let _guard = lu.shared.locks.lock(lba, lba + blocks).await;
    write_from(lu, offset, data, fua).await?;
    Ok(Vec::new())
}

/// Index of the first byte where `a` and `b` differ.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn miscompare(offset: usize) -> Fail {
    Fail::Check(Sense {
        info: Some(offset as u32),
        ..Sense::MISCOMPARE
    })
}

async fn verify<T: BlockTarget>(
    lu: &Lu<T>,
    g: &Geometry,
    cdb: &[u8; 16],
    data_out: &[u8],
) -> Res<Vec<u8>> {
    if cdb[1] & 0xe0 != 0 {
        return Err(Sense::INVALID_FIELD_IN_CDB.into()); // VRPROTECT
    }
    let bytchk = (cdb[1] >> 1) & 0x03;
    let (lba, blocks) = rw_fields(cdb);
    let (offset, len) = g.range(lba, blocks)?;
    if blocks > u64::from(g.max_transfer_blocks) {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    let mut medium = vec![0u8; len as usize];
    read_into(lu, offset, &mut medium).await?;
    match bytchk {
        0 => Ok(Vec::new()),
        1 => {
            let Some(data) = data_out.get(..len as usize) else {
                return Err(Sense::INVALID_FIELD_IN_CDB.into());
            };
            match first_difference(&medium, data) {
                Some(at) => Err(miscompare(at)),
                None => Ok(Vec::new()),
            }
        }
        3 => {
            let Some(block) = data_out.get(..g.block as usize) else {
                return Err(Sense::INVALID_FIELD_IN_CDB.into());
            };
            for (i, got) in medium.chunks(g.block as usize).enumerate() {
                if let Some(at) = first_difference(got, block) {
                    return Err(miscompare(i * g.block as usize + at));
                }
            }
            Ok(Vec::new())
        }
        _ => Err(Sense::INVALID_FIELD_IN_CDB.into()),
    }
}

async fn write_same<T: BlockTarget>(
    lu: &Lu<T>,
    g: &Geometry,
    cdb: &[u8; 16],
    data_out: &[u8],
) -> Res<Vec<u8>> {
    let flags = cdb[1];
    let unmap = flags & 0x08 != 0;
    let anchor = flags & 0x10 != 0;
    let ndob = cdb[0] == 0x93 && flags & 0x01 != 0;
    if flags & 0xe0 != 0 || anchor || (cdb[0] == 0x41 && flags & 0x01 != 0) {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    let (lba, blocks) = rw_fields(cdb);
    if blocks == 0 || blocks > MAX_WRITE_SAME_BLOCKS {
        // WSNZ=1 in the Block Limits page: zero blocks is not "to the end".
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    let (offset, len) = g.range(lba, blocks)?;
    let block: Vec<u8> = if ndob {
        vec![0; g.block as usize]
    } else if data_out.len() == g.block as usize {
        data_out.to_vec()
    } else {
        // Exactly one block of Data-Out, no more, no less.
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    };
    let zero = block.iter().all(|&b| b == 0);
    let _guard = lu.shared.locks.lock(lba, lba + blocks).await;
    let fua = !lu.shared.wce.get();
    if zero {
        let result = if unmap {
            lu.target.trim(offset, len).await
        } else {
            lu.target.write_zeroes(offset, len, fua).await
        };
        return result
            .map(|()| Vec::new())
            .map_err(|e| target_error(&e, true).into());
    }
    let per_chunk = (CHUNK_BYTES / block.len()).max(1);
    let pattern: Vec<u8> = block.repeat(per_chunk);
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(pattern.len() as u64) as usize;
        write_from(lu, offset + at, &pattern[..n], false).await?;
        at += n as u64;
    }
    Ok(Vec::new())
}

async fn unmap<T: BlockTarget>(
    lu: &Lu<T>,
    g: &Geometry,
    cdb: &[u8; 16],
    data_out: &[u8],
) -> Res<Vec<u8>> {
    if cdb[1] & 0x01 != 0 {
        return Err(Sense::INVALID_FIELD_IN_CDB.into()); // ANCHOR
    }
    let list_len = usize::from(be16(cdb, 7));
    if list_len == 0 {
        return Ok(Vec::new());
    }
    if list_len < 8 || data_out.len() < list_len {
        return Err(Sense::PARAMETER_LIST_LENGTH.into());
    }
    let params = &data_out[..list_len];
    let desc_len = usize::from(be16(params, 2));
    if desc_len % 16 != 0 || usize::from(be16(params, 0)) < 6 {
        return Err(Sense::PARAMETER_LIST_LENGTH.into());
    }
    let descriptors: Vec<&[u8]> = params[8..].chunks_exact(16).take(desc_len / 16).collect();
    if descriptors.len() as u32 > MAX_UNMAP_DESCRIPTORS {
        return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST.into());
    }
    let mut ranges = Vec::with_capacity(descriptors.len());
    for d in &descriptors {
        let lba = be64(d, 0);
        let blocks = be32(d, 8);
        if blocks > MAX_UNMAP_BLOCKS {
            return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST.into());
        }
        let (offset, len) = g.range(lba, u64::from(blocks))?;
        ranges.push((lba, u64::from(blocks), offset, len));
    }
    for (lba, blocks, offset, len) in ranges {
        if len == 0 {
            continue;
        }
        let _guard = lu.shared.locks.lock(lba, lba + blocks).await;
        lu.target
            .trim(offset, len)
            .await
            .map_err(|e| target_error(&e, true))?;
    }
    Ok(Vec::new())
}

async fn compare_and_write<T: BlockTarget>(
    lu: &Lu<T>,
    g: &Geometry,
    cdb: &[u8; 16],
    data_out: &[u8],
) -> Res<Vec<u8>> {
    if cdb[1] & 0xe0 != 0 {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    let lba = be64(cdb, 2);
    let blocks = cdb[13];
    if blocks > MAX_CAW_BLOCKS {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    let (offset, len) = g.range(lba, u64::from(blocks))?;
    let len = len as usize;
    if data_out.len() != 2 * len {
        // The Data-Out must be exactly the compare and the write blocks.
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    if blocks == 0 {
        return Ok(Vec::new());
    }
    let (compare, data) = data_out[..2 * len].split_at(len);
    let _guard = lu.shared.locks.lock(lba, lba + u64::from(blocks)).await;
    let mut medium = vec![0u8; len];
    read_into(lu, offset, &mut medium).await?;
    if let Some(at) = first_difference(&medium, compare) {
        return Err(miscompare(at));
    }
    let fua = cdb[1] & 0x08 != 0;
    write_from(lu, offset, data, fua).await?;
    Ok(Vec::new())
}

/// ORWRITE(16) without a change set: each block becomes medium OR data, atomically with
/// respect to other writes of the same blocks.
async fn or_write<T: BlockTarget>(
    lu: &Lu<T>,
    g: &Geometry,
    cdb: &[u8; 16],
    data_out: &[u8],
) -> Res<Vec<u8>> {
    if cdb[1] & 0xe0 != 0 {
        return Err(Sense::INVALID_FIELD_IN_CDB.into()); // ORPROTECT
    }
    let (lba, blocks) = rw_fields(cdb);
    let (offset, len) = g.range(lba, blocks)?;
    if blocks > u64::from(g.max_transfer_blocks) {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    let Some(data) = data_out.get(..len as usize) else {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    };
    if data.is_empty() {
        return Ok(Vec::new());
    }
    let _guard = lu.shared.locks.lock(lba, lba + blocks).await;
    let mut medium = vec![0u8; data.len()];
    read_into(lu, offset, &mut medium).await?;
    for (m, d) in medium.iter_mut().zip(data) {
        *m |= d;
    }
    write_from(lu, offset, &medium, cdb[1] & 0x08 != 0).await?;
    Ok(Vec::new())
}

async fn synchronize_cache<T: BlockTarget>(
    lu: &Lu<T>,
    g: &Geometry,
    cdb: &[u8; 16],
) -> Res<Vec<u8>> {
    let (lba, blocks) = rw_fields(cdb);
    g.range(lba, blocks)?;
    lu.target
        .flush()
        .await
        .map_err(|e| target_error(&e, true))?;
    Ok(Vec::new())
}

fn request_sense(cdb: &[u8; 16]) -> Res<Vec<u8>> {
    let alloc = usize::from(cdb[4]);
    let data = if cdb[1] & 0x01 != 0 {
        // Descriptor format, NO SENSE, no descriptors.
        vec![0x72, key::NO_SENSE, 0, 0, 0, 0, 0, 0]
    } else {
        Sense::new(key::NO_SENSE, 0, 0).fixed().to_vec()
    };
    Ok(truncate(data, alloc))
}

/// A stable 64-bit identifier derived from the export name (FNV-1a).
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

const VENDOR: &[u8; 8] = b"CAIRN   ";
const PRODUCT: &[u8; 16] = b"VDISK           ";
const REVISION: &[u8; 4] = b"0001";
const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2];

fn inquiry<T: BlockTarget>(lu: &Lu<T>, cdb: &[u8; 16], present: bool) -> Res<Vec<u8>> {
    let evpd = cdb[1] & 0x01 != 0;
    let page = cdb[2];
    let alloc = usize::from(be16(cdb, 3));
    if cdb[1] & 0x02 != 0 || (!evpd && page != 0) {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    let qualifier = if present { 0x00 } else { 0x7f };
    if !evpd {
        let mut d = vec![0u8; 96];
        d[0] = qualifier;
        d[2] = 0x06; // SPC-4
        d[3] = 0x12; // HISUP, response data format 2
        d[4] = (d.len() - 5) as u8;
        d[5] = 0x08; // 3PC=0, PROTECT=0; TPGS=0 ... bit 3 = 0x08 is the obsolete... keep ACC=0
        d[5] = 0x00;
        d[7] = 0x02; // CMDQUE
        d[8..16].copy_from_slice(VENDOR);
        d[16..32].copy_from_slice(PRODUCT);
        d[32..36].copy_from_slice(REVISION);
        // Version descriptors: SAM-5, iSCSI (RFC 7143), SPC-4, SBC-3.
        for (i, v) in [0x00a0u16, 0x0960, 0x0460, 0x04c0].iter().enumerate() {
            d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
        }
        return Ok(truncate(d, alloc));
    }
    if !present {
        return Err(Sense::LUN_NOT_SUPPORTED.into());
    }
    let g = Geometry::of(&*lu.target);
    let mut d = vec![qualifier, page, 0, 0];
    match page {
        0x00 => d.extend_from_slice(&VPD_PAGES),
        0x80 => d.extend_from_slice(format!("{:016x}", name_hash(&lu.name)).as_bytes()),
        0x83 => {
            // NAA IEEE Registered Extended (6): locally derived from the name.
            let h = name_hash(&lu.name);
            let mut naa = [0u8; 16];
            naa[0] = 0x60; // NAA 6, OUI 0x000000 (none registered) in the next 24 bits
            naa[3..11].copy_from_slice(&h.to_be_bytes());
            naa[11..16].copy_from_slice(&h.to_le_bytes()[..5]);
            d.extend_from_slice(&[0x01, 0x03, 0x00, 16]);
            d.extend_from_slice(&naa);
            // T10 vendor ID: vendor + the export name.
            let mut t10 = VENDOR.to_vec();
            t10.extend_from_slice(lu.name.as_bytes());
            t10.truncate(252);
            d.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
            d.extend_from_slice(&t10);
        }
        0xb0 => {
            let mut b = [0u8; 60];
            b[0] = 0x01; // WSNZ
            b[1] = MAX_CAW_BLOCKS;
            b[2..4].copy_from_slice(&(g.optimal_blocks.min(0xffff) as u16).to_be_bytes());
            b[4..8].copy_from_slice(&g.max_transfer_blocks.to_be_bytes());
            b[8..12].copy_from_slice(
                &g.optimal_blocks
                    .max(g.max_transfer_blocks / 4)
                    .to_be_bytes(),
            );
            b[16..20].copy_from_slice(&MAX_UNMAP_BLOCKS.to_be_bytes());
            b[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
            b[24..28].copy_from_slice(&g.optimal_blocks.to_be_bytes());
            b[32..40].copy_from_slice(&MAX_WRITE_SAME_BLOCKS.to_be_bytes());
            d.extend_from_slice(&b);
        }
        0xb1 => {
            let mut b = [0u8; 60];
            b[1] = 0x01; // non-rotating medium
            d.extend_from_slice(&b);
        }
        0xb2 => {
            // LBPU, LBPWS, LBPWS10, LBPRZ=1 (bits 4:2 = 001); provisioning type thin.
            d.extend_from_slice(&[0x00, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0x00]);
        }
        _ => return Err(Sense::INVALID_FIELD_IN_CDB.into()),
    }
    let len = (d.len() - 4) as u16;
    d[2..4].copy_from_slice(&len.to_be_bytes());
    Ok(truncate(d, alloc))
}

fn read_capacity10(g: &Geometry, cdb: &[u8; 16]) -> Res<Vec<u8>> {
    if cdb[8] & 0x01 != 0 || be32(cdb, 2) != 0 {
        // PMI is obsolete; an LBA without PMI is invalid.
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    let last = g.blocks.saturating_sub(1).min(0xffff_ffff) as u32;
    let mut d = last.to_be_bytes().to_vec();
    d.extend_from_slice(&g.block.to_be_bytes());
    Ok(d)
}

fn read_capacity16(g: &Geometry, cdb: &[u8; 16]) -> Res<Vec<u8>> {
    let alloc = be32(cdb, 10) as usize;
    let mut d = vec![0u8; 32];
    d[0..8].copy_from_slice(&g.blocks.saturating_sub(1).to_be_bytes());
    d[8..12].copy_from_slice(&g.block.to_be_bytes());
    d[13] = g.physical_exponent & 0x0f;
    d[14] = 0x80 | 0x40; // LBPME, LBPRZ
    Ok(truncate(d, alloc))
}

async fn get_lba_status<T: BlockTarget>(lu: &Lu<T>, g: &Geometry, cdb: &[u8; 16]) -> Res<Vec<u8>> {
    let lba = be64(cdb, 2);
    let alloc = be32(cdb, 10) as usize;
    if lba >= g.blocks {
        return Err(Sense::LBA_OUT_OF_RANGE.into());
    }
    let scan_blocks = (g.blocks - lba).min((CHUNK_BYTES / g.block as usize) as u64);
    let (offset, len) = g.range(lba, scan_blocks)?;
    let mut data = vec![0u8; len as usize];
    read_into(lu, offset, &mut data).await?;
    let mut runs: Vec<(u64, u32, u8)> = Vec::new();
    for (i, block) in data.chunks(g.block as usize).enumerate() {
        let state = u8::from(block.iter().all(|&b| b == 0));
        match runs.last_mut() {
            Some((_, n, s)) if *s == state => *n += 1,
            _ => runs.push((lba + i as u64, 1, state)),
        }
    }
    let mut d = vec![0u8; 8];
    for (start, n, state) in runs {
        d.extend_from_slice(&start.to_be_bytes());
        d.extend_from_slice(&n.to_be_bytes());
        d.extend_from_slice(&[state, 0, 0, 0]);
    }
    let len = (d.len() - 4) as u32;
    d[0..4].copy_from_slice(&len.to_be_bytes());
    Ok(truncate(d, alloc))
}

/// Caching mode page (0x08) for page control `pc`.
fn caching_page(lu_wce: bool, pc: u8) -> [u8; 20] {
    let mut p = [0u8; 20];
    p[0] = 0x08;
    p[1] = 0x12;
    p[2] = match pc {
        1 => 0x04, // changeable: WCE
        2 => 0x04, // default: WCE on
        _ => {
            if lu_wce {
                0x04
            } else {
                0x00
            }
        } // current
    };
    p
}

/// Control mode page (0x0A).
fn control_page(pc: u8) -> [u8; 12] {
    let mut p = [0u8; 12];
    p[0] = 0x0a;
    p[1] = 0x0a;
    if pc != 1 {
        p[3] = 0x10; // queue algorithm modifier: unrestricted reordering
        p[5] = 0x40; // TAS
        p[8..10].copy_from_slice(&0xffffu16.to_be_bytes()); // busy timeout: unlimited
    }
    p
}

/// Informational exceptions control mode page (0x1C): nothing enabled.
fn iec_page() -> [u8; 12] {
    let mut p = [0u8; 12];
    p[0] = 0x1c;
    p[1] = 0x0a;
    p
}

fn mode_sense<T: BlockTarget>(lu: &Lu<T>, g: &Geometry, cdb: &[u8; 16]) -> Res<Vec<u8>> {
    let ten = cdb[0] == 0x5a;
    let dbd = cdb[1] & 0x08 != 0;
    let llbaa = ten && cdb[1] & 0x10 != 0;
    let pc = cdb[2] >> 6;
    let page = cdb[2] & 0x3f;
    let subpage = cdb[3];
    let alloc = if ten {
        usize::from(be16(cdb, 7))
    } else {
        usize::from(cdb[4])
    };
    if pc == 3 {
        return Err(Sense::SAVING_NOT_SUPPORTED.into());
    }
    let wce = lu.shared.wce.get();
    let mut pages = Vec::new();
    match (page, subpage) {
        (0x08, 0) => pages.extend_from_slice(&caching_page(wce, pc)),
        (0x0a, 0) => pages.extend_from_slice(&control_page(pc)),
        (0x1c, 0) => pages.extend_from_slice(&iec_page()),
        (0x3f, 0 | 0xff) => {
            pages.extend_from_slice(&caching_page(wce, pc));
            pages.extend_from_slice(&control_page(pc));
            pages.extend_from_slice(&iec_page());
        }
        _ => return Err(Sense::INVALID_FIELD_IN_CDB.into()),
    }
    let mut descriptor = Vec::new();
    if !dbd {
        if llbaa {
            descriptor.extend_from_slice(&g.blocks.to_be_bytes());
            descriptor.extend_from_slice(&[0, 0, 0, 0]);
            descriptor.extend_from_slice(&g.block.to_be_bytes());
        } else {
            let blocks = g.blocks.min(0xff_ffff) as u32;
            descriptor.push(0);
            descriptor.extend_from_slice(&blocks.to_be_bytes()[1..4]);
            descriptor.push(0);
            descriptor.extend_from_slice(&g.block.to_be_bytes()[1..4]);
        }
    }
    let device_specific = 0x10; // DPOFUA
    let mut d = Vec::new();
    if ten {
        let len = (6 + descriptor.len() + pages.len()) as u16;
        d.extend_from_slice(&len.to_be_bytes());
        d.extend_from_slice(&[0, device_specific, u8::from(llbaa), 0]);
        d.extend_from_slice(&(descriptor.len() as u16).to_be_bytes());
    } else {
        let len = 3 + descriptor.len() + pages.len();
        d.extend_from_slice(&[
            len.min(255) as u8,
            0,
            device_specific,
            descriptor.len() as u8,
        ]);
    }
    d.extend_from_slice(&descriptor);
    d.extend_from_slice(&pages);
    Ok(truncate(d, alloc))
}

fn mode_select<T>(lu: &Lu<T>, nexus: &Nexus, cdb: &[u8; 16], data_out: &[u8]) -> Res<Vec<u8>> {
    let ten = cdb[0] == 0x55;
    if cdb[1] & 0x01 != 0 {
        return Err(Sense::SAVING_NOT_SUPPORTED.into()); // SP
    }
    let len = if ten {
        usize::from(be16(cdb, 7))
    } else {
        usize::from(cdb[4])
    };
    if len == 0 {
        return Ok(Vec::new());
    }
    let Some(params) = data_out.get(..len) else {
        return Err(Sense::PARAMETER_LIST_LENGTH.into());
    };
    let (header, bd_len) = if ten {
        if params.len() < 8 {
            return Err(Sense::PARAMETER_LIST_LENGTH.into());
        }
        (8, usize::from(be16(params, 6)))
    } else {
        if params.len() < 4 {
            return Err(Sense::PARAMETER_LIST_LENGTH.into());
        }
        (4, usize::from(params[3]))
    };
    let Some(mut pages) = params.get(header + bd_len..) else {
        return Err(Sense::PARAMETER_LIST_LENGTH.into());
    };
    let mut new_wce = lu.shared.wce.get();
    while !pages.is_empty() {
        if pages.len() < 2 {
            return Err(Sense::PARAMETER_LIST_LENGTH.into());
        }
        let code = pages[0] & 0x3f;
        if pages[0] & 0x40 != 0 {
            return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST.into()); // subpages
        }
        let plen = 2 + usize::from(pages[1]);
        let Some(page) = pages.get(..plen) else {
            return Err(Sense::PARAMETER_LIST_LENGTH.into());
        };
        match code {
            0x08 if plen == 20 => {
                let current = caching_page(new_wce, 0);
                // Only WCE may change.
                if page[2] & !0x04 != current[2] & !0x04 || page[3..] != current[3..] {
                    return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST.into());
                }
                new_wce = page[2] & 0x04 != 0;
            }
            0x0a if plen == 12 => {
                if page[2..] != control_page(0)[2..] {
                    return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST.into());
                }
            }
            0x1c if plen == 12 => {
                if page[2..] != iec_page()[2..] {
                    return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST.into());
                }
            }
            _ => return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST.into()),
        }
        pages = &pages[plen..];
    }
    if lu.shared.wce.replace(new_wce) != new_wce {
        // The caching page is shared by every I_T nexus: the others are told (SPC-5 6.15).
        lu.shared
            .raise_all(Some(nexus), Sense::MODE_PARAMETERS_CHANGED);
    }
    Ok(Vec::new())
}

fn report_luns(cdb: &[u8; 16]) -> Res<Vec<u8>> {
    let alloc = be32(cdb, 6) as usize;
    if alloc < 16 || cdb[2] > 2 {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    let mut d = vec![0u8; 16];
    d[3] = 8;
    Ok(truncate(d, alloc))
}

fn usage_bitmap(opcode: u8, len: u8, sa: Option<u16>) -> Vec<u8> {
    let mut u = vec![0xffu8; usize::from(len)];
    u[0] = opcode;
    if let Some(sa) = sa {
        u[1] = 0xe0 | sa as u8;
    }
    *u.last_mut().expect("CDBs are 6+ bytes") = 0x07;
    u
}

fn report_supported_opcodes(cdb: &[u8; 16]) -> Res<Vec<u8>> {
    let rctd = cdb[2] & 0x80 != 0;
    let options = cdb[2] & 0x07;
    let req_op = cdb[3];
    let req_sa = be16(cdb, 4);
    let alloc = be32(cdb, 6) as usize;
    let timeouts = [0u8, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let mut d = Vec::new();
    match options {
        0 => {
            d.extend_from_slice(&[0; 4]);
            for &(op, sa, len, _) in COMMANDS {
                let flags = u8::from(sa.is_some()) | if rctd { 0x02 } else { 0 };
                let sa = sa.unwrap_or(0).to_be_bytes();
                d.extend_from_slice(&[op, 0, sa[0], sa[1], 0, flags, 0, len]);
                if rctd {
                    d.extend_from_slice(&timeouts);
                }
            }
            let len = (d.len() - 4) as u32;
            d[0..4].copy_from_slice(&len.to_be_bytes());
        }
        1..=3 => {
            let entry = COMMANDS.iter().find(|(op, sa, _, _)| {
                *op == req_op
                    && match options {
                        1 => sa.is_none(),
                        2 => *sa == Some(req_sa),
                        _ => sa.is_none_or(|s| s == req_sa),
                    }
            });
            if options == 1
                && COMMANDS
                    .iter()
                    .any(|(op, sa, _, _)| *op == req_op && sa.is_some())
            {
                return Err(Sense::INVALID_FIELD_IN_CDB.into());
            }
            if options == 2
                && COMMANDS
                    .iter()
                    .any(|(op, sa, _, _)| *op == req_op && sa.is_none())
            {
                return Err(Sense::INVALID_FIELD_IN_CDB.into());
            }
            match entry {
                Some(&(op, sa, len, _)) => {
                    let ctdp = if rctd { 0x80 } else { 0 };
                    d.extend_from_slice(&[0, ctdp | 0x03]);
                    d.extend_from_slice(&u16::from(len).to_be_bytes());
                    d.extend_from_slice(&usage_bitmap(op, len, sa));
                    if rctd {
                        d.extend_from_slice(&timeouts);
                    }
                }
                None => d.extend_from_slice(&[0, 0x01, 0, 0]),
            }
        }
        _ => return Err(Sense::INVALID_FIELD_IN_CDB.into()),
    }
    Ok(truncate(d, alloc))
}

fn persistent_reserve_in<T>(lu: &Lu<T>, cdb: &[u8; 16]) -> Res<Vec<u8>> {
    let alloc = usize::from(be16(cdb, 7));
    let pr = lu.shared.pr.borrow();
    let mut d = pr.generation.to_be_bytes().to_vec();
    match service_action(cdb) {
        0 => {
            let keys: Vec<u8> = pr
                .registrations
                .iter()
                .flat_map(|(_, k)| k.to_be_bytes())
                .collect();
            d.extend_from_slice(&(keys.len() as u32).to_be_bytes());
            d.extend_from_slice(&keys);
        }
        1 => match &pr.reservation {
            None => d.extend_from_slice(&[0; 4]),
            Some((holder, t)) => {
                let key = if all_registrants(*t) {
                    0
                } else {
                    pr.key_of(holder).unwrap_or(0)
                };
                d.extend_from_slice(&16u32.to_be_bytes());
                d.extend_from_slice(&key.to_be_bytes());
                d.extend_from_slice(&[0, 0, 0, 0, 0, *t & 0x0f, 0, 0]);
            }
        },
        2 => {
            // CRH=0 SIP_C=0 ATP_C=0 PTPL_C=1; TMV, PTPL_A; types WE, EA, WERO, EARO, WEAR,
            // EAAR.
            d = vec![0, 8, 0x01, 0x80 | u8::from(pr.aptpl), 0xea, 0x01, 0, 0];
        }
        3 => {
            let mut body = Vec::new();
            for (nexus, key) in &pr.registrations {
                let tid = nexus.transport_id();
                let mut e = key.to_be_bytes().to_vec();
                e.extend_from_slice(&[0; 4]);
                let holder = pr.is_holder(nexus);
                e.push(u8::from(holder));
                e.push(match (&pr.reservation, holder) {
                    (Some((_, t)), true) => *t & 0x0f,
                    _ => 0,
                });
                e.extend_from_slice(&[0; 4]);
                e.extend_from_slice(&1u16.to_be_bytes()); // relative target port
                e.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                e.extend_from_slice(&tid);
                body.extend_from_slice(&e);
            }
            d.extend_from_slice(&(body.len() as u32).to_be_bytes());
            d.extend_from_slice(&body);
        }
        _ => return Err(Sense::INVALID_FIELD_IN_CDB.into()),
    }
    Ok(truncate(d, alloc))
}

/// PERSISTENT RESERVE OUT: the change is computed on a copy of the state, saved to the unit's
/// reservation store, and only then applied (one command at a time per unit).
///
/// The state is saved whatever the APTPL bit says. SPC-5 5.14.5 lets reservations registered
/// with APTPL=0 go at a loss of power in the target, but a Cairn logical unit does not lose
/// power when a node does: another node takes the vdisk over, and cluster software counts on
/// its reservations still being there. So APTPL=1 is accepted (PTPL_C=1, reported back as
/// PTPL_A) and APTPL=0 keeps the state too.
async fn persistent_reserve_out<T>(
    lu: &Lu<T>,
    nexus: &Nexus,
    cdb: &[u8; 16],
    data_out: &[u8],
) -> Res<Vec<u8>> {
    let _g = lu.shared.pr_lock.lock().await;
    let mut next = lu.shared.pr.borrow().clone();
    let mut attentions = Vec::new();
    let out = pr_out_apply(&mut next, nexus, cdb, data_out, &mut attentions)?;
    if next != *lu.shared.pr.borrow() {
        let store = lu.shared.pr_store.borrow().clone();
        if let Some(store) = store
            && store.save(next.encode()).await.is_err()
        {
            return Err(Sense::INTERNAL_TARGET_FAILURE.into());
        }
        *lu.shared.pr.borrow_mut() = next;
    }
    for (n, sense) in &attentions {
        lu.shared.raise(n, *sense);
    }
    Ok(out)
}

/// Applies a PERSISTENT RESERVE OUT to `pr`, adding to `attentions` the unit attentions it
/// establishes for other I_T nexuses (SPC-5 5.14.11): REGISTRATIONS PREEMPTED for each
/// registration a PREEMPT removes, RESERVATIONS PREEMPTED for every registration a CLEAR
/// removes, and RESERVATIONS RELEASED for the remaining registrants when a registrants-only or
/// all-registrants reservation is released (RELEASE, or its holder unregistering) or a PREEMPT
/// changes its type.
fn pr_out_apply(
    pr: &mut PrState,
    nexus: &Nexus,
    cdb: &[u8; 16],
    data_out: &[u8],
    attentions: &mut Vec<(Nexus, Sense)>,
) -> Res<Vec<u8>> {
    let sa = service_action(cdb);
    let scope = cdb[2] >> 4;
    let rtype = cdb[2] & 0x0f;
    let len = be32(cdb, 5) as usize;
    if len != 24 {
        return Err(Sense::PARAMETER_LIST_LENGTH.into());
    }
    let Some(p) = data_out.get(..24) else {
        return Err(Sense::PARAMETER_LIST_LENGTH.into());
    };
    let key = be64(p, 0);
    let sa_key = be64(p, 8);
    let flags = p[20];
    if flags & (0x08 | 0x04) != 0 {
        // SPEC_I_PT and ALL_TG_PT are not supported (capabilities say so).
        return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST.into());
    }
    // APTPL counts only with a REGISTER (SPC-5 6.17.3), and the last one received applies.
    let aptpl = flags & 0x01 != 0;
    let valid_type = matches!(rtype, 1 | 3 | 5 | 6 | 7 | 8);
    let registered = pr.key_of(nexus);
    match sa {
        0 | 6 => {
            if sa == 0 && registered.unwrap_or(0) != key {
                return Err(Fail::Conflict);
            }
            pr.aptpl = aptpl;
            match (registered, sa_key) {
                (None, 0) => {}
                (None, k) => pr.registrations.push((nexus.clone(), k)),
                (Some(_), 0) => {
                    let held = pr.reservation.clone();
                    pr.unregister(nexus);
                    if let Some((_, t)) = held
                        && pr.reservation.is_none()
                        && registrants_only(t)
                    {
                        released(pr, nexus, attentions);
                    }
                }
                (Some(_), k) => {
                    for (n, old) in pr.registrations.iter_mut() {
                        if n == nexus {
                            *old = k;
                        }
                    }
                }
            }
            pr.generation = pr.generation.wrapping_add(1);
        }
        1 => {
            if registered != Some(key) {
                return Err(Fail::Conflict);
            }
            if scope != 0 || !valid_type {
                return Err(Sense::INVALID_FIELD_IN_CDB.into());
            }
            match &pr.reservation {
                None => pr.reservation = Some((nexus.clone(), rtype)),
                Some((_, t)) if pr.is_holder(nexus) && *t == rtype => {}
                Some(_) => return Err(Fail::Conflict),
            }
        }
        2 => {
            if registered != Some(key) {
                return Err(Fail::Conflict);
            }
            if let Some((_, t)) = &pr.reservation
                && pr.is_holder(nexus)
            {
                if *t != rtype || scope != 0 {
                    return Err(Sense::INVALID_RELEASE.into());
                }
                let t = *t;
                pr.reservation = None;
                if registrants_only(t) || all_registrants(t) {
                    released(pr, nexus, attentions);
                }
            }
        }
        3 => {
            if registered != Some(key) {
                return Err(Fail::Conflict);
            }
            for (n, _) in pr.registrations.drain(..) {
                if n != *nexus {
                    attentions.push((n, Sense::RESERVATIONS_PREEMPTED));
                }
            }
            pr.reservation = None;
            pr.generation = pr.generation.wrapping_add(1);
        }
        4 | 5 => {
            if registered != Some(key) {
                return Err(Fail::Conflict);
            }
            if scope != 0 || !valid_type {
                return Err(Sense::INVALID_FIELD_IN_CDB.into());
            }
            let reservation = pr.reservation.clone();
            match reservation {
                Some((_, t)) if all_registrants(t) => {
                    if sa_key == 0 {
                        preempt(pr, nexus, |_| true, attentions);
                        pr.reservation = Some((nexus.clone(), rtype));
                    } else if preempt(pr, nexus, |k| k == sa_key, attentions) == 0 {
                        return Err(Fail::Conflict);
                    }
                }
                Some((holder, t)) => {
                    let holder_key = pr.key_of(&holder).unwrap_or(0);
                    if sa_key == 0 {
                        return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST.into());
                    }
                    let removed = preempt(pr, nexus, |k| k == sa_key, attentions);
                    if holder_key == sa_key {
                        pr.reservation = Some((nexus.clone(), rtype));
                        if t != rtype {
                            released(pr, nexus, attentions);
                        }
                    } else if removed == 0 {
                        return Err(Fail::Conflict);
                    }
                }
                None => {
                    if sa_key == 0 {
                        return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST.into());
                    }
                    if preempt(pr, nexus, |k| k == sa_key, attentions) == 0 {
                        return Err(Fail::Conflict);
                    }
                }
            }
            pr.generation = pr.generation.wrapping_add(1);
        }
        _ => return Err(Sense::INVALID_FIELD_IN_CDB.into()),
    }
    Ok(Vec::new())
}

/// Removes the registrations of other I_T nexuses whose key `matches`, each told REGISTRATIONS
/// PREEMPTED; returns how many were removed.
fn preempt(
    pr: &mut PrState,
    nexus: &Nexus,
    matches: impl Fn(u64) -> bool,
    attentions: &mut Vec<(Nexus, Sense)>,
) -> usize {
    let before = pr.registrations.len();
    pr.registrations.retain(|(n, k)| {
        let removed = n != nexus && matches(*k);
        if removed {
            attentions.push((n.clone(), Sense::REGISTRATIONS_PREEMPTED));
        }
        !removed
    });
    before - pr.registrations.len()
}

/// Tells every registrant but `nexus` that the reservation they shared was released.
fn released(pr: &PrState, nexus: &Nexus, attentions: &mut Vec<(Nexus, Sense)>) {
    for (n, _) in &pr.registrations {
        if n != nexus {
            attentions.push((n.clone(), Sense::RESERVATIONS_RELEASED));
        }
    }
}

fn reserve6<T>(lu: &Lu<T>, nexus: &Nexus) -> Res<Vec<u8>> {
    let pr = lu.shared.pr.borrow();
    if pr.reservation.is_some() && !pr.is_holder(nexus) {
        return Err(Fail::Conflict);
    }
    let mut r = lu.shared.reserve6.borrow_mut();
    match r.as_ref() {
        Some(holder) if holder != nexus => Err(Fail::Conflict),
        _ => {
            *r = Some(nexus.clone());
            Ok(Vec::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem(RefCell<Vec<u8>>);

    impl BlockTarget for Mem {
        fn size_bytes(&self) -> u64 {
            self.0.borrow().len() as u64
        }
        async fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), TargetError> {
            let o = offset as usize;
            out.copy_from_slice(&self.0.borrow()[o..o + out.len()]);
            Ok(())
        }
        async fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), TargetError> {
            let o = offset as usize;
            self.0.borrow_mut()[o..o + data.len()].copy_from_slice(data);
            Ok(())
        }
        async fn flush(&self) -> Result<(), TargetError> {
            Ok(())
        }
        async fn trim(&self, offset: u64, len: u64) -> Result<(), TargetError> {
            self.0.borrow_mut()[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
        async fn write_zeroes(&self, o: u64, len: u64, _fua: bool) -> Result<(), TargetError> {
            self.trim(o, len).await
        }
    }

    fn lu() -> Lu<Mem> {
        Lu {
            target: Rc::new(Mem(RefCell::new(vec![0; 1 << 20]))),
            shared: Rc::default(),
            name: "vd0".into(),
        }
    }

    fn cdb(bytes: &[u8]) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..bytes.len()].copy_from_slice(bytes);
        c
    }

    fn run(lu: &Lu<Mem>, n: &Nexus, c: &[u8], data: &[u8]) -> Outcome {
        pollster::block_on(execute(lu, n, 0, &cdb(c), data))
    }

    #[test]
    fn write_read_and_errors() {
        let lu = lu();
        let n = Nexus::new("i", &[0; 6]);
        let block = vec![0xabu8; 512];
        let w = run(&lu, &n, &[0x2a, 0, 0, 0, 0, 5, 0, 0, 1, 0], &block);
        assert_eq!(w.status, status::GOOD);
        let r = run(&lu, &n, &[0x28, 0, 0, 0, 0, 5, 0, 0, 1, 0], &[]);
        assert_eq!(r.data, block);
        let beyond = run(&lu, &n, &[0x28, 0, 0, 0, 0x08, 0, 0, 0, 1, 0], &[]);
        assert_eq!(beyond.sense, Some(Sense::LBA_OUT_OF_RANGE));
        let bad = run(&lu, &n, &[0xee], &[]);
        assert_eq!(bad.sense, Some(Sense::INVALID_OPCODE));
        assert_eq!(bad.status, status::CHECK_CONDITION);
        let fixed = Sense::LBA_OUT_OF_RANGE.fixed();
        assert_eq!((fixed[0], fixed[2], fixed[12]), (0x70, 5, 0x21));
    }

    #[test]
    fn reservation_state_round_trips_and_damage_is_refused() {
        let a = Nexus::new("iqn.a", &[1, 2, 3, 4, 5, 6]);
        let b = Nexus::new("iqn.b", &[0; 6]);
        let state = PrState {
            generation: 7,
            registrations: vec![(a.clone(), 0xA), (b, 0xB)],
            reservation: Some((a, pr_type::EXCLUSIVE_ACCESS)),
            aptpl: true,
        };
        let bytes = state.encode();
        assert_eq!(PrState::decode(&bytes), Ok(state.clone()));
        // A version 1 record (no APTPL byte) still reads, as APTPL=0.
        let mut v1 = bytes[..bytes.len() - 5].to_vec();
        v1[0] = 1;
        let crc = crc32c::crc32c(&v1);
        v1.extend_from_slice(&crc.to_le_bytes());
        let old = PrDecodeError::Version(3);
        assert_eq!(
            PrState::decode(&v1),
            Ok(PrState {
                aptpl: false,
                ..state.clone()
            })
        );
        let mut v3 = bytes.clone();
        v3[0] = 3;
        let body = v3.len() - 4;
        let crc = crc32c::crc32c(&v3[..body]);
        v3[body..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(PrState::decode(&v3), Err(old));
        assert_eq!(
            PrState::decode(&PrState::default().encode()),
            Ok(PrState::default())
        );
        for cut in 0..bytes.len() {
            assert!(PrState::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut flipped = bytes.clone();
        flipped[9] ^= 1;
        assert_eq!(PrState::decode(&flipped), Err(PrDecodeError::Checksum));
    }

    #[test]
    fn a_grown_unit_raises_capacity_data_has_changed_once_per_nexus() {
        let lu = lu();
        let a = Nexus::new("a", &[0; 6]);
        let b = Nexus::new("b", &[0; 6]);
        lu.shared.nexus_added(&a);
        lu.shared.nexus_added(&b);
        let tur = [0x00];
        assert_eq!(run(&lu, &a, &tur, &[]).status, status::GOOD);
        lu.target.0.borrow_mut().resize(2 << 20, 0);
        for n in [&a, &b] {
            assert_eq!(run(&lu, n, &tur, &[]).sense, Some(Sense::CAPACITY_CHANGED));
            assert_eq!(run(&lu, n, &tur, &[]).status, status::GOOD);
        }
        // READ CAPACITY(16) reports the new size: 4096 blocks of 512 bytes, last LBA 4095.
        let rc = run(
            &lu,
            &a,
            &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
            &[],
        );
        assert_eq!(&rc.data[..8], &4095u64.to_be_bytes());
    }

    #[test]
    fn compare_and_write_miscompares() {
        let lu = lu();
        let n = Nexus::new("i", &[0; 6]);
        let mut data = vec![0u8; 512];
        data.extend_from_slice(&[7u8; 512]);
        let c = [0x89, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0];
        assert_eq!(run(&lu, &n, &c, &data).status, status::GOOD);
        let again = run(&lu, &n, &c, &data);
        assert_eq!(again.sense.map(|s| s.key), Some(key::MISCOMPARE));
        assert_eq!(again.sense.unwrap().info, Some(0));
    }

    #[test]
    fn persistent_reservations_conflict_across_nexuses() {
        let lu = lu();
        let a = Nexus::new("a", &[0; 6]);
        let b = Nexus::new("b", &[0; 6]);
        let params = |key: u64, sa_key: u64| {
            let mut p = vec![0u8; 24];
            p[0..8].copy_from_slice(&key.to_be_bytes());
            p[8..16].copy_from_slice(&sa_key.to_be_bytes());
            p
        };
        let prout = |sa: u8, t: u8| [0x5f, sa, t, 0, 0, 0, 0, 0, 24, 0];
        assert_eq!(run(&lu, &a, &prout(0, 0), &params(0, 1)).status, 0);
        assert_eq!(run(&lu, &b, &prout(0, 0), &params(0, 2)).status, 0);
        // Exclusive access by a: b can neither read nor write.
        assert_eq!(run(&lu, &a, &prout(1, 3), &params(1, 0)).status, 0);
        let read = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        assert_eq!(
            run(&lu, &b, &read, &[]).status,
            status::RESERVATION_CONFLICT
        );
        assert_eq!(run(&lu, &a, &read, &[]).status, status::GOOD);
        // b preempts a.
        assert_eq!(run(&lu, &b, &prout(4, 1), &params(2, 1)).status, 0);
        assert_eq!(run(&lu, &a, &read, &[]).status, status::GOOD);
        let write = [0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        assert_eq!(
            run(&lu, &a, &write, &[0; 512]).status,
            status::RESERVATION_CONFLICT
        );
        let keys = run(&lu, &a, &[0x5e, 0, 0, 0, 0, 0, 0, 1, 0, 0], &[]);
        assert_eq!(&keys.data[4..8], &8u32.to_be_bytes());
        assert_eq!(&keys.data[8..16], &2u64.to_be_bytes());
    }

    #[test]
    fn reservation_changes_raise_unit_attentions_on_other_nexuses() {
        let lu = lu();
        let [a, b, c] = ["a", "b", "c"].map(|n| Nexus::new(n, &[0; 6]));
        for n in [&a, &b, &c] {
            lu.shared.nexus_added(n);
        }
        let params = |key: u64, sa_key: u64| {
            let mut p = vec![0u8; 24];
            p[0..8].copy_from_slice(&key.to_be_bytes());
            p[8..16].copy_from_slice(&sa_key.to_be_bytes());
            p
        };
        let prout = |sa: u8, t: u8| [0x5f, sa, t, 0, 0, 0, 0, 0, 24, 0];
        let tur = [0u8; 6];
        // The unit attention a nexus gets on its next command (then GOOD again), if any.
        let attention = |n: &Nexus| {
            let first = run(&lu, n, &tur, &[]);
            if first.status == status::GOOD {
                return None;
            }
            assert_eq!(run(&lu, n, &tur, &[]).status, status::GOOD, "reported once");
            first.sense
        };
        for (n, key) in [(&a, 1), (&b, 2), (&c, 3)] {
            assert_eq!(run(&lu, n, &prout(0, 0), &params(0, key)).status, 0);
        }
        // Write Exclusive - Registrants Only, held by a, released: b and c are told.
        assert_eq!(run(&lu, &a, &prout(1, 5), &params(1, 0)).status, 0);
        assert_eq!(run(&lu, &a, &prout(2, 5), &params(1, 0)).status, 0);
        assert_eq!(attention(&a), None);
        assert_eq!(attention(&b), Some(Sense::RESERVATIONS_RELEASED));
        assert_eq!(attention(&c), Some(Sense::RESERVATIONS_RELEASED));
        // Exclusive Access by a, preempted by b as Write Exclusive: a loses its registration,
        // c keeps its own but the reservation changed type.
        assert_eq!(run(&lu, &a, &prout(1, 3), &params(1, 0)).status, 0);
        assert_eq!(run(&lu, &b, &prout(4, 1), &params(2, 1)).status, 0);
        assert_eq!(attention(&a), Some(Sense::REGISTRATIONS_PREEMPTED));
        assert_eq!(attention(&b), None);
        assert_eq!(attention(&c), Some(Sense::RESERVATIONS_RELEASED));
        // A plain Write Exclusive released: nobody else is told.
        assert_eq!(run(&lu, &b, &prout(2, 1), &params(2, 0)).status, 0);
        assert_eq!(attention(&c), None);
        // A registrants-only holder unregistering ends the reservation for the others.
        assert_eq!(run(&lu, &b, &prout(1, 6), &params(2, 0)).status, 0);
        assert_eq!(run(&lu, &b, &prout(0, 0), &params(2, 0)).status, 0);
        assert_eq!(attention(&c), Some(Sense::RESERVATIONS_RELEASED));
        // CLEAR by c: everyone else registered is told, and only while connected.
        assert_eq!(run(&lu, &a, &prout(0, 0), &params(0, 1)).status, 0);
        assert_eq!(run(&lu, &b, &prout(0, 0), &params(0, 2)).status, 0);
        lu.shared.nexus_lost(&b);
        assert_eq!(run(&lu, &c, &prout(3, 0), &params(3, 0)).status, 0);
        assert_eq!(attention(&a), Some(Sense::RESERVATIONS_PREEMPTED));
        assert_eq!(attention(&c), None);
        assert!(lu.shared.unit_attentions.borrow().is_empty());
        // APTPL with a REGISTER is kept and reported (PTPL_C, PTPL_A); the last one counts.
        let caps = |lu: &Lu<Mem>| run(lu, &a, &[0x5e, 2, 0, 0, 0, 0, 0, 0, 8, 0], &[]).data;
        assert_eq!(caps(&lu)[2..4], [0x01, 0x80]);
        let mut aptpl = params(0, 0x11);
        aptpl[20] = 0x01;
        assert_eq!(run(&lu, &a, &prout(0, 0), &aptpl).status, 0);
        assert_eq!(caps(&lu)[2..4], [0x01, 0x81]);
        assert_eq!(run(&lu, &a, &prout(6, 0), &params(0, 0x12)).status, 0);
        assert_eq!(caps(&lu)[2..4], [0x01, 0x80]);
        // SPEC_I_PT is still refused.
        let mut spec = params(0x12, 0x13);
        spec[20] = 0x08;
        assert_eq!(
            run(&lu, &a, &prout(0, 0), &spec).sense,
            Some(Sense::INVALID_FIELD_IN_PARAMETER_LIST)
        );
        // A changed caching page is news to every other nexus.
        let mut caching = vec![0u8; 4 + 20];
        caching[4..24].copy_from_slice(&caching_page(false, 0));
        let select = [0x15, 0x10, 0, 0, 24, 0];
        assert_eq!(run(&lu, &c, &select, &caching).status, status::GOOD);
        assert_eq!(attention(&a), Some(Sense::MODE_PARAMETERS_CHANGED));
        assert_eq!(attention(&c), None);
        // Setting it to what it already is changes nothing.
        assert_eq!(run(&lu, &c, &select, &caching).status, status::GOOD);
        assert_eq!(attention(&a), None);
    }
}
