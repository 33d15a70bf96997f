//! The iSCSI (RFC 7143) target frontend: serves [`Exports`](crate::target::Exports) to iSCSI
//! initiators (Linux open-iscsi, libiscsi, qemu, VMware, Windows) as one target per export,
//! named `iqn.2026-11.io.cairn:<vdisk name>`, each with a single direct-access LUN 0.
//!
//! Offered: discovery (SendTargets) and normal sessions; AuthMethod None or CHAP (MD5, one-way
//! or mutual, per target); HeaderDigest/DataDigest None or CRC32C; ImmediateData, InitialR2T,
//! FirstBurstLength, MaxBurstLength and MaxRecvDataSegmentLength as negotiated;
//! ErrorRecoveryLevel 0, MaxConnections 1, MaxOutstandingR2T 1, in-order data. SCSI emulation
//! covers SPC-5/SBC-4 commands a modern initiator uses, including UNMAP/WRITE SAME thin
//! provisioning, COMPARE AND WRITE, and persistent reservations enforced across sessions.
//!
//! Layout, from the wire inwards (the same split as the NBD frontend):
//! * [`pdu`]: the wire format as pure functions — the only code that interprets initiator
//!   bytes, unit-tested and fuzzed (`fuzz/fuzz_targets/iscsi_pdu.rs`).
//! * [`login`]: key negotiation and the login stage machine with CHAP, pure.
//! * [`scsi`]: CDB decoding and command emulation against a [`BlockTarget`](crate::target::BlockTarget),
//!   with the per-target state shared by sessions (reservations, mode pages, range lock).
//! * `session`: one connection's reader, command tasks and writer (CmdSN window, R2T,
//!   Data-In, task management, logout).
//! * `server`: [`serve`], configuration and error types.
//!
//! Everything runs on the executor of the core that owns the exports: futures are not `Send`.

pub mod login;
pub mod pdu;
pub mod scsi;
mod server;
mod session;

pub use login::ChapSecrets;
pub use server::{
    ConnError, DEFAULT_TARGET_PREFIX, DEFAULT_WRITE_BUFFER_BYTES, IscsiConfig, MAX_CONNECTIONS,
    Registry, ServeError, ServeSummary, handle_connection, handle_connection_with, serve,
};
pub use session::{MAX_WRITE_BYTES, QUEUE_DEPTH};
