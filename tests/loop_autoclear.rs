//! Loop devices cannot leak (`src/loopdev.rs`): a process holding a mounted loop device
//! inside a private mount namespace is SIGKILLed, and afterwards `losetup -l` shows no
//! device of ours.
//!
//! Inside `unshare --mount --pid --fork --kill-child` (blockstack's
//! `spawn_in_private_namespaces`) a script mounts a tmpfs private to
//! the namespace (as nbdfuse's FUSE mount is in the real tests), puts two files on it and
//! mounts ext4 from each through a loop device:
//! - `auto`: attached by `pipecloud-loop attach` (autoclear), what the project uses;
//! - `control`: attached by plain `losetup`, the way that leaked. It shows the check
//!   sees a leak when there is one, and that [`reap_stale`] then removes it.
//!
//! Then the test SIGKILLs `unshare` (started by `setpriv`, which execs it): its child
//! (pid 1 of the namespace) is killed with it, every process of the namespace dies, no
//! trap or `Drop` runs. Needs root, the loop
//! driver, util-linux and e2fsprogs; a missing one FAILS the test.
#[path = "support/blockstack.rs"]
mod blockstack;

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use pipecloud::loopdev::{owned_name, reap_stale};

const SCRIPT: &str = r#"
set -euo pipefail
dir=$1; auto=$2; tool=$3
mkdir -p "$dir/ns" "$dir/mnt-auto" "$dir/mnt-control"
mount -t tmpfs -o size=64m pcloop-test "$dir/ns"
while [ ! -s "$dir/owner" ]; do sleep 0.05; done
control="pcloop-$(cat "$dir/owner")-control"
truncate -s 16M "$dir/ns/$auto" "$dir/ns/$control"
"$tool" attach "$dir/ns/$auto" -- sh -c \
  'mkfs.ext4 -q "$PIPECLOUD_LOOP" && mount "$PIPECLOUD_LOOP" "$1"' sh "$dir/mnt-auto"
c=$(losetup -f --show "$dir/ns/$control")
mkfs.ext4 -q "$c"
mount "$c" "$dir/mnt-control"
echo hello > "$dir/mnt-auto/f"
echo READY > "$dir/ready"
exec sleep 600
"#;

/// Devices (name, backing file) whose backing file's name contains `needle`, per `losetup -l`.
fn ours(needle: &str) -> Vec<String> {
    let (ok, out) = blockstack::run(Command::new("losetup").args([
        "-l",
        "-n",
        "--raw",
        "-O",
        "NAME,BACK-FILE",
    ]));
    assert!(ok, "losetup -l failed: {out}");
    out.lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("timed out waiting for {what}");
    false
}

/// Kills the namespace (if still there), detaches whatever is left of ours, removes the dir.
struct Cleanup {
    child: Option<Child>,
    dir: PathBuf,
    needles: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in &self.needles {
            for l in ours(n) {
                if let Some(dev) = l.split_whitespace().next() {
                    let _ = Command::new("losetup").arg("-d").arg(dev).status();
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn sigkilled_namespace_leaves_no_loop_device() {
    blockstack::require_mount();
    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("pcloop-test-{pid}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating the test directory");
    let auto = owned_name(pid, "auto");
    let mut cleanup = Cleanup {
        child: None,
        dir: dir.clone(),
        needles: vec![auto.clone()],
    };
    let args = [dir.as_os_str(), auto.as_ref()];
    let child = blockstack::spawn_in_private_namespaces(
        SCRIPT,
        "loop-autoclear",
        &args,
        &dir.join("script.out"),
    );
    let owner = child.id();
    cleanup.child = Some(child);
    let control = owned_name(owner, "control");
    cleanup.needles.push(control.clone());
    std::fs::write(dir.join("owner"), owner.to_string()).expect("writing the owner pid");

    let ready = wait_for("the script to mount both devices", 60, || {
        dir.join("ready").exists()
    });
    let text = || std::fs::read_to_string(dir.join("script.out")).unwrap_or_default();
    assert!(ready, "the script did not get ready:\n{}", text());
    assert_eq!(ours(&auto).len(), 1, "the autoclear device is not attached");
    assert_eq!(
        ours(&control).len(),
        1,
        "the control device is not attached"
    );

    // SIGKILL: no trap, no Drop, no cleanup of any kind runs in the namespace.
    let mut child = cleanup.child.take().expect("child");
    child.kill().expect("SIGKILL unshare");
    let _ = child.wait();

    let gone = wait_for("the autoclear device to go", 20, || ours(&auto).is_empty());
    let left = ours(&auto);
    eprintln!(
        "after SIGKILL: ours = {left:?}; control = {:?}",
        ours(&control)
    );
    assert!(gone, "autoclear device leaked after SIGKILL: {left:?}");

    // The control (plain losetup) did leak: the check can see a leak, and the reaper
    // (owner pid gone) removes it.
    let leaked = ours(&control);
    assert_eq!(leaked.len(), 1, "the control device should have leaked");
    assert!(
        leaked[0].contains(&format!("/{control}")),
        "unexpected backing file: {leaked:?}"
    );
    let reaped = reap_stale();
    assert!(!reaped.is_empty(), "reap_stale found nothing");
    assert!(
        wait_for("the control device to be reaped", 10, || ours(&control)
            .is_empty()),
        "reap_stale left the control device: {:?}",
        ours(&control)
    );
}
