//! A wake-up signal for a thread that sleeps in `poll(2)`: a non-blocking
//! `eventfd`. Any number of [`Wake::signal`] calls before the sleeper runs
//! collapse into one wake-up (the counter only saturates, nothing queues).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// An eventfd that other threads signal and one poller drains.
#[derive(Debug)]
pub struct Wake {
    fd: OwnedFd,
}

impl Wake {
    /// A fresh, unsignalled wake.
    pub fn new() -> io::Result<Wake> {
        // SAFETY: plain eventfd(2) call.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        Ok(Wake {
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
        })
    }

    /// Makes the descriptor readable (wakes a `poll` on it). Never blocks: a
    /// saturated counter (`EAGAIN`) is already readable.
    pub fn signal(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: valid fd and an 8-byte buffer.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    /// Clears the signal (reads the counter); no-op when not signalled.
    pub fn drain(&self) {
        let mut b = [0u8; 8];
        // SAFETY: valid fd and an 8-byte buffer.
        let _ = unsafe { libc::read(self.fd.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
    }
}

impl AsRawFd for Wake {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(w: &Wake) -> bool {
        let mut p = libc::pollfd {
            fd: w.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    #[test]
    fn signals_collapse_and_drain_clears() {
        let w = Wake::new().expect("eventfd");
        assert!(!readable(&w));
        w.signal();
        w.signal();
        assert!(readable(&w));
        w.drain();
        assert!(!readable(&w));
        w.drain();
        assert!(!readable(&w));
    }
}
