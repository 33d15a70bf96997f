//! The iSCSI target against real initiators (libiscsi's `iscsi-ls`, `iscsi-inq`,
//! `iscsi-readcapacity16`, `iscsi-perf` and the `iscsi-test-cu` conformance suite) and a
//! raw-socket initiator for a data round trip and for what real initiators never send.
//!
//! Each test starts its own server on an ephemeral 127.0.0.1 port in a glommio executor thread,
//! exporting in-memory disks. A missing client tool fails the test when `CI=true` and prints a
//! SKIPPED line otherwise.

use std::cell::RefCell;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dataplane::iscsi::scsi::{ReservationStore, StoreFuture};
use dataplane::iscsi::{ChapSecrets, DEFAULT_WRITE_BUFFER_BYTES, IscsiConfig, ServeSummary, serve};
use dataplane::nbd::Shutdown;
use dataplane::target::{BlockTarget, ExportInfo, Exports, TargetError};
use glommio::LocalExecutorBuilder;
use glommio::net::TcpListener;

const MIB: usize = 1 << 20;
const DISK_BYTES: usize = 64 * MIB;
#[path = "support/libiscsi.rs"]
mod libiscsi;

const PREFIX: &str = "iqn.2026-11.io.cairn";

/// An in-memory disk.
struct MemDisk {
    data: RefCell<Vec<u8>>,
}

impl MemDisk {
    fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, TargetError> {
        let size = self.size_bytes();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ => Err(TargetError::OutOfRange { offset, len, size }),
        }
    }
}

impl BlockTarget for MemDisk {
    fn size_bytes(&self) -> u64 {
        self.data.borrow().len() as u64
    }
    async fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), TargetError> {
        let range = self.range(offset, out.len() as u64)?;
        futures_lite::future::yield_now().await;
        out.copy_from_slice(&self.data.borrow()[range]);
        Ok(())
    }
    async fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), TargetError> {
        let range = self.range(offset, data.len() as u64)?;
        futures_lite::future::yield_now().await;
        self.data.borrow_mut()[range].copy_from_slice(data);
        Ok(())
    }
    async fn flush(&self) -> Result<(), TargetError> {
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<(), TargetError> {
        let range = self.range(offset, len)?;
        self.data.borrow_mut()[range].fill(0);
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> Result<(), TargetError> {
        self.trim(offset, len).await
    }
}

/// `vd0` (64 MiB), `vd1` (1 MiB) and `secure` (1 MiB, CHAP required).
struct TestExports {
    disks: Vec<(ExportInfo, Rc<MemDisk>)>,
    /// Saved reservation states by export, kept across server restarts.
    saved: Saved,
}

type Saved = Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>>;

/// The reservations of one export in [`Saved`].
struct SavedReservations(Saved, String);

impl ReservationStore for SavedReservations {
    fn load(&self) -> StoreFuture<'_, Option<Vec<u8>>> {
        Box::pin(async move { Ok(self.0.lock().unwrap().get(&self.1).cloned()) })
    }

    fn save(&self, state: Vec<u8>) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            self.0.lock().unwrap().insert(self.1.clone(), state);
            Ok(())
        })
    }
}

impl TestExports {
    fn new(saved: Saved) -> TestExports {
        let disks = [("vd0", DISK_BYTES), ("vd1", MIB), ("secure", MIB)]
            .into_iter()
            .map(|(name, size)| {
                let info = ExportInfo {
                    name: name.into(),
                    description: String::new(),
                    size_bytes: size as u64,
                };
                let disk = MemDisk {
                    data: RefCell::new(vec![0; size]),
                };
                (info, Rc::new(disk))
            })
            .collect();
        TestExports { disks, saved }
    }
}

impl Exports for TestExports {
    type Target = MemDisk;
    fn get(&self, name: &str) -> Option<Rc<MemDisk>> {
        self.disks
            .iter()
            .find(|(info, _)| info.name == name)
            .map(|(_, disk)| disk.clone())
    }
    fn list(&self) -> Vec<ExportInfo> {
        self.disks.iter().map(|(info, _)| info.clone()).collect()
    }
    fn reservation_store(&self, name: &str) -> Option<Rc<dyn ReservationStore>> {
        Some(Rc::new(SavedReservations(self.saved.clone(), name.into())))
    }
}

/// A server on an ephemeral port, in its own executor thread.
struct TestServer {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<glommio::ExecutorJoinHandle<ServeSummary>>,
}

impl TestServer {
    fn start() -> TestServer {
        TestServer::start_on(0)
    }

    fn start_on(port: u16) -> TestServer {
        TestServer::start_with(port, DEFAULT_WRITE_BUFFER_BYTES, Saved::default())
    }

    /// A server on `port` (0: any) whose connections hold at most `write_buffer` bytes of
    /// write data, keeping reservations in `saved`.
    fn start_with(port: u16, write_buffer: u64, saved: Saved) -> TestServer {
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let thread = LocalExecutorBuilder::default()
            .name("iscsi-test")
            .io_memory(1 << 20)
            .spawn(move || async move {
                let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind");
                let addr = listener.local_addr().expect("local addr");
                port_tx.send(addr.port()).expect("send port");
                let mut config = IscsiConfig::new(addr.to_string());
                config.write_buffer_bytes = write_buffer;
                config.chap.insert(
                    "secure".into(),
                    ChapSecrets {
                        initiator_user: "user".into(),
                        initiator_secret: b"secretsecret".to_vec(),
                        target: None,
                    },
                );
                let shutdown = Shutdown::new();
                let trigger = shutdown.clone();
                glommio::spawn_local(async move {
                    while !stop_flag.load(Ordering::Relaxed) {
                        glommio::timer::sleep(Duration::from_millis(20)).await;
                    }
                    trigger.trigger();
                })
                .detach();
                serve(
                    listener,
                    Rc::new(TestExports::new(saved)),
                    Rc::new(config),
                    shutdown,
                )
                .await
                .expect("serve")
            })
            .expect("spawn executor");
        let port = port_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("server port");
        TestServer {
            port,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self, export: &str) -> String {
        format!("iscsi://127.0.0.1:{}/{PREFIX}:{export}/0", self.port)
    }

    fn stop(mut self) -> ServeSummary {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().expect("running");
        thread.join().expect("server thread")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Whether `tool` exists; when it does not, fails under `CI=true` and skips otherwise.
fn have_tool(tool: &str) -> bool {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|out| out.status.success());
    if !ok {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{tool} is required in CI (scripts/setup.sh installs libiscsi-bin)");
        }
        let _ = writeln!(
            std::io::stderr(),
            "=== SKIPPED: {tool} not available (install libiscsi-bin) ==="
        );
    }
    ok
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn client");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout
}

#[test]
fn iscsi_ls_discovers_every_target() {
    if !have_tool("iscsi-ls") {
        return;
    }
    let server = TestServer::start();
    let out = run(Command::new("iscsi-ls").arg(format!("iscsi://127.0.0.1:{}", server.port)));
    eprintln!("iscsi-ls:\n{out}");
    for name in ["vd0", "vd1", "secure"] {
        let line = format!("Target:{PREFIX}:{name} Portal:127.0.0.1:{},1", server.port);
        assert!(out.contains(&line), "{line:?} missing in:\n{out}");
    }
    // -s logs in to each target and reports its LUNs; with CHAP credentials `secure` opens too
    // (the others accept AuthMethod=None from the offered CHAP,None).
    let luns = run(Command::new("iscsi-ls").arg("-s").arg(format!(
        "iscsi://user%secretsecret@127.0.0.1:{}",
        server.port
    )));
    eprintln!("iscsi-ls -s:\n{luns}");
    assert_eq!(luns.matches("Lun:0").count(), 3, "{luns}");
    // iscsi-ls prints the last LBA times the block size: 64 MiB - 512 shows as 63M.
    assert!(luns.contains("(Size:63M)"), "{luns}");
    let summary = server.stop();
    assert_eq!(summary.failed, 0, "{summary:?}");
}

#[test]
fn inquiry_and_capacity_with_libiscsi_tools() {
    if !have_tool("iscsi-inq") || !have_tool("iscsi-readcapacity16") {
        return;
    }
    let server = TestServer::start();
    let inq = run(Command::new("iscsi-inq").arg(server.url("vd0")));
    assert!(inq.contains("CAIRN"), "{inq}");
    let vpd = run(Command::new("iscsi-inq")
        .args(["-e", "1", "-c", "0xb2"])
        .arg(server.url("vd0")));
    eprintln!("{vpd}");
    let cap = run(Command::new("iscsi-readcapacity16").arg(server.url("vd0")));
    eprintln!("{cap}");
    assert!(
        cap.contains(&format!("Total size:{DISK_BYTES}")),
        "capacity:\n{cap}"
    );
    // Header and data digests through the URL.
    let digest =
        run(Command::new("iscsi-inq").arg(format!("{}?header_digest=crc32c", server.url("vd1"))));
    assert!(digest.contains("CAIRN"), "{digest}");
    // CHAP: required on `secure`, refused without, accepted with the right secret.
    let anonymous = Command::new("iscsi-inq")
        .arg(server.url("secure"))
        .output()
        .unwrap();
    assert!(!anonymous.status.success());
    let chap = run(Command::new("iscsi-inq").arg(format!(
        "iscsi://user%secretsecret@127.0.0.1:{}/{PREFIX}:secure/0",
        server.port
    )));
    assert!(chap.contains("CAIRN"), "{chap}");
    let wrong = Command::new("iscsi-inq")
        .arg(format!(
            "iscsi://user%wrongsecret1@127.0.0.1:{}/{PREFIX}:secure/0",
            server.port
        ))
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    server.stop();
}

#[test]
fn iscsi_perf_reads_with_queue_depth() {
    if !have_tool("iscsi-perf") {
        return;
    }
    let server = TestServer::start();
    // iscsi-perf runs until interrupted; give it two seconds, then stop it.
    let child = Command::new("iscsi-perf")
        .args(["-b", "16", "-m", "32", "-r"])
        .arg(server.url("vd0"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn iscsi-perf");
    std::thread::sleep(Duration::from_secs(2));
    unsafe {
        libc_kill(child.id() as i32, 2);
    }
    let out = child.wait_with_output().expect("iscsi-perf output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("iscsi-perf:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("IOPS") || stdout.contains("iops"),
        "no throughput line:\n{stdout}\n{stderr}"
    );
    let summary = server.stop();
    assert_eq!(summary.failed, 0, "{summary:?}");
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// A minimal iSCSI initiator for byte-exact round trips and malformed input.
struct RawInitiator {
    sock: TcpStream,
    cmd_sn: u32,
    itt: u32,
}

fn bhs(opcode: u8, flags: u8, data_len: usize) -> [u8; 48] {
    let mut b = [0u8; 48];
    b[0] = opcode;
    b[1] = flags;
    let len = (data_len as u32).to_be_bytes();
    b[5..8].copy_from_slice(&len[1..4]);
    b
}

fn pad(data: &[u8]) -> Vec<u8> {
    let mut d = data.to_vec();
    while !d.len().is_multiple_of(4) {
        d.push(0);
    }
    d
}

impl RawInitiator {
    fn connect(port: u16) -> RawInitiator {
        let sock = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        RawInitiator {
            sock,
            cmd_sn: 1,
            itt: 1,
        }
    }

    fn send(&mut self, header: &[u8; 48], data: &[u8]) {
        let mut out = header.to_vec();
        out.extend_from_slice(&pad(data));
        self.sock.write_all(&out).expect("send");
    }

    fn recv(&mut self) -> ([u8; 48], Vec<u8>) {
        let mut h = [0u8; 48];
        self.sock.read_exact(&mut h).expect("receive header");
        let len = u32::from_be_bytes([0, h[5], h[6], h[7]]) as usize;
        let mut data = vec![0u8; len + (4 - len % 4) % 4];
        self.sock.read_exact(&mut data).expect("receive data");
        data.truncate(len);
        (h, data)
    }

    /// Logs in to `export` in one step with the given operational keys.
    fn login(port: u16, export: &str, keys: &str) -> RawInitiator {
        RawInitiator::login_as(port, "iqn.raw", export, keys)
    }

    /// [`RawInitiator::login`] as initiator `name`.
    fn login_as(port: u16, name: &str, export: &str, keys: &str) -> RawInitiator {
        let mut c = RawInitiator::connect(port);
        let text = format!(
            "InitiatorName={name}\0TargetName={PREFIX}:{export}\0SessionType=Normal\0\
             AuthMethod=None\0"
        );
        let mut h = bhs(0x43, 0x80 | 0x01, text.len()); // security -> operational
        h[8] = 0x80; // ISID
        h[24..28].copy_from_slice(&1u32.to_be_bytes()); // CmdSN
        c.send(&h, text.as_bytes());
        let (r, _) = c.recv();
        assert_eq!(r[0] & 0x3f, 0x23);
        assert_eq!(u16::from_be_bytes([r[36], r[37]]), 0, "login status");
        let mut h = bhs(0x43, 0x80 | 0x04 | 0x03, keys.len());
        h[8] = 0x80;
        h[24..28].copy_from_slice(&1u32.to_be_bytes());
        c.send(&h, keys.as_bytes());
        let (r, data) = c.recv();
        assert_eq!(u16::from_be_bytes([r[36], r[37]]), 0, "login status");
        assert_eq!(r[1] & 0x83, 0x83, "transit to full feature");
        eprintln!("operational answer: {:?}", String::from_utf8_lossy(&data));
        c
    }

    /// WRITE(10) of `data` at `lba`, with immediate data up to `immediate` bytes, following
    /// R2Ts for the rest. Returns the SCSI status.
    fn write10(&mut self, lba: u32, data: &[u8], immediate: usize) -> u8 {
        let itt = self.next_itt();
        let blocks = (data.len() / 512) as u16;
        let first = immediate.min(data.len());
        let final_bit = 0x80;
        let mut h = bhs(0x01, final_bit | 0x20 | 0x01, first);
        h[16..20].copy_from_slice(&itt.to_be_bytes());
        h[20..24].copy_from_slice(&(data.len() as u32).to_be_bytes());
        h[24..28].copy_from_slice(&self.take_cmd_sn().to_be_bytes());
        h[32] = 0x2a;
        h[34..38].copy_from_slice(&lba.to_be_bytes());
        h[39..41].copy_from_slice(&blocks.to_be_bytes());
        self.send(&h, &data[..first]);
        loop {
            let (r, resp) = self.recv();
            match r[0] & 0x3f {
                0x31 => {
                    let ttt = &r[20..24];
                    let offset = u32::from_be_bytes(r[40..44].try_into().unwrap()) as usize;
                    let len = u32::from_be_bytes(r[44..48].try_into().unwrap()) as usize;
                    let mut sent = 0;
                    let mut data_sn = 0u32;
                    while sent < len {
                        let n = (len - sent).min(8192);
                        let last = sent + n == len;
                        let mut d = bhs(0x05, if last { 0x80 } else { 0 }, n);
                        d[16..20].copy_from_slice(&itt.to_be_bytes());
                        d[20..24].copy_from_slice(ttt);
                        d[36..40].copy_from_slice(&data_sn.to_be_bytes());
                        d[40..44].copy_from_slice(&((offset + sent) as u32).to_be_bytes());
                        self.send(&d, &data[offset + sent..offset + sent + n]);
                        sent += n;
                        data_sn += 1;
                    }
                }
                0x21 => {
                    assert_eq!(u32::from_be_bytes(r[16..20].try_into().unwrap()), itt);
                    let _ = resp;
                    return r[3];
                }
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    /// A command with `cdb` (up to 16 bytes) and all its data-out (`data`) sent as immediate
    /// data, expecting at most `read_len` bytes in; returns the status and the data in.
    fn command(&mut self, cdb: &[u8], data: &[u8], read_len: usize) -> (u8, Vec<u8>) {
        let itt = self.next_itt();
        let flags = 0x80 | if data.is_empty() { 0x40 } else { 0x20 } | 0x01;
        let mut h = bhs(0x01, flags, data.len());
        h[16..20].copy_from_slice(&itt.to_be_bytes());
        let edtl = if data.is_empty() {
            read_len
        } else {
            data.len()
        };
        h[20..24].copy_from_slice(&(edtl as u32).to_be_bytes());
        h[24..28].copy_from_slice(&self.take_cmd_sn().to_be_bytes());
        h[32..32 + cdb.len()].copy_from_slice(cdb);
        self.send(&h, data);
        let mut got = Vec::new();
        loop {
            let (r, d) = self.recv();
            match r[0] & 0x3f {
                0x25 => {
                    got.extend_from_slice(&d);
                    if r[1] & 0x01 != 0 {
                        return (r[3], got);
                    }
                }
                0x21 => return (r[3], got),
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    /// Sends a WRITE(10) command of `len` bytes at `lba` without data; returns its tag.
    fn send_write10(&mut self, lba: u32, len: usize) -> u32 {
        let itt = self.next_itt();
        let mut h = bhs(0x01, 0x80 | 0x20 | 0x01, 0);
        h[16..20].copy_from_slice(&itt.to_be_bytes());
        h[20..24].copy_from_slice(&(len as u32).to_be_bytes());
        h[24..28].copy_from_slice(&self.take_cmd_sn().to_be_bytes());
        h[32] = 0x2a;
        h[34..38].copy_from_slice(&lba.to_be_bytes());
        h[39..41].copy_from_slice(&((len / 512) as u16).to_be_bytes());
        self.send(&h, &[]);
        itt
    }

    /// Answers the R2T `r2t` of task `itt` with its burst of `data`.
    fn answer_r2t(&mut self, itt: u32, r2t: &[u8; 48], data: &[u8]) {
        let offset = u32::from_be_bytes(r2t[40..44].try_into().unwrap()) as usize;
        let len = u32::from_be_bytes(r2t[44..48].try_into().unwrap()) as usize;
        for (sn, at) in (offset..offset + len).step_by(8192).enumerate() {
            let n = (offset + len - at).min(8192);
            let last = at + n == offset + len;
            let mut d = bhs(0x05, if last { 0x80 } else { 0 }, n);
            d[16..20].copy_from_slice(&itt.to_be_bytes());
            d[20..24].copy_from_slice(&r2t[20..24]);
            d[36..40].copy_from_slice(&(sn as u32).to_be_bytes());
            d[40..44].copy_from_slice(&(at as u32).to_be_bytes());
            self.send(&d, &data[at..at + n]);
        }
    }

    /// READ(10); returns the status and the data.
    fn read10(&mut self, lba: u32, blocks: u16) -> (u8, Vec<u8>) {
        let itt = self.next_itt();
        let len = usize::from(blocks) * 512;
        let mut h = bhs(0x01, 0x80 | 0x40 | 0x01, 0);
        h[16..20].copy_from_slice(&itt.to_be_bytes());
        h[20..24].copy_from_slice(&(len as u32).to_be_bytes());
        h[24..28].copy_from_slice(&self.take_cmd_sn().to_be_bytes());
        h[32] = 0x28;
        h[34..38].copy_from_slice(&lba.to_be_bytes());
        h[39..41].copy_from_slice(&blocks.to_be_bytes());
        self.send(&h, &[]);
        let mut data = vec![0u8; len];
        loop {
            let (r, d) = self.recv();
            match r[0] & 0x3f {
                0x25 => {
                    let offset = u32::from_be_bytes(r[40..44].try_into().unwrap()) as usize;
                    data[offset..offset + d.len()].copy_from_slice(&d);
                    if r[1] & 0x01 != 0 {
                        return (r[3], data);
                    }
                }
                0x21 => return (r[3], data),
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    fn next_itt(&mut self) -> u32 {
        self.itt += 1;
        self.itt
    }

    fn take_cmd_sn(&mut self) -> u32 {
        self.cmd_sn += 1;
        self.cmd_sn - 1
    }

    fn logout(&mut self) {
        let itt = self.next_itt();
        let mut h = bhs(0x46, 0x80, 0);
        h[16..20].copy_from_slice(&itt.to_be_bytes());
        h[24..28].copy_from_slice(&self.take_cmd_sn().to_be_bytes());
        self.send(&h, &[]);
        let (r, _) = self.recv();
        assert_eq!(r[0] & 0x3f, 0x26);
        assert_eq!(r[2], 0);
        let mut rest = Vec::new();
        assert_eq!(self.sock.read_to_end(&mut rest).unwrap_or(0), 0);
    }
}

/// A deterministic pseudo-random byte stream (xorshift64*).
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn raw_round_trip_with_r2t_and_immediate_data() {
    let server = TestServer::start();
    for keys in [
        "MaxRecvDataSegmentLength=8192\0MaxBurstLength=65536\0FirstBurstLength=16384\0\
         ImmediateData=Yes\0InitialR2T=Yes\0",
        "MaxRecvDataSegmentLength=4096\0ImmediateData=No\0InitialR2T=Yes\0\
         MaxBurstLength=16384\0",
    ] {
        let mut c = RawInitiator::login(server.port, "vd0", keys);
        let data = random_bytes(256 * 1024, 7);
        let immediate = if keys.contains("ImmediateData=Yes") {
            8192
        } else {
            0
        };
        assert_eq!(c.write10(100, &data, immediate), 0);
        let (status, got) = c.read10(100, 512);
        assert_eq!(status, 0);
        assert!(got == data, "read back differs");
        // Past the end: CHECK CONDITION.
        let (status, _) = c.read10(0xffff_0000, 1);
        assert_eq!(status, 2);
        c.logout();
    }
    let summary = server.stop();
    assert_eq!(summary.failed, 0, "{summary:?}");
}

/// A connection holds at most its write-buffer budget of write data: with 1 MiB, two 512 KiB
/// writes get their R2Ts at once and a third only when the first has run.
#[test]
fn writes_beyond_the_buffer_budget_wait_for_their_r2t() {
    let server = TestServer::start_with(0, 1 << 20, Saved::default());
    let mut c = RawInitiator::login(
        server.port,
        "vd0",
        "MaxRecvDataSegmentLength=8192\0ImmediateData=No\0InitialR2T=Yes\0\
         MaxBurstLength=262144\0",
    );
    let len = 512 << 10;
    let data: Vec<Vec<u8>> = (0..3).map(|i| random_bytes(len, 40 + i)).collect();
    let itts: Vec<u32> = (0..3u32).map(|i| c.send_write10(i * 1024, len)).collect();
    let task = |h: &[u8; 48]| {
        let itt = u32::from_be_bytes(h[16..20].try_into().unwrap());
        itts.iter().position(|&t| t == itt).expect("a task of ours")
    };
    // Events in the order they arrive; R2Ts of writes other than the first are held back
    // until it has completed.
    let mut events = Vec::new();
    let mut held = Vec::new();
    let mut statuses = [None; 3];
    while statuses.iter().any(Option::is_none) {
        let (h, _) = c.recv();
        let t = task(&h);
        match h[0] & 0x3f {
            0x31 => {
                events.push(format!("R2T {t}"));
                if t == 0 || statuses[0].is_some() {
                    c.answer_r2t(itts[t], &h, &data[t]);
                } else {
                    held.push((t, h));
                }
            }
            0x21 => {
                events.push(format!("response {t}"));
                statuses[t] = Some(h[3]);
                if t == 0 {
                    for (t, h) in std::mem::take(&mut held) {
                        c.answer_r2t(itts[t], &h, &data[t]);
                    }
                }
            }
            other => panic!("unexpected opcode {other:#x}"),
        }
    }
    assert_eq!(statuses, [Some(0); 3], "{events:?}");
    // The third is solicited only once the first has all its data (its buffer is freed when
    // it has run, just before its response).
    let first_r2t_of_2 = events.iter().position(|e| e == "R2T 2").unwrap();
    let last_r2t_of_0 = events.iter().rposition(|e| e == "R2T 0").unwrap();
    assert!(
        first_r2t_of_2 > last_r2t_of_0,
        "the third write was solicited before the budget had room: {events:?}"
    );
    assert!(
        events[..2].iter().all(|e| e == "R2T 0" || e == "R2T 1"),
        "{events:?}"
    );
    for (i, d) in data.iter().enumerate() {
        let (status, got) = c.read10(i as u32 * 1024, 1024);
        assert_eq!(status, 0);
        assert!(got == *d, "write {i} read back differs");
    }
    c.logout();
    let summary = server.stop();
    assert_eq!(summary.failed, 0, "{summary:?}");
}

/// Persistent reservations outlive the target process: a reservation made before a restart
/// is reported and enforced after it (the state is saved at every change, and loaded before
/// the unit's first session runs a command).
#[test]
fn persistent_reservations_survive_a_restart() {
    let saved = Saved::default();
    let keys = "ImmediateData=Yes\0InitialR2T=No\0";
    let prout = |sa: u8, rtype: u8| [0x5f, sa, rtype, 0, 0, 0, 0, 0, 24, 0];
    let params = |key: u64, sa_key: u64| {
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa_key.to_be_bytes());
        p
    };
    let server = TestServer::start_with(0, DEFAULT_WRITE_BUFFER_BYTES, saved.clone());
    let mut a = RawInitiator::login(server.port, "vd0", keys);
    assert_eq!(a.command(&prout(0, 0), &params(0, 0xAAAA), 0).0, 0);
    assert_eq!(a.command(&prout(1, 3), &params(0xAAAA, 0), 0).0, 0);
    a.logout();
    server.stop();
    assert!(saved.lock().unwrap().contains_key("vd0"));

    let server = TestServer::start_with(0, DEFAULT_WRITE_BUFFER_BYTES, saved.clone());
    let mut b = RawInitiator::login_as(server.port, "iqn.other", "vd0", keys);
    // READ RESERVATION: exclusive access held with key 0xAAAA.
    let (status, d) = b.command(&[0x5e, 1, 0, 0, 0, 0, 0, 0x20, 0, 0], &[], 32);
    assert_eq!(status, 0);
    assert_eq!(u32::from_be_bytes(d[4..8].try_into().unwrap()), 16, "{d:?}");
    assert_eq!(&d[8..16], &0xAAAAu64.to_be_bytes());
    assert_eq!(d[21] & 0x0f, 3);
    // Another initiator port may not write: RESERVATION CONFLICT.
    let write = [0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    assert_eq!(b.command(&write, &[7u8; 512], 0).0, 0x18);
    b.logout();
    // The holder, back after the restart, still holds it and may write.
    let mut a = RawInitiator::login(server.port, "vd0", keys);
    assert_eq!(a.command(&write, &[7u8; 512], 0).0, 0);
    a.logout();
    let summary = server.stop();
    assert_eq!(summary.failed, 0, "{summary:?}");
}

#[test]
fn garbage_and_bad_logins_do_not_hurt_the_server() {
    let server = TestServer::start();
    // Not a login PDU first.
    let mut c = RawInitiator::connect(server.port);
    c.send(&bhs(0x01, 0x80, 0), &[]);
    let mut buf = [0u8; 64];
    assert_eq!(c.sock.read(&mut buf).unwrap_or(0), 0);
    // Unknown target: login status 0x0203 (not found).
    let mut c = RawInitiator::connect(server.port);
    let text = format!("InitiatorName=iqn.raw\0TargetName={PREFIX}:nope\0");
    c.send(&bhs(0x43, 0x81, text.len()), text.as_bytes());
    let (r, _) = c.recv();
    assert_eq!(u16::from_be_bytes([r[36], r[37]]), 0x0203);
    // Random bytes after login get Rejects or a close, never a crash.
    for seed in 0..20u64 {
        let mut c = RawInitiator::login(server.port, "vd1", "MaxRecvDataSegmentLength=8192\0");
        let mut junk = random_bytes(48, seed);
        junk[0] &= 0x3f;
        junk[4] = 0;
        junk[5] = 0;
        junk[6] = 0;
        junk[7] = 0;
        let _ = c.sock.write_all(&junk);
        let _ = c.sock.set_read_timeout(Some(Duration::from_millis(200)));
        let _ = c.sock.read(&mut buf);
    }
    // The server still works.
    let mut c = RawInitiator::login(server.port, "vd1", "MaxRecvDataSegmentLength=8192\0");
    assert_eq!(c.read10(0, 1).0, 0);
    c.logout();
    server.stop();
}

#[test]
fn libiscsi_conformance_suite() {
    if !have_tool("iscsi-test-cu") {
        return;
    }
    let server = TestServer::start();
    let t = libiscsi::run_suites(
        &libiscsi::suites(),
        "iqn.2026-11.io.cairn.test:a",
        &server.url("vd0"),
    );
    eprintln!(
        "iscsi-test-cu: {} suites, {} tests run, {} failed, {} of them skipped, {:?}",
        t.suites, t.run, t.failed, t.skipped, t.elapsed
    );
    assert!(t.suites > 40, "iscsi-test-cu lists {} suites", t.suites);
    assert!(t.failures.is_empty(), "{}", t.failures.join("\n"));
    server.stop();
}

/// Not a test: serves the test exports on `ISCSI_TEST_PORT` (default 3260) for a few minutes
/// (`ISCSI_TEST_SECS`, default 300), for running clients by hand:
/// `cargo test -p dataplane --test iscsi_clients serve_for_manual_runs -- --ignored`.
#[test]
#[ignore]
fn serve_for_manual_runs() {
    let port: u16 = std::env::var("ISCSI_TEST_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3260);
    let secs: u64 = std::env::var("ISCSI_TEST_SECS")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(300);
    let server = TestServer::start_on(port);
    eprintln!("serving on 127.0.0.1:{} for {secs} s", server.port);
    std::thread::sleep(Duration::from_secs(secs));
    server.stop();
}

#[test]
fn libiscsi_suites_with_header_digests() {
    if !have_tool("iscsi-test-cu") {
        return;
    }
    let server = TestServer::start();
    let url = format!("{}?header_digest=crc32c", server.url("vd0"));
    for suite in [
        "SCSI.Read10",
        "SCSI.Write10",
        "SCSI.CompareAndWrite",
        "iSCSI.iSCSIResiduals",
    ] {
        let out = run(Command::new("iscsi-test-cu")
            .args(["--test", suite, "--dataloss"])
            .arg(&url));
        let (tests, failed) = libiscsi::cunit_tests(&out);
        assert!(tests > 0 && failed == 0, "{suite} with CRC32C:\n{out}");
    }
    let summary = server.stop();
    assert_eq!(summary.failed, 0, "{summary:?}");
}
