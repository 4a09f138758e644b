//! Dirty-page capture of the full-state mode (docs/design.md §9), proven on a
//! plain child process before QEMU is involved: the child maps a shared file with
//! the preload shim (`shim/`) loaded, writes a random set of pages each round and
//! stops (as a stopped guest does); the agent's `PAGEMAP_SCAN` wrapper must then
//! report every page whose bytes changed (found by comparing the whole file with
//! a shadow copy, independent of the child's word) and nothing but pages the child
//! wrote (a page rewritten with the same bytes may be reported: a write is a write).
//!
//! The check can fail: run with scans that do not re-protect, it reports pages of
//! earlier rounds and the check rejects it; without the shim the scanner refuses.
//!
//! The shim is `libpipecloud_shim.so` next to the test binary's directory
//! (`cargo build --release -p pipecloud-shim`, done by scripts/test.sh's workspace
//! build) or `PIPECLOUD_SHIM_SO`.

#[path = "support/qemu_guest.rs"]
#[allow(dead_code)]
mod qemu_guest;

use pipecloud::fullstate::pagemap::{find_ram_mapping, PagemapScanner, Rearm};
use qemu_guest::shim_path;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::ops::Range;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

const PAGE: usize = 4096;
const CHILD_ENV: &str = "PIPECLOUD_TEST_SCAN_CHILD_FILE";
const CHILD_PAGES_ENV: &str = "PIPECLOUD_TEST_SCAN_CHILD_PAGES";
const READY: &str = "PIPECLOUD-SCAN-CHILD-READY";

/// splitmix64.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A shared-memory file removed on drop (also on a failed assertion).
struct ShmFile(PathBuf);
impl ShmFile {
    fn new(tag: &str, pages: usize) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = PathBuf::from(format!(
            "/dev/shm/pipecloud-test-{tag}-{}-{n}",
            std::process::id()
        ));
        let f = std::fs::File::create(&path).expect("create /dev/shm file");
        f.set_len((pages * PAGE) as u64)
            .expect("size /dev/shm file");
        ShmFile(path)
    }
}
impl Drop for ShmFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The writer child, killed on drop.
struct Writer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    range: Range<u64>,
}
impl Writer {
    fn spawn(file: &ShmFile, pages: usize, preload: bool) -> Self {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "child_dirty_writer",
            "--ignored",
            "--nocapture",
            "-q",
        ])
        .env(CHILD_ENV, &file.0)
        .env(CHILD_PAGES_ENV, pages.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
        if preload {
            cmd.env("LD_PRELOAD", shim_path())
                .env(pipecloud_shim_env(), &file.0);
        }
        let mut child = cmd.spawn().expect("spawn writer child");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let range = loop {
            let mut line = String::new();
            assert!(
                stdout.read_line(&mut line).expect("read child") > 0,
                "writer child exited before it was ready"
            );
            if let Some(rest) = line.trim().strip_prefix(READY) {
                let mut it = rest.split_whitespace().map(|x| x.parse::<u64>().unwrap());
                let (a, n) = (it.next().unwrap(), it.next().unwrap());
                break a..a + n;
            }
        };
        Writer {
            child,
            stdin,
            stdout,
            range,
        }
    }

    /// One round: the child writes, then waits (stopped). Returns every page it touched.
    fn round(&mut self, seed: u64, changed: u64, same: u64) -> BTreeSet<u64> {
        writeln!(self.stdin, "{seed} {changed} {same}").unwrap();
        self.stdin.flush().unwrap();
        loop {
            let mut line = String::new();
            assert!(self.stdout.read_line(&mut line).unwrap() > 0, "child died");
            if let Some(rest) = line.trim().strip_prefix("DONE") {
                return rest
                    .split(',')
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| s.trim().parse().unwrap())
                    .collect();
            }
        }
    }
}
impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pipecloud_shim_env() -> &'static str {
    // The shim's `ENV_RAM_FILE` (a cdylib cannot be a Rust dependency).
    "PIPECLOUD_SHIM_RAM_FILE"
}

/// The writer: maps the file shared (through the interposed `mmap`) and, per
/// input line `seed changed same`, changes `changed` random pages and rewrites
/// `same` random pages with their own bytes; prints the touched pages.
#[test]
#[ignore = "helper process of the fullstate_capture tests"]
fn child_dirty_writer() {
    let path = std::env::var(CHILD_ENV).unwrap_or_else(|_| {
        panic!("child_dirty_writer is a helper process of the scan tests ({CHILD_ENV} unset)")
    });
    let pages: usize = std::env::var(CHILD_PAGES_ENV).unwrap().parse().unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let len = pages * PAGE;
    // SAFETY: a fresh shared mapping of a file we sized; unmapped at exit.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        )
    };
    assert_ne!(
        base,
        libc::MAP_FAILED,
        "child mmap: {}",
        std::io::Error::last_os_error()
    );
    let base = base.cast::<u8>();
    println!("{READY} {} {len}", base as u64);
    std::io::stdout().flush().unwrap();
    let mut stamp = 0u64;
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let v: Vec<u64> = line
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        let (mut rng, changed, same) = (Rng(v[0]), v[1], v[2]);
        let mut touched = BTreeSet::new();
        for i in 0..changed {
            // Runs of adjacent pages as well as scattered ones, and the edges.
            let p = match i % 7 {
                0 => 0,
                1 => pages as u64 - 1,
                2 if !touched.is_empty() => {
                    (touched.iter().next_back().unwrap() + 1) % pages as u64
                }
                _ => rng.below(pages as u64),
            };
            let word = rng.below((PAGE / 8) as u64) as usize;
            stamp += 1;
            // SAFETY: inside the mapping; volatile so every store happens.
            unsafe {
                let at = base.add(p as usize * PAGE + word * 8).cast::<u64>();
                at.write_volatile(stamp | (1 << 63));
            }
            touched.insert(p);
        }
        for _ in 0..same {
            let p = rng.below(pages as u64);
            let off = p as usize * PAGE + rng.below(PAGE as u64) as usize;
            // SAFETY: inside the mapping.
            unsafe {
                let at = base.add(off);
                at.write_volatile(at.read_volatile());
            }
            touched.insert(p);
        }
        let list: Vec<String> = touched.iter().map(|p| p.to_string()).collect();
        println!("DONE {}", list.join(","));
        std::io::stdout().flush().unwrap();
    }
}

/// Pages (indices) covered by relative byte ranges.
fn pages_of(ranges: &[Range<u64>]) -> BTreeSet<u64> {
    ranges
        .iter()
        .flat_map(|r| r.start / PAGE as u64..r.end.div_ceil(PAGE as u64))
        .collect()
}

/// Every changed page reported, every reported page touched.
fn check_round(
    changed: &BTreeSet<u64>,
    reported: &BTreeSet<u64>,
    touched: &BTreeSet<u64>,
) -> Result<(), String> {
    let missed: Vec<_> = changed.difference(reported).collect();
    if !missed.is_empty() {
        return Err(format!("changed pages not reported: {missed:?}"));
    }
    let extra: Vec<_> = reported.difference(touched).collect();
    if !extra.is_empty() {
        return Err(format!("reported pages nobody wrote: {extra:?}"));
    }
    Ok(())
}

/// Runs `rounds` rounds; returns the first violation.
fn run_rounds(pages: usize, rounds: u64, rearm: Rearm, seed: u64) -> Result<u64, String> {
    let file = ShmFile::new("scan", pages);
    let mut w = Writer::spawn(&file, pages, true);
    let pid = w.child.id();
    let range = find_ram_mapping(pid, &file.0).expect("find the child's mapping");
    assert_eq!(
        range, w.range,
        "maps disagrees with the child's own address"
    );
    let mut scanner = PagemapScanner::open(pid).expect("open pagemap");
    let view = std::fs::read(&file.0).unwrap();
    let mut shadow = view.clone();
    let mut out = Vec::new();
    scanner
        .scan(range.clone(), Rearm::Yes, &mut out)
        .expect("first scan");
    if !out.is_empty() {
        return Err(format!("a fresh, unwritten mapping reports {out:?}"));
    }
    let mut rng = Rng(seed);
    let mut total = 0;
    for round in 0..rounds {
        let changed_n = match round % 10 {
            0 => 0,
            1 => pages as u64, // about two thirds of all pages
            _ => rng.below(300),
        };
        let touched = w.round(rng.next(), changed_n, rng.below(20));
        out.clear();
        scanner.scan(range.clone(), rearm, &mut out).expect("scan");
        let reported = pages_of(&out);
        let now = std::fs::read(&file.0).unwrap();
        let changed: BTreeSet<u64> = (0..pages as u64)
            .filter(|&p| {
                let r = p as usize * PAGE..(p as usize + 1) * PAGE;
                now[r.clone()] != shadow[r]
            })
            .collect();
        check_round(&changed, &reported, &touched).map_err(|e| format!("round {round}: {e}"))?;
        total += changed.len() as u64;
        shadow = now;
    }
    Ok(total)
}

#[test]
fn scan_reports_exactly_the_written_pages() {
    let rounds = 200;
    let changed = run_rounds(16_384, rounds, Rearm::Yes, 0x5eed).unwrap_or_else(|e| panic!("{e}"));
    println!("fullstate scan: {rounds} rounds, {changed} changed pages, 0 missed");
}

#[test]
fn scan_that_does_not_rearm_is_caught() {
    let err = run_rounds(1024, 20, Rearm::No, 7).expect_err("stale pages must be reported");
    assert!(err.contains("reported pages nobody wrote"), "{err}");
}

#[test]
fn scan_refuses_an_untracked_mapping() {
    let pages = 64;
    let file = ShmFile::new("untracked", pages);
    let w = Writer::spawn(&file, pages, false);
    let mut scanner = PagemapScanner::open(w.child.id()).expect("open pagemap");
    let mut out = Vec::new();
    let err = scanner
        .scan(w.range.clone(), Rearm::Yes, &mut out)
        .expect_err("a mapping without the shim must not scan as clean");
    assert_eq!(err.raw_os_error(), None, "context added: {err}");
    assert!(err.to_string().contains("not tracked"), "{err}");
}
