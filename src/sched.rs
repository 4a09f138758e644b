//! Scheduling policy of the agent's latency-critical threads
//! (`host.netpath_priority`, docs/design.md §18).

use std::io;

/// Puts the calling thread at `SCHED_FIFO` priority `priority`; 0 leaves it at
/// normal scheduling (`SCHED_OTHER`). Fails without `CAP_SYS_NICE` (or an
/// `RLIMIT_RTPRIO` that allows it).
pub fn set_current_thread_fifo(priority: u8) -> io::Result<()> {
    let (policy, p) = if priority == 0 {
        (libc::SCHED_OTHER, 0)
    } else {
        (libc::SCHED_FIFO, libc::c_int::from(priority))
    };
    let param = libc::sched_param { sched_priority: p };
    // SAFETY: sched_setscheduler on the calling thread (pid 0) with a valid param.
    if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread's scheduling policy and priority.
pub fn current_thread_policy() -> (libc::c_int, libc::c_int) {
    // SAFETY: plain queries of the calling thread.
    let policy = unsafe { libc::sched_getscheduler(0) };
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: valid out-pointer.
    unsafe { libc::sched_getparam(0, &mut param) };
    (policy, param.sched_priority)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_and_back_on_a_thread_of_its_own() {
        let r = std::thread::spawn(|| {
            set_current_thread_fifo(1)?;
            let on = current_thread_policy();
            set_current_thread_fifo(0)?;
            Ok::<_, io::Error>((on, current_thread_policy()))
        })
        .join()
        .expect("thread");
        // The suite runs as root (scripts/test.sh): a refusal is a failure.
        let (on, off) = r.expect("sched_setscheduler as root");
        assert_eq!(on, (libc::SCHED_FIFO, 1));
        assert_eq!(off, (libc::SCHED_OTHER, 0));
    }
}
