//! The tools of the block-path stack for integration tests: requiring a tool (a
//! missing one FAILS the test, naming the Debian package to install), running one,
//! deterministic random data, and the nbdfuse + loop + ext4 script (mkfs, fsck -n,
//! files with checksums, remount) run in a private mount namespace with a guard that
//! tears it down even when the test fails. Include it with
//!
//! ```ignore
//! #[path = "support/blockstack.rs"]
//! mod blockstack;
//! ```
//!
//! There is no skip: a test that cannot run its check has not passed it. There is
//! no environment switch either; `scripts/install-deps.sh` installs every tool here.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The Debian (12) package that installs `tool`. Panics for a tool this file does
/// not know: add it here and to `scripts/install-deps.sh`.
pub fn debian_package(tool: &str) -> &'static str {
    match tool {
        "nbdinfo" | "nbdcopy" | "nbdfuse" => "libnbd-bin",
        "nbdkit" => "nbdkit",
        "qemu-io" | "qemu-img" => "qemu-utils",
        "fusermount3" => "fuse3",
        "losetup" => "mount",
        "unshare" | "mountpoint" | "nsenter" | "setpriv" => "util-linux",
        "mkfs.ext4" | "fsck.ext4" | "e2fsck" | "debugfs" => "e2fsprogs",
        "qemu-system-x86_64" => "qemu-system-x86",
        "fio" => "fio",
        _ => panic!("blockstack: no Debian package known for `{tool}`; add it to debian_package()"),
    }
}

/// Panics unless `tool` is an executable file in a directory of `PATH` (where
/// `Command` and the mount script look for it), naming the package to install.
pub fn require(tool: &str) {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if on_path {
        return;
    }
    let pkg = debian_package(tool);
    if let Some(d) = ["/usr/sbin", "/sbin"]
        .iter()
        .find(|d| Path::new(d).join(tool).is_file())
    {
        panic!("`{tool}` is in {d}, which is not on PATH: add {d} to PATH");
    }
    panic!(
        "`{tool}` is not installed: install the Debian package `{pkg}` \
         (scripts/install-deps.sh installs everything the tests use)"
    );
}

pub fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs `qemu-io -f raw` with one `-c` per command against `uri`; panics if it fails
/// or reports a failed command (a `read -P` that does not match).
pub fn qemu_io(uri: &str, commands: &[&str]) {
    require("qemu-io");
    let mut cmd = Command::new("qemu-io");
    cmd.arg("-f").arg("raw");
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(uri);
    let (ok, out) = run(&mut cmd);
    assert!(ok, "qemu-io failed: {out}");
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io reported a failure: {out}"
    );
}

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        v.extend_from_slice(&seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Panics unless this process can build the mount stack: its tools (named with
/// their Debian packages), root, `/dev/fuse` and `/dev/loop-control`.
pub fn require_mount() {
    for tool in [
        "nbdfuse",
        "fusermount3",
        "losetup",
        "mkfs.ext4",
        "fsck.ext4",
        "unshare",
        "setpriv",
        "mountpoint",
    ] {
        require(tool);
    }
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    assert!(
        root,
        "the mount test needs root (mounts, loop devices, FUSE): run the tests as root"
    );
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: install the Debian package `fuse3` and create the node \
         (scripts/install-deps.sh does: mknod -m 666 /dev/fuse c 10 229)"
    );
    assert!(
        Path::new("/dev/loop-control").exists(),
        "/dev/loop-control is missing: load the loop driver (modprobe loop)"
    );
}

/// The mount stack, run by [`mount_test`] as `bash -c MOUNT_SCRIPT mount-test URI DIR
/// CONNS NAME TOOL`: nbdfuse exposes the export as `DIR/fuse/NAME` (an owned name of
/// `src/loopdev.rs`, so a stale device of it can be reaped), and `pipecloud-loop attach`
/// (TOOL) puts it on an autoclear loop device, held while `stage` runs: the device goes
/// when `stage` has ended and nothing is mounted from it, even when everything here is
/// SIGKILLed (the mounts of the private namespace go with its last process).
pub const MOUNT_SCRIPT: &str = r#"
set -euo pipefail
uri=$1; dir=$2; conns=$3; name=$4; tool=$5
export dir
mkdir -p "$dir/fuse" "$dir/mnt"
fpid=""
backed() { grep -qsx "$dir/fuse/$name" /sys/block/loop*/loop/backing_file; }
cleanup() {
  set +e
  if mountpoint -q "$dir/mnt"; then umount "$dir/mnt"; fi
  # Unmounted and no holder left: the autoclear device detaches; wait for it.
  for _ in $(seq 200); do backed || break; sleep 0.05; done
  if mountpoint -q "$dir/fuse"; then fusermount3 -u "$dir/fuse"; fi
  if [ -n "$fpid" ]; then
    for _ in $(seq 200); do kill -0 "$fpid" 2>/dev/null || break; sleep 0.05; done
    kill "$fpid" 2>/dev/null
  fi
}
trap cleanup EXIT
trap 'exit 143' TERM INT
stage() {
  set -euo pipefail
  loop=$PIPECLOUD_LOOP
  echo "loop device: $loop"
  mkfs.ext4 -q "$loop"
  fsck.ext4 -n -f "$loop"
  mount "$loop" "$dir/mnt"
  for i in $(seq 1 16); do head -c $((256 * 1024 + i)) /dev/urandom > "$dir/mnt/file$i"; done
  mkdir "$dir/mnt/sub"; echo hello > "$dir/mnt/sub/hello"
  (cd "$dir/mnt" && sha256sum file* sub/hello) > "$dir/sums"
  sync
  umount "$dir/mnt"
  fsck.ext4 -n -f "$loop"
  mount "$loop" "$dir/mnt"
  (cd "$dir/mnt" && sha256sum -c --quiet "$dir/sums")
  umount "$dir/mnt"
}
export -f stage
nbdfuse -C "$conns" -P "$dir/nbdfuse.pid" "$dir/fuse/$name" "$uri" </dev/null >"$dir/nbdfuse.log" 2>&1 &
fpid=$!
for _ in $(seq 200); do [ -s "$dir/nbdfuse.pid" ] && break; sleep 0.05; done
[ -s "$dir/nbdfuse.pid" ] || { echo "nbdfuse did not start"; cat "$dir/nbdfuse.log"; exit 1; }
"$tool" attach --direct-io "$dir/fuse/$name" -- bash -c stage
echo MOUNT-TEST-OK
"#;

/// Spawns `bash -c script name ARGS...` (its output to the file `out`) in private mount
/// and pid namespaces that die with the spawning thread, however it dies: `setpriv
/// --pdeathsig` gives `unshare` SIGKILL then, and `--kill-child` passes it on to the
/// namespace's pid 1 (the script), so every process of the namespace dies and its mounts
/// go. SIGKILL to the returned child does the same. The script's last argument is
/// `pipecloud-loop` (`src/bin/pipecloud-loop.rs`).
pub fn spawn_in_private_namespaces(
    script: &str,
    name: &str,
    args: &[&std::ffi::OsStr],
    out: &Path,
) -> std::process::Child {
    let out = std::fs::File::create(out).expect("creating the script's output file");
    Command::new("setpriv")
        .args([
            "--pdeathsig",
            "KILL",
            "--",
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--pid",
            "--fork",
            "--kill-child",
            "bash",
            "-c",
            script,
            name,
        ])
        .args(args)
        .arg(env!("CARGO_BIN_EXE_pipecloud-loop"))
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("output fd"))
        .stderr(out)
        .spawn()
        .expect("spawning setpriv + unshare")
}

/// Kills a still-running script (its namespace dies with it) and detaches any loop
/// device left on our file (`name`, seen from anywhere).
pub struct MountGuard {
    child: Option<std::process::Child>,
    name: String,
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if c.try_wait().ok().flatten().is_none() {
                // SIGTERM to the script (pid 1 of its pid namespace, the child of
                // `unshare`) lets its EXIT trap tear down in order.
                let children = format!("/proc/{0}/task/{0}/children", c.id());
                if let Some(script) = std::fs::read_to_string(children)
                    .ok()
                    .and_then(|s| s.split_whitespace().next().map(str::to_string))
                {
                    let _ = Command::new("kill").arg("-TERM").arg(script).status();
                }
                let deadline = Instant::now() + Duration::from_secs(30);
                while Instant::now() < deadline && c.try_wait().ok().flatten().is_none() {
                    std::thread::sleep(Duration::from_millis(100));
                }
                // SIGKILL to `unshare` kills its child, hence the whole namespace.
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // Belt and braces: no loop device may outlive the test.
        for (dev, backing) in pipecloud::loopdev::list() {
            if backing.ends_with(&format!("/{}", self.name)) {
                eprintln!("mount test: detaching leftover {}", dev.display());
                let _ = Command::new("losetup").arg("-d").arg(&dev).status();
            }
        }
    }
}

/// Runs [`MOUNT_SCRIPT`] against the NBD export at `uri` with `conns` nbdfuse
/// connections, in private mount and pid namespaces that die with this process (even by
/// SIGKILL), its files in `work`. Reaps stale loop devices of earlier runs first.
/// Panics unless the script succeeded within 5 minutes.
pub fn mount_test(uri: &str, work: &Path, conns: u32) {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    pipecloud::loopdev::reap_stale();
    std::fs::create_dir_all(work).expect("creating the mount test's directory");
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = pipecloud::loopdev::owned_name(std::process::id(), &format!("mount{n}"));
    let mut guard = MountGuard {
        child: None,
        name: name.clone(),
    };
    let out_path = work.join("script.out");
    let conns = conns.to_string();
    let args = [
        uri.as_ref(),
        work.as_os_str(),
        conns.as_ref(),
        name.as_ref(),
    ];
    let child = spawn_in_private_namespaces(MOUNT_SCRIPT, "mount-test", &args, &out_path);
    guard.child = Some(child);
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(s) = guard
            .child
            .as_mut()
            .and_then(|c| c.try_wait().expect("waiting for the mount script"))
        {
            break Some(s);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    eprintln!("--- mount script (connections={conns}) ---\n{text}---");
    assert!(status.is_some(), "mount script timed out");
    assert!(
        status.is_some_and(|s| s.success()) && text.contains("MOUNT-TEST-OK"),
        "mount script failed"
    );
}
