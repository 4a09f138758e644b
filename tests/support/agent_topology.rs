//! The topology the agent-binary tests start `pipecloud agent` with: one group,
//! one host `h`, one writer machine `m` (10.10.0.10, outbound) and one protected
//! disk, replicating to a backup server whose credentials the test supplies.
//! One copy of that file for every test that runs the real agent; a test adds
//! `[policy]` or `[[host]]` lines through [`OneDisk::policy`] / [`OneDisk::host`].

#![allow(dead_code)]

use std::fmt::Write as _;
use std::path::Path;

/// A one-machine, one-disk topology (see the module documentation).
pub struct OneDisk<'a> {
    pub group: &'a str,
    pub id: u16,
    pub mode: &'a str,
    /// `IP:PORT` of the backup server.
    pub endpoint: String,
    pub ca: &'a Path,
    pub cert: &'a Path,
    pub key: &'a Path,
    /// Directory of the NBD sockets, control socket and local image.
    pub work: &'a Path,
    pub disk: &'a str,
    pub size: u64,
    /// Extra `[policy]` lines (none by default).
    pub policy: &'a str,
    /// Extra `[[host]]` lines (none by default).
    pub host: &'a str,
}

impl OneDisk<'_> {
    /// The topology file's text.
    pub fn toml(&self) -> String {
        let work = self.work.display();
        let mut t = format!(
            "[group]\nname = \"{}\"\nid = {}\nmode = \"{}\"\n[backup]\nendpoint = \"{}\"\n\
             server_name = \"localhost\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            self.group,
            self.id,
            self.mode,
            self.endpoint,
            self.ca.display(),
            self.cert.display(),
            self.key.display(),
        );
        if !self.policy.is_empty() {
            let _ = writeln!(t, "[policy]\n{}", self.policy.trim_end());
        }
        let _ = writeln!(
            t,
            "[[host]]\nname = \"h\"\nnbd_dir = \"{work}/nbd\"\nctl_socket = \"{work}/ctl.sock\""
        );
        if !self.host.is_empty() {
            let _ = writeln!(t, "{}", self.host.trim_end());
        }
        let _ = write!(
            t,
            "[[machine]]\nname = \"m\"\nip = \"10.10.0.10\"\nhost = \"h\"\noutbound = true\n\
             writer = true\n[[disk]]\nname = \"{}\"\nmachine = \"m\"\nimage = \"{work}/local.img\"\n\
             size = \"{}\"\n",
            self.disk, self.size,
        );
        t
    }

    /// Writes the topology to `path`.
    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.toml()).expect("writing the topology");
    }
}
