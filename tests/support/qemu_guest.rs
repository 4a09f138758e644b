//! A small QEMU guest for the capture tests and the capture benchmark: the test
//! guest's kernel (`scripts/build-guest.sh` → `$CARGO_TARGET_DIR/guest/vmlinuz`,
//! or `PIPECLOUD_GUEST_KERNEL`) with an initramfs of our own (static busybox and a
//! shell `/init`) whose memory load we choose: `Load::Light` sleeps,
//! `Load::Heavy` rewrites a 5,000-page tmpfs file with random bytes, then sleeps 100 ms, in a loop;
//! `Load::Dirty(pattern)` runs the test guest's service (`guest-service`, static, built by
//! `scripts/build-guest.sh`) with `--dirty-mib 64 --dirty-pages-per-s 12800 --dirty-pattern P`.
//! Guest RAM is a `/dev/shm` file shared with the agent, the preload shim tracks
//! it; QMP on a unix socket. Everything is removed on drop (QEMU killed).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pipecloud::fullstate::capture::GuestSpec;

/// The shim library next to the test binary's directory, or `PIPECLOUD_SHIM_SO`;
/// a missing one fails naming the build step.
pub fn shim_path() -> PathBuf {
    if let Some(p) = std::env::var_os("PIPECLOUD_SHIM_SO") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> or target/<profile>/examples/<example>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let so = dir.join("libpipecloud_shim.so");
    assert!(
        so.exists(),
        "{} is missing: build it first with `cargo build --release -p pipecloud-shim` \
         (scripts/test.sh builds the whole workspace) or set PIPECLOUD_SHIM_SO",
        so.display()
    );
    so
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Load {
    Light,
    Heavy,
    /// guest-service's workload thread with this `--dirty-pattern` (`byte`, `record`).
    Dirty(&'static str),
}

/// The static guest service (`scripts/build-guest.sh` builds it).
fn guest_service() -> PathBuf {
    let p = target_dir().join("x86_64-unknown-linux-gnu/release/pipecloud-guest-service");
    assert!(
        p.exists(),
        "{} is missing: build the test guest with scripts/build-guest.sh",
        p.display()
    );
    p
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().unwrap();
            exe.ancestors().nth(3).unwrap().to_owned()
        })
}

fn require(cmd: &str, package: &str) -> PathBuf {
    for d in ["/usr/bin", "/usr/sbin", "/bin", "/sbin"] {
        let p = Path::new(d).join(cmd);
        if p.exists() {
            return p;
        }
    }
    panic!("`{cmd}` is missing: install the Debian package {package} (scripts/install-deps.sh)");
}

/// The guest kernel.
pub fn kernel() -> PathBuf {
    if let Some(k) = std::env::var_os("PIPECLOUD_GUEST_KERNEL") {
        return k.into();
    }
    let k = target_dir().join("guest/vmlinuz");
    assert!(
        k.exists(),
        "{} is missing: build the test guest with scripts/build-guest.sh \
         (or set PIPECLOUD_GUEST_KERNEL to a Debian cloud kernel)",
        k.display()
    );
    k
}

const INIT: &str = r#"#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t devtmpfs dev /dev 2>/dev/null
$B mount -t tmpfs -o size=64m tmpfs /tmp
echo PCGUEST-READY
case "$($B cat /proc/cmdline)" in
*pcload=heavy*)
  while :; do
    $B dd if=/dev/urandom of=/tmp/f bs=4096 count=5000 conv=notrunc 2>/dev/null
    $B usleep 100000
  done ;;
*pcload=dirty-*)
  p="$($B cat /proc/cmdline)"; p="${p##*pcload=dirty-}"; p="${p%% *}"
  /bin/svc --listen 0.0.0.0:7000 --log /tmp/log --dirty-mib 64 --dirty-pages-per-s 12800 --dirty-pattern "$p" ;;
*) while :; do $B sleep 1; done ;;
esac
"#;

/// Appends one newc cpio entry.
fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        data.len() as u32,
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        write!(out, "{f:08x}").unwrap();
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// Writes the initramfs to `path`.
pub fn write_initramfs(path: &Path, load: Load) {
    let busybox = require("busybox", "busybox-static");
    let bb = std::fs::read(&busybox).unwrap();
    let mut c = Vec::with_capacity(bb.len() + 4096);
    for (i, d) in ["bin", "dev", "proc", "tmp"].iter().enumerate() {
        cpio_entry(&mut c, i as u32 + 1, d, 0o040_755, (0, 0), &[]);
    }
    cpio_entry(&mut c, 10, "dev/console", 0o020_600, (5, 1), &[]);
    cpio_entry(&mut c, 11, "bin/busybox", 0o100_755, (0, 0), &bb);
    cpio_entry(&mut c, 12, "init", 0o100_755, (0, 0), INIT.as_bytes());
    if let Load::Dirty(_) = load {
        let svc = std::fs::read(guest_service()).unwrap();
        cpio_entry(&mut c, 13, "bin/svc", 0o100_755, (0, 0), &svc);
    }
    cpio_entry(&mut c, 0, "TRAILER!!!", 0, (0, 0), &[]);
    std::fs::write(path, c).unwrap();
}

fn host_khz() -> u64 {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find_map(|l| {
            l.strip_prefix("cpu MHz")?
                .split(':')
                .nth(1)?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(2_000_000, |mhz| (mhz * 1000.0) as u64)
}

/// A running guest.
pub struct TestGuest {
    child: Child,
    dir: PathBuf,
    pub spec: GuestSpec,
    pub ram_mib: u64,
}

impl TestGuest {
    /// Boots a guest with `ram_mib` MiB and `load`, waits until its init runs.
    pub fn boot(tag: &str, ram_mib: u64, load: Load) -> TestGuest {
        let qemu = require("qemu-system-x86_64", "qemu-system-x86");
        let kernel = kernel();
        let shim = shim_path();
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{tag}-{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(format!("pipecloud-guest-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let ram_file = PathBuf::from(format!("/dev/shm/pipecloud-test-{id}.ram"));
        let spec = GuestSpec {
            name: tag.to_owned(),
            qmp: dir.join("qmp.sock"),
            ram_file: ram_file.clone(),
            device_file: PathBuf::from(format!("/dev/shm/pipecloud-test-{id}.dev")),
        };
        let initrd = dir.join("initrd.cpio");
        write_initramfs(&initrd, load);
        let console = dir.join("console.log");
        let load_arg = match load {
            Load::Light => "pcload=light".to_owned(),
            Load::Heavy => "pcload=heavy".to_owned(),
            Load::Dirty(p) => format!("pcload=dirty-{p}"),
        };
        let child = Command::new(qemu)
            .env("LD_PRELOAD", &shim)
            .env("PIPECLOUD_SHIM_RAM_FILE", &ram_file)
            .args([
                "-machine",
                "microvm,memory-backend=mem",
                "-accel",
                "tcg",
                "-smp",
                "1",
            ])
            .args(["-m", &format!("{ram_mib}M")])
            .arg("-object")
            .arg(format!(
                "memory-backend-file,id=mem,size={ram_mib}M,mem-path={},share=on",
                ram_file.display()
            ))
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initrd)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 panic=-1 tsc_early_khz={} quiet {load_arg}",
                host_khz()
            ))
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", spec.qmp.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("qemu.stderr")).unwrap(),
            ))
            .spawn()
            .expect("spawn qemu-system-x86_64");
        let mut g = TestGuest {
            child,
            dir,
            spec,
            ram_mib,
        };
        // A hang guard, not a timing check: a guest that never boots fails here.
        let began = Instant::now();
        loop {
            let log = std::fs::read_to_string(&console).unwrap_or_default();
            if log.contains("PCGUEST-READY") {
                break;
            }
            if let Ok(Some(st)) = g.child.try_wait() {
                panic!("QEMU exited ({st}) before the guest booted: {}", g.stderr());
            }
            assert!(
                began.elapsed() < Duration::from_secs(120),
                "guest did not boot in 120 s; console:\n{log}\nqemu: {}",
                g.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        g
    }

    /// QEMU's stderr so far (the shim's log line is there).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("qemu.stderr")).unwrap_or_default()
    }
}

impl Drop for TestGuest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.spec.ram_file);
        let _ = std::fs::remove_file(&self.spec.device_file);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
