//! Running libiscsi's conformance suite (`iscsi-test-cu`, Debian's libiscsi-bin) against a
//! target, shared by `dataplane/tests/iscsi_clients.rs` (an in-memory target) and
//! `tests/node_iscsi.rs` (a `cairn node run`), which include this file with `#[path]`.

use std::process::Command;
use std::time::{Duration, Instant};

/// Every `SCSI.*` and `iSCSI.*` suite `iscsi-test-cu -l` lists.
pub fn suites() -> Vec<String> {
    let out = Command::new("iscsi-test-cu")
        .arg("-l")
        .output()
        .expect("run iscsi-test-cu -l");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| {
            let parts: Vec<&str> = l.split('.').collect();
            parts.len() == 2 && (parts[0] == "SCSI" || parts[0] == "iSCSI")
        })
        .map(str::to_owned)
        .collect()
}

/// What a run of suites gave.
#[derive(Debug, Default)]
pub struct Tally {
    pub suites: usize,
    pub run: usize,
    pub failed: usize,
    pub skipped: usize,
    pub elapsed: Duration,
    /// The output of every suite that failed or printed no summary.
    pub failures: Vec<String>,
}

/// Runs each of `suites` with `--dataloss` as `initiator` against `url` (twice, for the
/// multipath tests).
pub fn run_suites(suites: &[String], initiator: &str, url: &str) -> Tally {
    let started = Instant::now();
    let mut tally = Tally {
        suites: suites.len(),
        ..Tally::default()
    };
    for suite in suites {
        let text = run_suite(suite, initiator, url);
        let (run, failed) = cunit_tests(&text);
        let skipped = skipped_tests(&text);
        eprintln!("{suite}: run {run} failed {failed} skipped {skipped}");
        tally.run += run;
        tally.failed += failed;
        tally.skipped += skipped;
        if failed > 0 || run == 0 {
            tally.failures.push(format!("=== {suite} ===\n{text}"));
        }
    }
    tally.elapsed = started.elapsed();
    tally
}

/// One suite's output with its exit status. A tool that stops before printing its summary is
/// run once more (seen once, for iSCSI.iSCSITMF on a loaded machine, with no failed assertion
/// printed).
fn run_suite(suite: &str, initiator: &str, url: &str) -> String {
    let mut attempt = 0;
    loop {
        let out = Command::new("iscsi-test-cu")
            .args(["--test", suite, "--dataloss", "-i", initiator, url, url])
            .output()
            .expect("run iscsi-test-cu");
        let text = format!(
            "{}{}\n(exit status: {})",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            out.status
        );
        if cunit_tests(&text).0 == 0 && attempt == 0 {
            eprintln!(
                "{suite}: no CUnit summary ({}); running it again",
                out.status
            );
            attempt += 1;
            continue;
        }
        return text;
    }
}

/// Tests that printed a `[SKIPPED]` line (CUnit counts them as passed): the text from one
/// `  Test: ` header to the next mentions it at least once.
pub fn skipped_tests(text: &str) -> usize {
    text.split("  Test: ")
        .skip(1)
        .filter(|test| test.contains("[SKIPPED]"))
        .count()
}

/// (tests run, tests failed) from a CUnit run summary.
pub fn cunit_tests(text: &str) -> (usize, usize) {
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"tests") && words.len() >= 6 {
            return (words[2].parse().unwrap_or(0), words[4].parse().unwrap_or(0));
        }
    }
    (0, 0)
}
