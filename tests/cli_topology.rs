//! `pipecloud topology check`: exit codes and error positions, run on the built binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn topology(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("topology")
        .join(name)
}

fn pipecloud(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pipecloud"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run the pipecloud binary")
}

fn check(files: &[&Path]) -> Output {
    let mut args: Vec<&std::ffi::OsStr> = vec!["topology".as_ref(), "check".as_ref()];
    args.extend(files.iter().map(|f| f.as_os_str()));
    pipecloud(&args)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn cli_topology_check_valid_file_prints_summary() {
    let file = topology("three-tier.toml");
    let out = check(&[&file]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}, stderr:\n{}",
        out.status,
        text(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("{}: OK", file.display())),
        "{stdout}"
    );
    for needle in [
        "three-tier (id 3)",
        "mode pipelined",
        "writer w2",
        "outbound",
        "ipv6: held at the hold queue, untagged",
        "one backup round trip per packet",
    ] {
        assert!(
            stdout.contains(needle),
            "summary lacks {needle:?}:\n{stdout}"
        );
    }
}

#[test]
fn cli_topology_check_broken_file_reports_file_line_and_fails() {
    let file = topology("broken/duplicate-ip.toml");
    let out = check(&[&file]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    // The header of the file announces the error line.
    let expected = std::fs::read_to_string(&file)
        .expect("read broken file")
        .lines()
        .find_map(|l| l.strip_prefix("# expect-error: "))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .expect("expect-error header");
    let position = format!("{}:{expected}:", file.display());
    assert!(
        stderr.contains(&position),
        "stderr lacks {position:?}:\n{stderr}"
    );
    assert!(stderr.contains("field `machine[1].ip`"), "{stderr}");
    assert!(stderr.contains("duplicate IPv4 address"), "{stderr}");
}

#[test]
fn cli_topology_check_fails_if_any_file_fails() {
    let good = topology("single-db.toml");
    let broken = topology("broken/unknown-host.toml");
    let missing = topology("does-not-exist.toml");
    let out = check(&[&good, &broken, &missing]);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(
        stdout.contains(&format!("{}: OK", good.display())),
        "{stdout}"
    );
    assert!(
        stderr.contains(&format!("{}:", broken.display())),
        "{stderr}"
    );
    assert!(stderr.contains("unknown host `dom0-z`"), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot open topology file {}", missing.display())),
        "{stderr}"
    );
}

#[test]
fn cli_topology_agent_rejects_unknown_host_and_usage_errors() {
    let file = topology("two-host.toml");
    let out = pipecloud(&[
        "agent".as_ref(),
        "--topology".as_ref(),
        file.as_os_str(),
        "--host".as_ref(),
        "dom0-z".as_ref(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("host `dom0-z` is not declared"));
    // Usage errors are clap's exit code 2.
    let out = pipecloud(&["topology".as_ref(), "check".as_ref()]);
    assert_eq!(out.status.code(), Some(2));
}
