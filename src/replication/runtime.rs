//! A dedicated thread for the replication sessions (TLS, TCP, acks), so that the
//! runtime serving the guests' NBD requests does not spend its time on them.
//!
//! In `async` mode the sender is woken once per batch (not per write), so moving the
//! session to its own thread costs one cross-thread wake-up per batch and takes the
//! TLS encryption, the TCP send (on loopback also the receiver's softirq) and the ack
//! processing off the NBD thread; on 2 vCPUs that let the other vCPU do them in
//! parallel (measured in `docs/machine.md`, "Block path, session 9").
//!
//! The thread runs a current-thread tokio runtime until the [`ReplicationRuntime`]
//! is dropped; dropping it stops the runtime (its tasks are dropped: stop the
//! clients spawned on it first) and joins the thread.

use std::io;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// A thread running a tokio runtime for replication sessions.
pub struct ReplicationRuntime {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ReplicationRuntime {
    /// Starts the thread (named `name`) and its runtime.
    pub fn start(name: &str) -> io::Result<ReplicationRuntime> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                // Returns when the sender is dropped (see `Drop`).
                let _ = rt.block_on(stopped);
            })?;
        Ok(ReplicationRuntime {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The runtime to start replication clients on
    /// ([`super::ReplicationClient::start_on`]).
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

impl Drop for ReplicationRuntime {
    fn drop(&mut self) {
        // Dropping the sender ends the thread's `block_on`.
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the replication runtime thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_the_named_thread_and_drop_joins_it() {
        let rt = ReplicationRuntime::start("pc-repl-test").expect("runtime");
        let (tx, rx) = std::sync::mpsc::channel();
        rt.handle().spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            let _ = tx.send(std::thread::current().name().map(str::to_owned));
        });
        let name = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the task ran");
        assert_eq!(name.as_deref(), Some("pc-repl-test"));
        // A task that never ends does not keep the thread alive.
        rt.handle().spawn(std::future::pending::<()>());
        drop(rt);
    }
}
