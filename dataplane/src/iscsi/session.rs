//! One iSCSI connection (= one session: MaxConnections=1, ErrorRecoveryLevel=0): login, then
//! the full feature phase.
//!
//! ```text
//!  socket ──► reader ─┬─ SCSI command (all data in) ──► task (spawned) ──► writer ──► socket
//!                     ├─ Data-Out: fill the task's buffer, next R2T ───────►  ▲
//!                     ├─ NOP-Out, Text, Reject ────────────────────────────────┤
//!                     └─ TMF / Logout: a task that waits for the tasks concerned ┘
//! ```
//!
//! * The **reader** parses each PDU, enforces the CmdSN window (non-immediate commands must
//!   carry ExpCmdSN; others outside the window are dropped silently as RFC 7143 §4.2.2.1 asks),
//!   and for a write collects immediate data, unsolicited Data-Out (FirstBurstLength, when
//!   InitialR2T=No) and solicited Data-Out, sending one R2T (MaxOutstandingR2T=1) of at most
//!   MaxBurstLength at a time. Only when all data is in does the command run.
//! * Write data is held within a per-connection budget ([`IscsiConfig::write_buffer_bytes`]):
//!   a write that needs R2Ts gets its buffer and its first R2T only when the bytes it will
//!   hold fit (first come, first served; one write alone always fits), so an initiator cannot
//!   make the target buffer 128 commands x 64 MiB. Immediate and unsolicited data are bounded
//!   by FirstBurstLength per command.
//! * Each SCSI command runs as its own task on the executor, so commands overlap (queue depth
//!   [`QUEUE_DEPTH`]: MaxCmdSN = ExpCmdSN + depth - 1 - commands in flight, which is the
//!   back-pressure: an initiator may not send past MaxCmdSN).
//! * The **writer** owns StatSN: it stamps StatSN/ExpCmdSN/MaxCmdSN into each PDU as it sends,
//!   splits read data into Data-In PDUs of the initiator's MaxRecvDataSegmentLength (status in
//!   the final Data-In when the command succeeded, with residuals), and adds digests.
//! * Task management marks tasks aborted (their responses are never sent), waits for running
//!   ones to finish, then answers; Logout waits for every task before its response.
//!
//! A malformed PDU gets a Reject (unknown opcode, SNACK at ERL 0, bad fields) or, when the
//! stream cannot be trusted any more (digest error, oversized segment), ends the connection.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::rc::Rc;

use futures_lite::future;
use futures_lite::io::{AsyncRead, AsyncWrite};

use super::login::{self, Negotiation, SessionParams, SessionType, TargetDirectory};
use super::pdu::{self, BHS_LEN, Kind, LoginHeader, RESERVED_TAG, op, reject};
use super::scsi::{self, Lu, Nexus, Outcome};
use super::server::{ConnError, IscsiConfig, Registry};
use crate::nbd::Shutdown;
use crate::nbd::io::{LocalQueue, SharedStream};
use crate::target::{BlockTarget, Exports};

/// Commands accepted per session before MaxCmdSN stops the initiator.
pub const QUEUE_DEPTH: u32 = 128;
/// Largest Expected Data Transfer Length of a write we buffer.
pub const MAX_WRITE_BYTES: u32 = 64 << 20;
/// Largest data segment accepted during login (the RFC default MaxRecvDataSegmentLength).
const LOGIN_MAX_DATA: u32 = 8192;
/// Largest text (Login/Text keys over continuation PDUs) we accumulate.
const MAX_TEXT_BYTES: usize = 64 << 10;

/// A PDU as read: header and data segment (without padding and digests).
struct Pdu {
    bhs: [u8; BHS_LEN],
    data: Vec<u8>,
}

/// Reads one PDU; `None` on a clean end of stream between PDUs.
async fn read_pdu<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &SharedStream<S>,
    header_digest: bool,
    data_digest: bool,
    max_data: u32,
) -> Result<Option<Pdu>, ConnError> {
    let mut bhs = [0u8; BHS_LEN];
    if !stream
        .read_exact_or_eof(&mut bhs)
        .await
        .map_err(ConnError::Io)?
    {
        return Ok(None);
    }
    let ahs_len = usize::from(bhs[4]) * 4;
    let mut ahs = vec![0u8; ahs_len];
    stream.read_exact(&mut ahs).await.map_err(ConnError::Io)?;
    if header_digest {
        let mut d = [0u8; 4];
        stream.read_exact(&mut d).await.map_err(ConnError::Io)?;
        if d != pdu::digest(&[&bhs, &ahs]) {
            return Err(ConnError::HeaderDigest);
        }
    }
    let data_len = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]);
    if data_len > max_data {
        return Err(ConnError::DataTooLong {
            len: data_len,
            limit: max_data,
        });
    }
    let padded = data_len as usize + pdu::pad_len(data_len as usize);
    let mut data = vec![0u8; padded];
    stream.read_exact(&mut data).await.map_err(ConnError::Io)?;
    if data_digest && data_len > 0 {
        let mut d = [0u8; 4];
        stream.read_exact(&mut d).await.map_err(ConnError::Io)?;
        if d != pdu::digest(&[&data]) {
            return Err(ConnError::DataDigest);
        }
    }
    data.truncate(data_len as usize);
    Ok(Some(Pdu { bhs, data }))
}

/// Appends a PDU (header, optional digests, padded data) to `out`.
fn encode_pdu(out: &mut Vec<u8>, bhs: &[u8; BHS_LEN], data: &[u8], hd: bool, dd: bool) {
    out.extend_from_slice(bhs);
    if hd {
        out.extend_from_slice(&pdu::digest(&[bhs]));
    }
    if !data.is_empty() {
        out.extend_from_slice(data);
        let pad = [0u8; 3];
        let pad = &pad[..pdu::pad_len(data.len())];
        out.extend_from_slice(pad);
        if dd {
            out.extend_from_slice(&pdu::digest(&[data, pad]));
        }
    }
}

/// A random CHAP challenge and identifier.
fn chap_nonce() -> ([u8; login::CHAP_CHALLENGE_LEN], u8) {
    let mut bytes = [0u8; login::CHAP_CHALLENGE_LEN + 1];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer we own.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    assert_eq!(n, bytes.len() as isize, "getrandom failed");
    let mut challenge = [0u8; login::CHAP_CHALLENGE_LEN];
    challenge.copy_from_slice(&bytes[..login::CHAP_CHALLENGE_LEN]);
    (challenge, bytes[login::CHAP_CHALLENGE_LEN])
}

/// The directory view of exports and configuration that login needs.
pub(super) struct Directory<'a, E> {
    pub(super) exports: &'a E,
    pub(super) config: &'a IscsiConfig,
}

impl<E: Exports> TargetDirectory for Directory<'_, E> {
    fn lookup(&self, iqn: &str) -> Option<String> {
        let export = self.config.export_of(iqn)?;
        self.exports.get(&export).map(|_| export)
    }
    fn chap(&self, export: &str) -> Option<login::ChapSecrets> {
        self.config.chap.get(export).cloned()
    }
    fn discovery_chap(&self) -> Option<login::ChapSecrets> {
        self.config.discovery_chap.clone()
    }
    fn portal_group_tag(&self) -> u16 {
        self.config.portal_group_tag
    }
    fn moved(&self, iqn: &str) -> Option<String> {
        self.exports.iscsi_portal_of(&self.config.export_of(iqn)?)
    }
}

/// Runs login on `stream`; returns the session parameters and the StatSN to continue from, or
/// `None` when login failed (the failure response has been sent).
async fn login<E: Exports, S: AsyncRead + AsyncWrite + Unpin>(
    stream: &SharedStream<S>,
    exports: &E,
    config: &IscsiConfig,
) -> Result<Option<(SessionParams, u32, u32)>, ConnError> {
    let (challenge, id) = chap_nonce();
    let mut negotiation = Negotiation::new(challenge, id);
    let dir = Directory { exports, config };
    let mut stat_sn: Option<u32> = None;
    let mut text = Vec::new();
    loop {
        let Some(p) = read_pdu(stream, false, false, LOGIN_MAX_DATA).await? else {
            return Ok(None);
        };
        let request = match pdu::parse_bhs(&p.bhs, LOGIN_MAX_DATA) {
            Ok(r) => r,
            Err(e) => return Err(ConnError::Pdu(e)),
        };
        let Kind::Login(header) = request.kind else {
            return Err(ConnError::Protocol(
                "a PDU other than Login before login completed",
            ));
        };
        let sn = *stat_sn.get_or_insert(header.exp_stat_sn);
        let itt = request.common.itt;
        text.extend_from_slice(&p.data);
        if text.len() > MAX_TEXT_BYTES {
            return Err(ConnError::Protocol("login text too long"));
        }
        if header.continue_bit {
            // Acknowledge the partial text with an empty response.
            let bhs = response(&header, itt, false, 0, 0, login::status::SUCCESS, 0, sn);
            send_now(stream, &bhs, &[]).await?;
            continue;
        }
        let keys = match pdu::parse_text(&text) {
            Ok(k) => k,
            Err(_) => {
                let bhs = response(
                    &header,
                    itt,
                    false,
                    0,
                    0,
                    login::status::INITIATOR_ERROR,
                    0,
                    sn,
                );
                send_now(stream, &bhs, &[]).await?;
                return Ok(None);
            }
        };
        text.clear();
        let step = negotiation.step(&header, &keys, &dir);
        let mut data = Vec::new();
        for (k, v) in &step.keys {
            pdu::encode_text(&mut data, k, v);
        }
        let tsih = if step.done.is_some() { 1 } else { 0 };
        let bhs = response(
            &header,
            itt,
            step.transit,
            step.nsg,
            tsih,
            step.status,
            data.len(),
            sn,
        );
        stat_sn = Some(sn.wrapping_add(1));
        send_now(stream, &bhs, &data).await?;
        if step.status != login::status::SUCCESS {
            return Ok(None);
        }
        if let Some(params) = step.done {
            return Ok(Some((params, sn.wrapping_add(1), header.cmd_sn)));
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn response(
    header: &LoginHeader,
    itt: u32,
    transit: bool,
    nsg: u8,
    tsih: u16,
    status: u16,
    data_len: usize,
    stat_sn: u32,
) -> [u8; BHS_LEN] {
    let mut bhs = pdu::login_response(header, itt, transit, nsg, tsih, status, data_len);
    let exp = header.cmd_sn;
    pdu::set_sequence(&mut bhs, stat_sn, exp, exp.wrapping_add(QUEUE_DEPTH - 1));
    bhs
}

async fn send_now<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &SharedStream<S>,
    bhs: &[u8; BHS_LEN],
    data: &[u8],
) -> Result<(), ConnError> {
    let mut out = Vec::new();
    encode_pdu(&mut out, bhs, data, false, false);
    stream.write_all(&out).await.map_err(ConnError::Io)
}

/// Something for the writer to send.
enum Out {
    /// A complete PDU (header fields other than the sequence numbers already set).
    Pdu { bhs: [u8; BHS_LEN], data: Vec<u8> },
    /// The end of a SCSI task: Data-In and/or SCSI Response. Frees a window slot when
    /// `counted`.
    Task {
        itt: u32,
        lun: u64,
        edtl: u32,
        read: bool,
        /// Data-Out bytes the CDB asked for (writes), for residuals.
        wanted_out: Option<u64>,
        counted: bool,
        outcome: Outcome,
        r2ts: u32,
    },
    /// Close the connection once everything before has been sent.
    Close,
}

/// Where a task is.
enum TaskState {
    /// Collecting Data-Out.
    Collecting(Box<Collect>),
    /// Running.
    Running,
}

struct Collect {
    cdb: [u8; 16],
    /// The data so far: `edtl` bytes once the budget granted them, else the unsolicited part.
    buf: Vec<u8>,
    /// The budget taken for `buf` (`None`: waiting for it; no R2T is sent meanwhile).
    reservation: Option<Reservation>,
    received: u32,
    /// End of the burst the initiator is sending now (unsolicited, or the current R2T).
    burst_end: u32,
    r2t_sn: u32,
    ttt: u32,
    /// DataSN expected next in the current sequence (each R2T starts a new one at 0).
    data_sn: u32,
}

struct Task {
    lun: u64,
    counted: bool,
    edtl: u32,
    aborted: Rc<Cell<bool>>,
    state: TaskState,
}

/// Sequence numbers shared by the reader (ExpCmdSN) and the writer (StatSN).
struct Seq {
    stat_sn: Cell<u32>,
    exp_cmd_sn: Cell<u32>,
    in_flight: Cell<u32>,
    max_cmd_sn: Cell<u32>,
}

impl Seq {
    fn max_cmd_sn(&self) -> u32 {
        let computed = self
            .exp_cmd_sn
            .get()
            .wrapping_add(QUEUE_DEPTH - 1 - self.in_flight.get().min(QUEUE_DEPTH - 1));
        // Never move MaxCmdSN backwards.
        if pdu::sn_lt(self.max_cmd_sn.get(), computed) {
            self.max_cmd_sn.set(computed);
        }
        self.max_cmd_sn.get()
    }
}

/// A logged-in session in the full feature phase.
/// The write data a session holds, within [`IscsiConfig::write_buffer_bytes`].
struct WriteBudget {
    limit: u64,
    used: Cell<u64>,
    /// Writes waiting for budget, oldest first (task tags).
    waiting: RefCell<VecDeque<u32>>,
}

impl WriteBudget {
    /// Takes `bytes` if they fit (or nothing else is held) and no older write waits.
    fn take(self: &Rc<Self>, bytes: u64) -> Option<Reservation> {
        let used = self.used.get();
        let fits = used == 0 || used + bytes <= self.limit;
        if !fits || !self.waiting.borrow().is_empty() {
            return None;
        }
        Some(self.take_anyway(bytes))
    }

    /// Takes `bytes` already held (immediate or unsolicited data of a complete write).
    fn take_anyway(self: &Rc<Self>, bytes: u64) -> Reservation {
        self.used.set(self.used.get() + bytes);
        Reservation {
            budget: self.clone(),
            bytes,
        }
    }
}

/// Bytes of a [`WriteBudget`] held until dropped (with the write's buffer).
struct Reservation {
    budget: Rc<WriteBudget>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let b = &self.budget;
        b.used.set(b.used.get().saturating_sub(self.bytes));
    }
}

struct Session<T, S> {
    stream: Rc<SharedStream<S>>,
    budget: Rc<WriteBudget>,
    params: SessionParams,
    lu: Option<Rc<Lu<T>>>,
    nexus: Nexus,
    seq: Seq,
    out: LocalQueue<Out>,
    tasks: RefCell<HashMap<u32, Task>>,
    /// Fired whenever a task leaves `tasks`.
    task_done: event_listener::Event,
    next_ttt: Cell<u32>,
    write_error: RefCell<Option<io::Error>>,
    closing: Cell<bool>,
    /// Fired with `closing`, to stop a reader parked on the socket.
    close_event: event_listener::Event,
}

/// Runs one connection: login, then the full feature phase until logout, disconnect or
/// shutdown.
pub(super) async fn run<E, S>(
    stream: S,
    exports: Rc<E>,
    config: Rc<IscsiConfig>,
    registry: Rc<Registry>,
    shutdown: Shutdown,
) -> Result<(), ConnError>
where
    E: Exports + 'static,
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let stream = Rc::new(SharedStream::new(stream));
    let logged_in = {
        let login = login(&stream, &*exports, &config);
        let stop = async {
            shutdown.wait().await;
            Ok(None)
        };
        future::or(login, stop).await?
    };
    let Some((params, stat_sn, cmd_sn)) = logged_in else {
        return Ok(());
    };
    let lu = match &params.session_type {
        SessionType::Normal { export, .. } => {
            let Some(target) = exports.get(export) else {
                return Ok(());
            };
            Some(Rc::new(Lu {
                target,
                shared: registry.shared(export),
                name: export.clone(),
            }))
        }
        SessionType::Discovery => None,
    };
    let nexus = Nexus::new(&params.initiator_name, &params.isid);
    if let Some(lu) = &lu {
        // Reservations survive restarts and failover: the unit's saved state is loaded before
        // its first session runs a command. Without it the session cannot honour them: it
        // ends, and the initiator logs in again.
        if let Some(store) = exports.reservation_store(&lu.name)
            && let Err(e) = lu.shared.attach_reservations(store).await
        {
            return Err(ConnError::Reservations(e));
        }
        lu.shared.nexus_added(&nexus);
    }
    let session = Rc::new(Session {
        stream,
        budget: Rc::new(WriteBudget {
            limit: config.write_buffer_bytes,
            used: Cell::new(0),
            waiting: RefCell::default(),
        }),
        nexus,
        lu,
        seq: Seq {
            stat_sn: Cell::new(stat_sn),
            exp_cmd_sn: Cell::new(cmd_sn),
            in_flight: Cell::new(0),
            max_cmd_sn: Cell::new(cmd_sn.wrapping_add(QUEUE_DEPTH - 1)),
        },
        params,
        out: LocalQueue::with_capacity(QUEUE_DEPTH as usize),
        tasks: RefCell::new(HashMap::new()),
        task_done: event_listener::Event::new(),
        next_ttt: Cell::new(1),
        write_error: RefCell::new(None),
        closing: Cell::new(false),
        close_event: event_listener::Event::new(),
    });
    let writer = glommio::spawn_local(write_loop(session.clone()));
    let result = {
        let read = read_loop(&session, &*exports, &config);
        let stop = async {
            shutdown.wait().await;
            Ok(())
        };
        future::or(read, stop).await
    };
    // Abandoned writes, then wait for running tasks so no task outlives its session.
    for task in session.tasks.borrow().values() {
        if matches!(task.state, TaskState::Collecting(_)) {
            task.aborted.set(true);
        }
    }
    session
        .tasks
        .borrow_mut()
        .retain(|_, t| matches!(t.state, TaskState::Running));
    wait_tasks(&session, |_| true).await;
    session.out.push(Out::Close);
    writer.await;
    if let Some(lu) = &session.lu {
        lu.shared.nexus_lost(&session.nexus);
    }
    result?;
    if let Some(e) = session.write_error.borrow_mut().take() {
        return Err(ConnError::Io(e));
    }
    Ok(())
}

/// Waits until no task matching `pred` remains.
async fn wait_tasks<T, S>(session: &Session<T, S>, pred: impl Fn(&Task) -> bool) {
    loop {
        if !session.tasks.borrow().values().any(&pred) {
            return;
        }
        let listener = session.task_done.listen();
        if !session.tasks.borrow().values().any(&pred) {
            return;
        }
        listener.await;
    }
}

fn reject_pdu(reason: u8, rejected: &[u8; BHS_LEN]) -> Out {
    Out::Pdu {
        bhs: pdu::reject_bhs(reason),
        data: rejected.to_vec(),
    }
}

async fn read_loop<T, S, E>(
    session: &Rc<Session<T, S>>,
    exports: &E,
    config: &IscsiConfig,
) -> Result<(), ConnError>
where
    T: BlockTarget + 'static,
    S: AsyncRead + AsyncWrite + Unpin + 'static,
    E: Exports,
{
    let p = &session.params;
    let mut text_in: Vec<u8> = Vec::new();
    let mut text_out: Option<(u32, Vec<u8>)> = None;
    loop {
        if session.closing.get() {
            return Ok(());
        }
        let read = async {
            Some(
                read_pdu(
                    &session.stream,
                    p.header_digest,
                    p.data_digest,
                    p.max_recv_data_segment,
                )
                .await,
            )
        };
        let stop = async {
            loop {
                if session.closing.get() {
                    return None;
                }
                let listener = session.close_event.listen();
                if session.closing.get() {
                    return None;
                }
                listener.await;
            }
        };
        let Some(pdu) = future::or(read, stop).await.transpose()?.flatten() else {
            return Ok(());
        };
        let request = match pdu::parse_bhs(&pdu.bhs, p.max_recv_data_segment) {
            Ok(r) => r,
            Err(pdu::PduError::Opcode(_)) => {
                session
                    .out
                    .push(reject_pdu(reject::NOT_SUPPORTED, &pdu.bhs));
                continue;
            }
            Err(pdu::PduError::Bidirectional) => {
                session
                    .out
                    .push(reject_pdu(reject::NOT_SUPPORTED, &pdu.bhs));
                continue;
            }
            Err(e) => return Err(ConnError::Pdu(e)),
        };
        let c = request.common;
        // CmdSN: non-immediate commands must be the next expected one.
        let cmd_sn = match request.kind {
            Kind::NopOut { cmd_sn, .. }
            | Kind::ScsiCommand { cmd_sn, .. }
            | Kind::TaskMgmt { cmd_sn, .. }
            | Kind::Text { cmd_sn, .. }
            | Kind::Logout { cmd_sn, .. } => Some(cmd_sn),
            _ => None,
        };
        if let Some(sn) = cmd_sn
            && !c.immediate
        {
            if sn != session.seq.exp_cmd_sn.get() {
                // Outside the window, or ahead of a gap a single connection cannot have.
                continue;
            }
            session.seq.exp_cmd_sn.set(sn.wrapping_add(1));
        }
        match request.kind {
            Kind::NopOut { .. } => {
                if c.itt != RESERVED_TAG {
                    let mut bhs = pdu::target_bhs(op::NOP_IN, 0x80, c.itt, pdu.data.len());
                    pdu::set_lun(&mut bhs, c.lun);
                    pdu::set_u32(&mut bhs, 20, RESERVED_TAG);
                    session.out.push(Out::Pdu {
                        bhs,
                        data: pdu.data,
                    });
                } else if !c.immediate {
                    session
                        .out
                        .push(reject_pdu(reject::PROTOCOL_ERROR, &pdu.bhs));
                }
            }
            Kind::ScsiCommand {
                read,
                write,
                edtl,
                cdb,
                ..
            } => {
                let Some(lu) = session.lu.clone() else {
                    session
                        .out
                        .push(reject_pdu(reject::PROTOCOL_ERROR, &pdu.bhs));
                    continue;
                };
                if session.tasks.borrow().contains_key(&c.itt) {
                    session
                        .out
                        .push(reject_pdu(reject::PROTOCOL_ERROR, &pdu.bhs));
                    continue;
                }
                scsi_command(session, lu, &c, read, write, edtl, cdb, pdu.data);
            }
            Kind::DataOut {
                ttt,
                offset,
                data_sn,
            } => {
                data_out(session, &c, ttt, data_sn, offset, &pdu.data, &pdu.bhs)?;
            }
            Kind::TaskMgmt {
                function,
                rtt,
                ref_cmd_sn,
                cmd_sn,
            } => {
                let session = session.clone();
                let lun = c.lun;
                let itt = c.itt;
                glommio::spawn_local(async move {
                    task_management(&session, function, lun, itt, rtt, ref_cmd_sn, cmd_sn).await
                })
                .detach();
            }
            Kind::Text {
                continue_bit, ttt, ..
            } => {
                if ttt != RESERVED_TAG {
                    // Continuing a long response of ours.
                    match text_out.take() {
                        Some((t, rest)) if t == ttt => {
                            send_text(session, c.itt, c.lun, rest, &mut text_out);
                        }
                        _ => session
                            .out
                            .push(reject_pdu(reject::INVALID_FIELD, &pdu.bhs)),
                    }
                    continue;
                }
                text_in.extend_from_slice(&pdu.data);
                if text_in.len() > MAX_TEXT_BYTES {
                    return Err(ConnError::Protocol("text request too long"));
                }
                if continue_bit {
                    let mut bhs = pdu::target_bhs(op::TEXT_RESPONSE, 0x00, c.itt, 0);
                    pdu::set_u32(&mut bhs, 20, next_ttt(session));
                    session.out.push(Out::Pdu {
                        bhs,
                        data: Vec::new(),
                    });
                    continue;
                }
                let keys = match pdu::parse_text(&text_in) {
                    Ok(k) => k,
                    Err(_) => {
                        text_in.clear();
                        session
                            .out
                            .push(reject_pdu(reject::PROTOCOL_ERROR, &pdu.bhs));
                        continue;
                    }
                };
                text_in.clear();
                let data = text_response(session, &keys, exports, config);
                send_text(session, c.itt, c.lun, data, &mut text_out);
            }
            Kind::Logout { reason, .. } => {
                // Every command before the logout completes first (RFC 7143 §11.14); writes
                // still waiting for Data-Out will not get it.
                abort(session, |_, t| matches!(t.state, TaskState::Collecting(_)));
                wait_tasks(session, |_| true).await;
                let mut bhs = pdu::target_bhs(op::LOGOUT_RESPONSE, 0x80, c.itt, 0);
                bhs[2] = if reason <= 1 { 0 } else { 2 };
                session.out.push(Out::Pdu {
                    bhs,
                    data: Vec::new(),
                });
                if reason <= 1 {
                    return Ok(());
                }
            }
            Kind::Snack => session
                .out
                .push(reject_pdu(reject::PROTOCOL_ERROR, &pdu.bhs)),
            Kind::Login(_) => session
                .out
                .push(reject_pdu(reject::PROTOCOL_ERROR, &pdu.bhs)),
        }
    }
}

fn next_ttt<T, S>(session: &Session<T, S>) -> u32 {
    let t = session.next_ttt.get();
    let next = t.wrapping_add(1);
    session
        .next_ttt
        .set(if next == RESERVED_TAG { 1 } else { next });
    t
}

/// Queues a Text Response, in pieces the initiator accepts; the rest waits in `pending` for a
/// continuation request.
fn send_text<T, S>(
    session: &Session<T, S>,
    itt: u32,
    lun: u64,
    mut data: Vec<u8>,
    pending: &mut Option<(u32, Vec<u8>)>,
) {
    let max = session.params.max_send_data_segment as usize;
    let (flags, ttt) = if data.len() > max {
        let rest = data.split_off(max);
        let ttt = next_ttt(session);
        *pending = Some((ttt, rest));
        (0x40, ttt)
    } else {
        (0x80, RESERVED_TAG)
    };
    let mut bhs = pdu::target_bhs(op::TEXT_RESPONSE, flags, itt, data.len());
    pdu::set_lun(&mut bhs, lun);
    pdu::set_u32(&mut bhs, 20, ttt);
    session.out.push(Out::Pdu { bhs, data });
}

fn text_response<T, S, E: Exports>(
    session: &Session<T, S>,
    keys: &[(String, String)],
    exports: &E,
    config: &IscsiConfig,
) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in keys {
        if key != "SendTargets" {
            pdu::encode_text(&mut out, key, "NotUnderstood");
            continue;
        }
        let address = format!("{},{}", config.portal, config.portal_group_tag);
        let discovery = session.lu.is_none();
        for info in exports.list() {
            let name = config.target_name(&info.name);
            let wanted = match value.as_str() {
                "All" => discovery,
                "" => session.lu.as_ref().is_some_and(|lu| lu.name == info.name),
                other => other.eq_ignore_ascii_case(&name),
            };
            if wanted {
                pdu::encode_text(&mut out, "TargetName", &name);
                pdu::encode_text(&mut out, "TargetAddress", &address);
            }
        }
        // Targets of the cluster that other nodes serve, at their portals: discovery at any
        // node finds every vdisk.
        for (export, portal) in exports.served_elsewhere() {
            let name = config.target_name(&export);
            let wanted = match value.as_str() {
                "All" => discovery,
                "" => false,
                other => other.eq_ignore_ascii_case(&name),
            };
            if wanted {
                pdu::encode_text(&mut out, "TargetName", &name);
                pdu::encode_text(
                    &mut out,
                    "TargetAddress",
                    &format!("{portal},{}", config.portal_group_tag),
                );
            }
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn scsi_command<T, S>(
    session: &Rc<Session<T, S>>,
    lu: Rc<Lu<T>>,
    c: &pdu::Common,
    read: bool,
    write: bool,
    edtl: u32,
    cdb: [u8; 16],
    immediate_data: Vec<u8>,
) where
    T: BlockTarget + 'static,
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let counted = !c.immediate;
    if counted {
        session.seq.in_flight.set(session.seq.in_flight.get() + 1);
    }
    let aborted = Rc::new(Cell::new(false));
    let p = &session.params;
    let mut task = Task {
        lun: c.lun,
        counted,
        edtl,
        aborted: aborted.clone(),
        state: TaskState::Running,
    };
    let _ = read; // the CDB, not the R bit, says whether data comes in
    if write && edtl > 0 {
        if edtl > MAX_WRITE_BYTES {
            // Refuse at once; unsolicited Data-Out for this tag is dropped on arrival.
            session.tasks.borrow_mut().insert(c.itt, task);
            finish(
                session,
                c.itt,
                Outcome {
                    status: scsi::status::CHECK_CONDITION,
                    data: Vec::new(),
                    sense: Some(scsi::Sense::INVALID_FIELD_IN_CDB),
                },
                false,
                None,
                0,
            );
            return;
        }
        // The immediate data's buffer becomes the command's: a write that came whole in one
        // PDU (the common case for small writes) is neither copied nor allocated again.
        let mut buf = immediate_data;
        buf.truncate(edtl as usize);
        let received = buf.len() as u32;
        if received < edtl {
            let unsolicited_end = if c.final_bit {
                received
            } else {
                edtl.min(p.first_burst).max(received)
            };
            // A write that needs R2Ts waits for its budget; one whose data all comes
            // unsolicited (at most FirstBurstLength) is coming anyway.
            let reservation = if unsolicited_end < edtl {
                session.budget.take(u64::from(edtl))
            } else {
                Some(session.budget.take_anyway(u64::from(edtl)))
            };
            let held = if reservation.is_some() {
                edtl
            } else {
                unsolicited_end
            };
            buf.resize(held as usize, 0);
            let granted = reservation.is_some();
            let mut collect = Box::new(Collect {
                cdb,
                buf,
                reservation,
                received,
                burst_end: unsolicited_end,
                r2t_sn: 0,
                ttt: RESERVED_TAG,
                data_sn: 0,
            });
            if !granted {
                session.budget.waiting.borrow_mut().push_back(c.itt);
            } else if received == unsolicited_end {
                send_r2t(session, c.itt, c.lun, edtl, &mut collect);
            }
            task.state = TaskState::Collecting(collect);
            session.tasks.borrow_mut().insert(c.itt, task);
            return;
        }
        let held = session.budget.take_anyway(u64::from(edtl));
        session.tasks.borrow_mut().insert(c.itt, task);
        return start(
            session,
            lu,
            c.itt,
            c.lun,
            cdb,
            (buf, Some(held)),
            aborted,
            0,
        );
    }
    session.tasks.borrow_mut().insert(c.itt, task);
    let no_data = (Vec::new(), None);
    start(session, lu, c.itt, c.lun, cdb, no_data, aborted, 0);
}

/// Gives waiting writes their budget, oldest first, and sends their first R2T (once their
/// unsolicited data, if any, is in). Called whenever budget may have been freed.
fn grant<T, S>(session: &Session<T, S>) {
    loop {
        let Some(itt) = session.budget.waiting.borrow().front().copied() else {
            return;
        };
        let mut tasks = session.tasks.borrow_mut();
        let waiting = tasks.get_mut(&itt).and_then(|t| match &mut t.state {
            TaskState::Collecting(c) if c.reservation.is_none() => Some((t.edtl, t.lun, c)),
            _ => None,
        });
        let Some((edtl, lun, collect)) = waiting else {
            session.budget.waiting.borrow_mut().pop_front(); // gone (aborted, failed)
            continue;
        };
        let used = session.budget.used.get();
        if used != 0 && used + u64::from(edtl) > session.budget.limit {
            return;
        }
        session.budget.waiting.borrow_mut().pop_front();
        collect.reservation = Some(session.budget.take_anyway(u64::from(edtl)));
        collect.buf.resize(edtl as usize, 0);
        if collect.received >= collect.burst_end {
            send_r2t(session, itt, lun, edtl, collect);
        }
    }
}

/// Sends the next R2T for a collecting task.
fn send_r2t<T, S>(session: &Session<T, S>, itt: u32, lun: u64, edtl: u32, collect: &mut Collect) {
    let len = (edtl - collect.received).min(session.params.max_burst);
    collect.ttt = next_ttt(session);
    collect.data_sn = 0;
    collect.burst_end = collect.received + len;
    let mut bhs = pdu::target_bhs(op::R2T, 0x80, itt, 0);
    pdu::set_lun(&mut bhs, lun);
    pdu::set_u32(&mut bhs, 20, collect.ttt);
    pdu::set_u32(&mut bhs, 36, collect.r2t_sn);
    pdu::set_u32(&mut bhs, 40, collect.received);
    pdu::set_u32(&mut bhs, 44, len);
    collect.r2t_sn += 1;
    session.out.push(Out::Pdu {
        bhs,
        data: Vec::new(),
    });
}

fn data_out<T, S>(
    session: &Rc<Session<T, S>>,
    c: &pdu::Common,
    ttt: u32,
    data_sn: u32,
    offset: u32,
    data: &[u8],
    bhs: &[u8; BHS_LEN],
) -> Result<(), ConnError>
where
    T: BlockTarget + 'static,
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let mut tasks = session.tasks.borrow_mut();
    let Some(task) = tasks.get_mut(&c.itt) else {
        return Ok(()); // an aborted or refused task: drop its data
    };
    let edtl = task.edtl;
    let lun = task.lun;
    let TaskState::Collecting(collect) = &mut task.state else {
        return Ok(());
    };
    if ttt != collect.ttt && ttt != RESERVED_TAG {
        drop(tasks);
        session.out.push(reject_pdu(reject::INVALID_FIELD, bhs));
        return Ok(());
    }
    // At ErrorRecoveryLevel 0 a lost or reordered Data-Out cannot be recovered within the
    // command: the command ends with ABORTED COMMAND and later Data-Out for it is dropped.
    if data_sn != collect.data_sn {
        task.state = TaskState::Running;
        drop(tasks);
        let outcome = Outcome {
            status: scsi::status::CHECK_CONDITION,
            data: Vec::new(),
            sense: Some(scsi::Sense::DATA_PHASE_ERROR),
        };
        finish(session, c.itt, outcome, false, None, 0);
        grant(session);
        return Ok(());
    }
    collect.data_sn = collect.data_sn.wrapping_add(1);
    let end = u64::from(offset) + data.len() as u64;
    if end > u64::from(edtl) {
        return Err(ConnError::Protocol(
            "Data-Out past the expected transfer length",
        ));
    }
    if end > collect.buf.len() as u64 {
        return Err(ConnError::Protocol(
            "Data-Out beyond the unsolicited burst before any R2T",
        ));
    }
    collect.buf[offset as usize..end as usize].copy_from_slice(data);
    collect.received = collect.received.max(end as u32);
    if collect.received >= edtl {
        let TaskState::Collecting(collect) = std::mem::replace(&mut task.state, TaskState::Running)
        else {
            unreachable!("matched above")
        };
        let aborted = task.aborted.clone();
        let r2ts = collect.r2t_sn;
        drop(tasks);
        let Collect {
            cdb,
            buf,
            reservation,
            ..
        } = *collect;
        let lu = session
            .lu
            .clone()
            .expect("SCSI tasks only exist in normal sessions");
        start(
            session,
            lu,
            c.itt,
            lun,
            cdb,
            (buf, reservation),
            aborted,
            r2ts,
        );
        return Ok(());
    }
    // A write still waiting for its budget gets its first R2T from `grant`.
    if c.final_bit && collect.received >= collect.burst_end && collect.reservation.is_some() {
        send_r2t(session, c.itt, lun, edtl, collect);
    }
    Ok(())
}

/// Spawns the execution of a task whose data is all in.
#[allow(clippy::too_many_arguments)]
fn start<T, S>(
    session: &Rc<Session<T, S>>,
    lu: Rc<Lu<T>>,
    itt: u32,
    lun: u64,
    cdb: [u8; 16],
    (data, held): (Vec<u8>, Option<Reservation>),
    aborted: Rc<Cell<bool>>,
    r2ts: u32,
) where
    T: BlockTarget + 'static,
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let session = session.clone();
    glommio::spawn_local(async move {
        let outcome = scsi::execute(&lu, &session.nexus, lun, &cdb, &data).await;
        drop(data);
        if held.is_some() {
            drop(held);
            grant(&session);
        }
        if aborted.get() {
            let task = session.tasks.borrow_mut().remove(&itt);
            if let Some(task) = task
                && task.counted
            {
                session.seq.in_flight.set(session.seq.in_flight.get() - 1);
            }
            session.task_done.notify(usize::MAX);
            return;
        }
        // Residuals count Data-Out for commands that take it, Data-In for the others.
        let wanted_out = scsi::data_out_bytes(&cdb, scsi::block_bytes(&*lu.target));
        finish(
            &session,
            itt,
            outcome,
            wanted_out.is_none(),
            wanted_out,
            r2ts,
        );
    })
    .detach();
}

/// Hands a finished task's outcome to the writer (which frees its slot when sent).
fn finish<T, S>(
    session: &Session<T, S>,
    itt: u32,
    outcome: Outcome,
    read: bool,
    wanted_out: Option<u64>,
    r2ts: u32,
) {
    let tasks = session.tasks.borrow();
    let task = tasks.get(&itt).expect("a finishing task is registered");
    session.out.push(Out::Task {
        itt,
        lun: task.lun,
        edtl: task.edtl,
        read,
        wanted_out,
        counted: task.counted,
        outcome,
        r2ts,
    });
}

/// Task management functions (RFC 7143 §11.5).
async fn task_management<T, S>(
    session: &Session<T, S>,
    function: u8,
    lun: u64,
    itt: u32,
    rtt: u32,
    ref_cmd_sn: u32,
    cmd_sn: u32,
) {
    const COMPLETE: u8 = 0;
    const NO_TASK: u8 = 1;
    const NO_LUN: u8 = 2;
    const NOT_SUPPORTED: u8 = 5;
    const REASSIGN_NOT_SUPPORTED: u8 = 4;
    let lun_ok = lun == 0;
    let mut close = false;
    let response = match function {
        1 => {
            // ABORT TASK
            let found = abort(session, |t_itt, t| t_itt == rtt && t.lun == lun);
            if found.is_empty() {
                let exp = session.seq.exp_cmd_sn.get();
                let window_start = exp.wrapping_sub(QUEUE_DEPTH);
                if pdu::sn_le(window_start, ref_cmd_sn) && pdu::sn_lt(ref_cmd_sn, cmd_sn.max(exp)) {
                    COMPLETE
                } else {
                    NO_TASK
                }
            } else {
                wait_tasks(session, |t| t.aborted.get()).await;
                COMPLETE
            }
        }
        2 | 4 | 5 if !lun_ok => NO_LUN,
        2 | 4 => {
            // ABORT TASK SET, CLEAR TASK SET
            abort(session, |_, t| t.lun == lun);
            wait_tasks(session, |t| t.aborted.get()).await;
            COMPLETE
        }
        5..=7 => {
            // LUN RESET, TARGET WARM RESET, TARGET COLD RESET
            abort(session, |_, _| true);
            wait_tasks(session, |t| t.aborted.get()).await;
            if let Some(lu) = &session.lu {
                lu.shared.reset();
            }
            close = function == 7;
            COMPLETE
        }
        8 => REASSIGN_NOT_SUPPORTED,
        _ => NOT_SUPPORTED,
    };
    let mut bhs = pdu::target_bhs(op::TASK_MGMT_RESPONSE, 0x80, itt, 0);
    bhs[2] = response;
    session.out.push(Out::Pdu {
        bhs,
        data: Vec::new(),
    });
    if close {
        session.closing.set(true);
        session.close_event.notify(usize::MAX);
        session.out.push(Out::Close);
    }
}

/// Marks matching tasks aborted; drops those still collecting data. Returns their tags.
fn abort<T, S>(session: &Session<T, S>, pred: impl Fn(u32, &Task) -> bool) -> Vec<u32> {
    let mut tasks = session.tasks.borrow_mut();
    let mut found = Vec::new();
    let mut freed = 0;
    tasks.retain(|&itt, t| {
        if !pred(itt, t) {
            return true;
        }
        found.push(itt);
        t.aborted.set(true);
        match t.state {
            TaskState::Collecting(_) => {
                freed += u32::from(t.counted);
                false
            }
            TaskState::Running => true,
        }
    });
    session
        .seq
        .in_flight
        .set(session.seq.in_flight.get() - freed);
    drop(tasks);
    // The dropped writes gave back their budget.
    grant(session);
    found
}

impl<T, S> Session<T, S> {
    fn seq_fill(&self, bhs: &mut [u8; BHS_LEN]) {
        let stat_sn = self.seq.stat_sn.get();
        pdu::set_sequence(
            bhs,
            stat_sn,
            self.seq.exp_cmd_sn.get(),
            self.seq.max_cmd_sn(),
        );
        if pdu::advances_stat_sn(bhs) {
            self.seq.stat_sn.set(stat_sn.wrapping_add(1));
        }
    }
}

/// The writer: stamps sequence numbers, segments Data-In, adds digests, sends in batches.
async fn write_loop<T, S>(session: Rc<Session<T, S>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut batch = Vec::new();
    let mut out = Vec::with_capacity(256 << 10);
    let mut broken = false;
    while session.out.pop_all(&mut batch).await {
        gather_completions(&session, &mut batch).await;
        let mut close = false;
        for item in batch.drain(..) {
            if close {
                continue;
            }
            match item {
                Out::Pdu { mut bhs, data } => {
                    session.seq_fill(&mut bhs);
                    encode_pdu(
                        &mut out,
                        &bhs,
                        &data,
                        session.params.header_digest,
                        session.params.data_digest,
                    );
                }
                Out::Task {
                    itt,
                    lun,
                    edtl,
                    read,
                    wanted_out,
                    counted,
                    outcome,
                    r2ts,
                } => {
                    session.tasks.borrow_mut().remove(&itt);
                    if counted {
                        session.seq.in_flight.set(session.seq.in_flight.get() - 1);
                    }
                    session.task_done.notify(usize::MAX);
                    encode_task(
                        &session, &mut out, itt, lun, edtl, read, wanted_out, outcome, r2ts,
                    );
                }
                Out::Close => close = true,
            }
            if out.len() >= 256 << 10 && !broken {
                if let Err(e) = session.stream.write_all(&out).await {
                    *session.write_error.borrow_mut() = Some(e);
                    broken = true;
                }
                out.clear();
            }
        }
        if !out.is_empty()
            && !broken
            && let Err(e) = session.stream.write_all(&out).await
        {
            *session.write_error.borrow_mut() = Some(e);
            broken = true;
        }
        out.clear();
        if close {
            session.closing.set(true);
            session.close_event.notify(usize::MAX);
            let _ = session.stream.flush().await;
            return;
        }
    }
}

/// Scheduler turns the writer waits at most for more completions before it sends.
const GATHER_TURNS_MAX: u32 = 32;

/// Adds to `batch` the completions that arrive within the next few scheduler turns, while
/// commands are still running.
///
/// Commands that finish together rarely finish in the same turn: the writes of one group
/// commit are released one after another (each takes the oplog's commit lock in turn to learn
/// that its batch is durable), so an eager writer sends one or two responses per `send`. Each
/// `send` on loopback also runs the receiver's TCP path on this core, and each wakes the
/// initiator. Yielding while the last turn brought a completion and others are still running
/// sends the whole group in one call; when no other command is running (QD1) it costs nothing.
async fn gather_completions<T, S>(session: &Session<T, S>, batch: &mut Vec<Out>) {
    for _ in 0..GATHER_TURNS_MAX {
        let queued = batch
            .iter()
            .filter(|item| matches!(item, Out::Task { .. }))
            .count();
        // `tasks` holds every command not yet answered: running ones and those in `batch`.
        if session.tasks.borrow().len() <= queued {
            return;
        }
        futures_lite::future::yield_now().await;
        if session.out.len() == 0 {
            return;
        }
        session.out.pop_all(batch).await;
    }
}

/// Encodes the Data-In PDUs and/or SCSI Response that end a task.
#[allow(clippy::too_many_arguments)]
fn encode_task<T, S>(
    session: &Session<T, S>,
    out: &mut Vec<u8>,
    itt: u32,
    lun: u64,
    edtl: u32,
    read: bool,
    wanted_out: Option<u64>,
    outcome: Outcome,
    r2ts: u32,
) {
    let p = &session.params;
    let (hd, dd) = (p.header_digest, p.data_digest);
    let good = outcome.status == scsi::status::GOOD;
    // Residuals (RFC 7143 §11.4.5).
    let produced = if read {
        outcome.data.len() as u64
    } else {
        wanted_out.unwrap_or(0)
    };
    let (flags, residual) = if !good && outcome.sense.is_some() {
        (0u8, 0u32)
    } else if produced > u64::from(edtl) {
        (
            0x04u8,
            (produced - u64::from(edtl)).min(u64::from(u32::MAX)) as u32,
        )
    } else if produced < u64::from(edtl) {
        (0x02u8, edtl - produced as u32)
    } else {
        (0, 0)
    };
    let send = outcome.data.len().min(edtl as usize);
    let data = &outcome.data[..send];
    let mut data_sn = 0u32;
    if read && !data.is_empty() {
        let seg = p.max_send_data_segment as usize;
        let burst = p.max_burst as usize;
        let mut offset = 0;
        while offset < data.len() {
            let burst_end = (offset / burst + 1) * burst;
            let len = seg.min(data.len() - offset).min(burst_end - offset);
            let last = offset + len == data.len();
            let mut f = 0u8;
            if last || offset + len == burst_end {
                f |= 0x80;
            }
            let with_status = last && good;
            if with_status {
                f |= 0x01 | flags;
            }
            let mut bhs = pdu::target_bhs(op::DATA_IN, f, itt, len);
            if with_status {
                bhs[3] = outcome.status;
            }
            pdu::set_lun(&mut bhs, lun);
            pdu::set_u32(&mut bhs, 20, RESERVED_TAG);
            session.seq_fill(&mut bhs);
            pdu::set_u32(&mut bhs, 36, data_sn);
            pdu::set_u32(&mut bhs, 40, offset as u32);
            if with_status {
                pdu::set_u32(&mut bhs, 44, residual);
            }
            encode_pdu(out, &bhs, &data[offset..offset + len], hd, dd);
            data_sn += 1;
            offset += len;
        }
        if good {
            return;
        }
    }
    let mut sense_data = Vec::new();
    if let Some(sense) = outcome.sense {
        let fixed = sense.fixed();
        sense_data.extend_from_slice(&(fixed.len() as u16).to_be_bytes());
        sense_data.extend_from_slice(&fixed);
    }
    let mut bhs = pdu::target_bhs(op::SCSI_RESPONSE, 0x80 | flags, itt, sense_data.len());
    bhs[2] = 0; // command completed at target
    bhs[3] = outcome.status;
    session.seq_fill(&mut bhs);
    pdu::set_u32(&mut bhs, 36, if read { data_sn } else { r2ts });
    pdu::set_u32(&mut bhs, 44, residual);
    encode_pdu(out, &bhs, &sense_data, hd, dd);
}
