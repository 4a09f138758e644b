//! Running a piece of code inside another network namespace.
//!
//! Sockets belong to the network namespace of the thread that creates them, and
//! `/proc/thread-self/net/...` shows the namespace of the reading thread. So an
//! agent (or a test) can open its NFQUEUE socket in a dom0 namespace without
//! moving its runtime there: [`in_netns`] runs a closure on a short-lived thread
//! that first joins the namespace (`setns(CLONE_NEWNET)`), and the file
//! descriptors it returns keep working from any thread.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Runs `f` inside the network namespace `netns` (a path such as
/// `/run/netns/NAME` or `/proc/PID/ns/net`), or directly when `netns` is `None`.
///
/// The closure runs on a fresh thread that joins the namespace and then ends,
/// so the caller's thread never changes namespace. Errors: the namespace cannot
/// be opened or joined (needs `CAP_SYS_ADMIN`), or the thread panicked.
pub fn in_netns<T, F>(netns: Option<&Path>, f: F) -> io::Result<T>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let Some(path) = netns else {
        return Ok(f());
    };
    let ns = File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("open netns {}: {e}", path.display())))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns on a valid namespace fd; affects only this thread.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(
                    e.kind(),
                    format!("setns {}: {e}", path.display()),
                ));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| io::Error::other("thread inside the network namespace panicked"))?
    })
}
