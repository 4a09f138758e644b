//! The stateful service of the test guest (issue 21 §1): state in memory and on disk.
//!
//! A TCP server. Every request is one line; the service then
//!
//! 1. increments its in-memory counter,
//! 2. appends `<counter> <request>` as one line to its log file (on the guest's
//!    protected ext4 disk) and `fdatasync`s it,
//! 3. replies with `<counter>\n`.
//!
//! So a reply the client has seen names a counter value that is both in the
//! guest's memory and durable on its disk: after a full-state failover, the
//! resumed guest must continue the counter exactly after the last reply the
//! client received, and every acknowledged request must be in the log. The
//! steps run under one lock, so counter values and log lines are in the same
//! order whatever the number of connections.
//!
//! `--dirty-mib N --dirty-pages-per-s R` adds a workload thread that keeps
//! writing one byte to each of R pages a second spread over an N MiB buffer
//! (a "heavy" guest for the full-state figures; 0: none, the "light" guest).
//! `--dirty-pattern record` makes each touched page harsher to compress (issue
//! 22 §2): a random record of 64–256 random bytes at a random place of the page,
//! and one touched page in [`REWRITE_ONE_IN`] rewritten whole with random bytes;
//! `byte` (the default) is the one-byte pattern above.
//!
//! Usage: `pipecloud-guest-service --listen ADDR:PORT --log FILE
//! [--dirty-mib N] [--dirty-pages-per-s R] [--dirty-pattern byte|record]`. Kept
//! to the standard library: it is linked statically into the guest's initramfs.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest request line; a longer one closes the connection.
const MAX_REQUEST_BYTES: usize = 4096;
/// Most connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;
const PAGE: usize = 4096;
/// With `--dirty-pattern record`: one touched page in this many is rewritten whole.
const REWRITE_ONE_IN: u64 = 8;

/// How the workload thread changes a page it touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pattern {
    /// One byte (the round number).
    Byte,
    /// A 64–256-byte random record, or (one in [`REWRITE_ONE_IN`]) the whole page.
    Record,
}

struct Options {
    listen: String,
    log: PathBuf,
    dirty_mib: usize,
    dirty_pages_per_s: u64,
    dirty_pattern: Pattern,
}

fn parse_args() -> Result<Options, String> {
    let mut listen = None;
    let mut log = None;
    let mut dirty_mib = 0;
    let mut dirty_pages_per_s = 0;
    let mut dirty_pattern = Pattern::Byte;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--listen" => listen = Some(value()?),
            "--log" => log = Some(PathBuf::from(value()?)),
            "--dirty-mib" => {
                dirty_mib = value()?.parse().map_err(|e| format!("--dirty-mib: {e}"))?
            }
            "--dirty-pages-per-s" => {
                dirty_pages_per_s = value()?
                    .parse()
                    .map_err(|e| format!("--dirty-pages-per-s: {e}"))?
            }
            "--dirty-pattern" => {
                dirty_pattern = match value()?.as_str() {
                    "byte" => Pattern::Byte,
                    "record" => Pattern::Record,
                    p => return Err(format!("--dirty-pattern: {p} is not byte or record")),
                }
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Options {
        listen: listen.ok_or("--listen ADDR:PORT is required")?,
        log: log.ok_or("--log FILE is required")?,
        dirty_mib,
        dirty_pages_per_s,
        dirty_pattern,
    })
}

/// The state every request changes: the counter and the log that records it.
struct State {
    counter: u64,
    log: File,
}

impl State {
    /// Steps 1–2 of the module doc: the new counter value, once it is durable.
    fn record(&mut self, request: &str) -> std::io::Result<u64> {
        self.counter += 1;
        writeln!(self.log, "{} {request}", self.counter)?;
        self.log.sync_data()?;
        Ok(self.counter)
    }
}

fn serve(stream: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        let mut limited = (&mut reader).take(MAX_REQUEST_BYTES as u64 + 1);
        if limited.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') {
            return Ok(()); // over the limit or cut short: drop the connection
        }
        let request = line.trim_end();
        let value = {
            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
            s.record(request)?
        };
        out.write_all(format!("{value}\n").as_bytes())?;
    }
}

/// A small xorshift generator (the service keeps to the standard library).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, out: &mut [u8]) {
        for c in out.chunks_mut(8) {
            let x = self.next().to_le_bytes();
            c.copy_from_slice(&x[..c.len()]);
        }
    }
}

/// Changes one page as `pattern` says.
fn touch(page: &mut [u8], pattern: Pattern, round: u8, rng: &mut Rng) {
    match pattern {
        Pattern::Byte => page[0] = round,
        Pattern::Record if rng.next().is_multiple_of(REWRITE_ONE_IN) => rng.fill(page),
        Pattern::Record => {
            let len = 64 + (rng.next() % 193) as usize;
            let at = (rng.next() % (PAGE - len + 1) as u64) as usize;
            rng.fill(&mut page[at..at + len]);
        }
    }
}

/// Touches `pages_per_s` pages a second over a `mib` MiB buffer, forever.
fn dirty_memory(mib: usize, pages_per_s: u64, pattern: Pattern) {
    let mut buf = vec![0u8; mib << 20];
    let pages = buf.len() / PAGE;
    if pages == 0 || pages_per_s == 0 {
        return;
    }
    let tick = Duration::from_millis(10);
    let per_tick = (pages_per_s / 100).max(1) as usize;
    let (mut page, mut round) = (0usize, 0u8);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let mut rng = Rng(seed | 1);
    let mut next = Instant::now();
    loop {
        for _ in 0..per_tick {
            touch(
                &mut buf[page * PAGE..(page + 1) * PAGE],
                pattern,
                round,
                &mut rng,
            );
            page += 1;
            if page == pages {
                page = 0;
                round = round.wrapping_add(1);
            }
        }
        next += tick;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
}

fn run(o: Options) -> Result<(), String> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&o.log)
        .map_err(|e| format!("cannot open log {}: {e}", o.log.display()))?;
    let state = Arc::new(Mutex::new(State { counter: 0, log }));
    let listener =
        TcpListener::bind(&o.listen).map_err(|e| format!("cannot listen on {}: {e}", o.listen))?;
    if o.dirty_mib > 0 && o.dirty_pages_per_s > 0 {
        let (mib, rate, pattern) = (o.dirty_mib, o.dirty_pages_per_s, o.dirty_pattern);
        std::thread::spawn(move || dirty_memory(mib, rate, pattern));
    }
    eprintln!("pipecloud-guest-service: listening on {}", o.listen);
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        if active.load(std::sync::atomic::Ordering::SeqCst) >= MAX_CONNECTIONS {
            continue; // dropping the stream closes it
        }
        active.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let (state, active) = (Arc::clone(&state), Arc::clone(&active));
        std::thread::spawn(move || {
            if let Err(e) = serve(stream, &state) {
                eprintln!("pipecloud-guest-service: connection: {e}");
            }
            active.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        });
    }
    Ok(())
}

fn main() -> ExitCode {
    match parse_args().and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pipecloud-guest-service: {e}");
            ExitCode::FAILURE
        }
    }
}
