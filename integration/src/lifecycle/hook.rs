//! The lifecycle's activation hook: the harness's stand-in for the
//! orchestrator a deployment's hook would call (docs/design.md §7).
//!
//! The product is the controller's side: after a won takeover it fences,
//! fails over, hands the lease on and runs `[quorum] activate` with the
//! `PIPECLOUD_*` environment, and writes `activated-<n>` only if the hook
//! exited 0. The controller runs unprivileged; activating needs root
//! (namespaces, mounts, the agent's netfilter chain). So the hook installed
//! here only hands the request over: it writes
//! `<out>/activation-request-<n>` (its `PIPECLOUD_*` environment) and waits,
//! at most [`HOOK_WAIT_S`] seconds, for the harness's answer,
//! `activation-done-<n>` (exit 0) or `activation-failed-<n>` (its reason on
//! stderr, exit 1); no answer in time is a failure too. The harness (root)
//! performs the activation between the two ([`crate::failback::activate`]).

use crate::sys::{sh, Guarded};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long the hook waits for the harness's answer.
pub const HOOK_WAIT_S: u64 = 90;

/// The hook script's path in the controller's `out` directory.
pub fn path(out: &Path) -> PathBuf {
    out.join("activate.sh")
}

fn request(out: &Path, generation: u64) -> PathBuf {
    out.join(format!("activation-request-{generation}"))
}

/// Writes the hook into `out` and names it in `topology`'s `[quorum]`
/// section (the file's last, as the site renders it).
pub fn install(out: &Path, topology: &Path) -> Result<()> {
    let script = format!(
        "#!/bin/sh\n\
         # The lifecycle harness's activation hook: hands the request to the harness\n\
         # (the stand-in for a deployment's orchestrator) and waits for its answer.\n\
         set -u\n\
         dir='{dir}'\n\
         n=\"$PIPECLOUD_GENERATION\"\n\
         env | grep '^PIPECLOUD_' > \"$dir/activation-request-$n.tmp\" || exit 1\n\
         mv \"$dir/activation-request-$n.tmp\" \"$dir/activation-request-$n\" || exit 1\n\
         i=0\n\
         while [ $i -lt {polls} ]; do\n\
         \x20 [ -e \"$dir/activation-done-$n\" ] && exit 0\n\
         \x20 if [ -e \"$dir/activation-failed-$n\" ]; then\n\
         \x20   echo \"activation failed: $(cat \"$dir/activation-failed-$n\")\" >&2\n\
         \x20   exit 1\n\
         \x20 fi\n\
         \x20 sleep 0.05\n\
         \x20 i=$((i + 1))\n\
         done\n\
         echo \"activation hook: no answer from the harness within {HOOK_WAIT_S} s\" >&2\n\
         exit 1\n",
        dir = out.display(),
        polls = HOOK_WAIT_S * 20,
    );
    let hook = path(out);
    std::fs::write(&hook, script).with_context(|| format!("writing {}", hook.display()))?;
    sh(&["chmod", "755", &hook.to_string_lossy()])?;
    let mut text = std::fs::read_to_string(topology)
        .with_context(|| format!("reading {}", topology.display()))?;
    let last_section = text
        .lines()
        .rfind(|l| l.trim_start().starts_with('['))
        .map(str::trim);
    if last_section != Some("[quorum]") {
        bail!(
            "{}: [quorum] is not the last section ({last_section:?}): cannot add the hook",
            topology.display()
        );
    }
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&format!("activate = \"{}\"\n", hook.display()));
    std::fs::write(topology, text).with_context(|| format!("writing {}", topology.display()))
}

/// Waits for the hook's request for `generation`; returns its text. Fails
/// when the controller exits first or nothing comes within a minute.
pub fn wait_request(
    out: &Path,
    generation: u64,
    controller: &mut Guarded,
    work: &Path,
) -> Result<String> {
    let path = request(out, generation);
    let t0 = Instant::now();
    let log = || std::fs::read_to_string(work.join("controller.log")).unwrap_or_default();
    while t0.elapsed() < Duration::from_secs(60) {
        if let Ok(text) = std::fs::read_to_string(&path) {
            return Ok(text);
        }
        if controller.exited() {
            bail!(
                "the controller exited before asking for the activation:\n{}",
                log()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!(
        "no activation request ({}) within 60 s:\n{}",
        path.display(),
        log()
    )
}

/// The harness's answer to the hook: done, or failed with `why`.
pub fn answer(out: &Path, generation: u64, outcome: Result<(), &str>) -> Result<()> {
    let (name, text) = match outcome {
        Ok(()) => (format!("activation-done-{generation}"), String::new()),
        Err(why) => (format!("activation-failed-{generation}"), why.to_owned()),
    };
    let tmp = out.join(format!("{name}.tmp"));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out.join(&name)).with_context(|| format!("answering the hook ({name})"))
}
