//! `cairn node run` judged by libiscsi's conformance suite (`iscsi-test-cu`, Debian's
//! libiscsi-bin) over the node's real vdisk path (oplog, extent store, blockstore on a file):
//! every `SCSI.*` and `iSCSI.*` suite must report zero failures; the tests that only print
//! `[SKIPPED]` (CUnit counts them as passed) are counted and reported.

mod common;
#[path = "../dataplane/tests/support/libiscsi.rs"]
mod libiscsi;

use common::have;

use std::process::Command;
use std::time::{Duration, Instant};

/// A child process killed (-9) and reaped when dropped, so a failing test leaves no node behind.
struct KillOnDrop(std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Both fail harmlessly when the test already stopped and reaped it.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn libiscsi_conformance_suite_against_a_node() {
    if !have("iscsi-test-cu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let [port, nbd_port, grpc_port, data_port] = common::free_ports("127.0.0.1", 4)[..] else {
        unreachable!()
    };
    let cfg = dir.path().join("node.toml");
    // A small vdisk keeps whole-disk commands (WRITE SAME, UNMAP of everything) quick. Two
    // cores with a device each, vd0 on core 1's: the iSCSI sessions (core 0) reach it through
    // the mesh, and the multipath and reservation tests' sessions share one logical unit state.
    std::fs::write(
        &cfg,
        format!(
            "nbd_port = {}\ngrpc_port = {}\niscsi_port = {port}\ndata_port = {}\ncores = 2\n\
             [[device]]\npath = \"dev0.img\"\nsize = \"2GiB\"\n\
             [[device]]\npath = \"dev1.img\"\nsize = \"2GiB\"\n\
             [[vdisk]]\nname = \"vd0\"\nsize = \"256MiB\"\ndevice = 1\n",
            nbd_port, grpc_port, data_port
        ),
    )
    .unwrap();
    let log = dir.path().join("node.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut node = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(["node", "run", "--data-dir"])
            .arg(dir.path())
            .arg("--config")
            .arg(&cfg)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("cairn node: ready")
    {
        assert!(
            Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        said.contains("vdisk vd0 (id 1, 256.0 MiB) on core 1"),
        "vd0 is not on core 1:\n{said}"
    );
    let url = format!("iscsi://127.0.0.1:{port}/iqn.2026-11.io.cairn:vd0/0");
    let t = libiscsi::run_suites(&libiscsi::suites(), "iqn.2026-11.io.cairn.test:node", &url);
    println!(
        "iscsi-test-cu against cairn node: {} suites, {} tests run, {} failed, {} skipped, {:?}",
        t.suites, t.run, t.failed, t.skipped, t.elapsed
    );
    assert!(t.suites > 40, "iscsi-test-cu lists {} suites", t.suites);
    unsafe { kill(node.id() as i32, 15) };
    assert!(node.wait().unwrap().success());
    assert!(t.failures.is_empty(), "{}", t.failures.join("\n"));
}
