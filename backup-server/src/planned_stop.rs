//! A planned stop of a long-running command (`backup-server controller`):
//! SIGTERM or SIGINT sets a flag that the command's loop checks, so it can
//! finish what it is doing, give up what it holds (the controller resigns the
//! group's lease, docs/design.md §7) and exit, instead of dying mid-step.
//!
//! The handler only stores to an atomic (async-signal-safe). A second signal
//! while the flag is set ends the process at once (the default action): an
//! operator can always stop a stuck command. SIGKILL or a crash resigns
//! nothing: the lease then lapses.

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    if REQUESTED.swap(true, Ordering::SeqCst) {
        // SAFETY: signal(2) and raise(3) are async-signal-safe.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
    }
}

/// Installs the handler for SIGTERM and SIGINT.
pub fn install() -> std::io::Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only touches an atomic and async-signal-safe calls.
        let prev = unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
        if prev == libc::SIG_ERR {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether a planned stop was asked for.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}
