//! A valid topology file and helpers shared by the tests of every stage.
use super::{Topology, TopologyError};

pub(super) const GOOD: &str = r#"# a two-tier test topology
[group]
name = "shop"
id = 7
mode = "pipelined"

[backup]
endpoint = "10.99.0.2:7800"
server_name = "backup.pipecloud.test"
ca = "certs/ca.pem"
cert = "certs/shop-agent.pem"
key = "certs/shop-agent.key"

[[host]]
name = "dom0-a"
nbd_dir = "/run/pipecloud/dom0-a"

[[machine]]
name = "web"
ip = "10.10.0.2"
mac = "02:00:00:00:00:02"
host = "dom0-a"
outbound = true

[[machine]]
name = "db"
ip = "10.10.0.3"
host = "dom0-a"
writer = true

[[disk]]
name = "db-data"
machine = "db"
image = "/var/lib/pipecloud/db-data.img"
size = "1GiB"
"#;

pub(super) fn errors_of(text: &str) -> Vec<TopologyError> {
    match Topology::parse(text, "t.toml") {
        Ok(t) => panic!("expected errors, parsed {t:?}"),
        Err(e) => e.into_iter().collect(),
    }
}

/// Asserts that some error is at `line` on `field` and its message contains `needle`.
pub(super) fn assert_error(errors: &[TopologyError], line: u32, field: &str, needle: &str) {
    assert!(
        errors
            .iter()
            .any(|e| e.line == line && e.field == field && e.message.contains(needle)),
        "no error at line {line} on `{field}` containing {needle:?}; got:\n{}",
        errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Replaces the first occurrence of `from` (which must exist) in GOOD.
pub(super) fn good_with(from: &str, to: &str) -> String {
    assert!(GOOD.contains(from), "GOOD lacks {from:?}");
    GOOD.replacen(from, to, 1)
}
