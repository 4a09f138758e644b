//! The shipped topology files: every `topology/*.toml` is valid, and every
//! `topology/broken/*.toml` fails with exactly the errors its header announces.
//!
//! A broken file declares each expected error on a header line
//! `# expect-error: LINE FIELD` (FIELD `(syntax)` for a TOML syntax error).

use pipecloud_core::topology::Topology;
use pipecloud_core::WriterId;
use std::path::{Path, PathBuf};

fn topology_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../topology")
}

/// The `*.toml` files directly in `dir`, sorted.
fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

fn load(
    path: &Path,
) -> (
    String,
    Result<Topology, pipecloud_core::topology::TopologyErrors>,
) {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let name = path.display().to_string();
    let parsed = Topology::parse(&text, &name);
    (text, parsed)
}

#[test]
fn topology_files_all_valid() {
    let files = toml_files(&topology_dir());
    assert!(
        files.len() >= 4,
        "expected the shipped topologies, found {files:?}"
    );
    for path in files {
        let (_, parsed) = load(&path);
        match parsed {
            Ok(t) => assert!(!t.summary().is_empty()),
            Err(e) => panic!("{} should be valid:\n{e}", path.display()),
        }
    }
}

fn load_ok(name: &str) -> Topology {
    let path = topology_dir().join(name);
    match load(&path).1 {
        Ok(t) => t,
        Err(e) => panic!("{name}: {e}"),
    }
}

#[test]
fn topology_files_describe_the_documented_layouts() {
    let single = load_ok("single-db.toml");
    assert_eq!(single.writers().len(), 1);
    assert_eq!(single.machines.len(), 1);
    assert!(single.machines[0].outbound && single.machines[0].writer.is_some());

    let two_tier = load_ok("two-tier.toml");
    assert_eq!(two_tier.writer_of("db"), Some(WriterId(0)));
    assert_eq!(two_tier.writer_of("web"), None);
    let outbound: Vec<&str> = two_tier
        .outbound_machines()
        .iter()
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(outbound, ["web"]);

    let three = load_ok("three-tier.toml");
    assert_eq!(three.writers().len(), 3, "every tier writes");
    assert_eq!(three.writer_of("web"), Some(WriterId(0)));
    assert_eq!(three.writer_of("app"), Some(WriterId(1)));
    assert_eq!(three.writer_of("db"), Some(WriterId(2)));
    assert!(three
        .machines
        .iter()
        .all(|m| m.outbound == (m.name == "web")));

    let two_host = load_ok("two-host.toml");
    assert_eq!(two_host.hosts.len(), 2);
    let web = two_host.machine("web").expect("web");
    let db = two_host.machine("db").expect("db");
    assert_ne!(web.host, db.host, "web and db run on different hosts");
    assert!(web.writer.is_some() && db.writer.is_some());
    assert_eq!(two_host.disks_on(&db.host).len(), 1);

    // Group ids are distinct so that all shipped groups can share one backup server.
    let mut ids: Vec<u16> = [&single, &two_tier, &three, &two_host]
        .iter()
        .map(|t| t.group.id)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 4);
}

/// `(line, field)` pairs announced by `# expect-error:` header lines.
fn expected_errors(path: &Path, text: &str) -> Vec<(u32, String)> {
    let mut expected: Vec<(u32, String)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# expect-error:"))
        .map(|rest| {
            let mut parts = rest.split_whitespace();
            let line: u32 = parts
                .next()
                .and_then(|l| l.parse().ok())
                .unwrap_or_else(|| panic!("{}: bad expect-error line", path.display()));
            let field = match parts.next() {
                Some("(syntax)") => String::new(),
                Some(f) => f.to_owned(),
                None => panic!("{}: expect-error without a field", path.display()),
            };
            (line, field)
        })
        .collect();
    expected.sort();
    expected
}

#[test]
fn topology_files_broken_fail_with_expected_positions() {
    let files = toml_files(&topology_dir().join("broken"));
    assert!(
        files.len() >= 8,
        "expected broken examples, found {files:?}"
    );
    for path in files {
        let (text, parsed) = load(&path);
        let expected = expected_errors(&path, &text);
        assert!(
            !expected.is_empty(),
            "{} announces no expected error",
            path.display()
        );
        let errors = match parsed {
            Ok(_) => panic!("{} should fail", path.display()),
            Err(e) => e,
        };
        let mut got: Vec<(u32, String)> =
            errors.iter().map(|e| (e.line, e.field.clone())).collect();
        got.sort();
        assert_eq!(got, expected, "{}:\n{errors}", path.display());
        let name = path.display().to_string();
        for e in &errors {
            let shown = e.to_string();
            assert!(
                shown.starts_with(&format!("{name}:{}:", e.line)),
                "error does not start with file:line: {shown}"
            );
            assert!(
                shown.contains("expected"),
                "error does not say what is expected: {shown}"
            );
        }
    }
}
