//! The optional `[quorum]` section: where the group's lease lives (etcd) and
//! what the backup site does when it lapses (docs/design.md §7).
//!
//! ```toml
//! [quorum]
//! endpoints = ["http://10.0.1.1:2379", "http://10.0.2.1:2379", "http://10.0.3.1:2379"]
//! lease_ms = 3000            # whole seconds, 1000..=600000 (default 3000)
//! failover = "automatic"     # automatic | alarm-only (default): what the backup's controller does
//! home_site = "primary"      # the site names in etcd's records (defaults "primary", "backup")
//! backup_site = "backup"
//! # ca = "certs/etcd-ca.pem" # TLS to etcd (required for https:// endpoints);
//! # cert = "certs/etcd.pem"  # client certificate and key, when etcd asks for one
//! # key = "certs/etcd.key"
//! # activate = "/etc/pipecloud/activate-shop"  # run by the controller after a failover
//! ```
//!
//! Without `[quorum]` the group has no lease: only one site may run it, and
//! that is the operator's business (as before issue 23).

use super::convert::{conv_int_range, conv_name, conv_path, NAME_EXPECTED};
use super::document::{as_table, Node, TableReader};
use super::error::Cx;
use crate::lease::{LeaseConfig, LEASE_MS_MAX, LEASE_MS_MIN};
use std::path::PathBuf;
use toml::Spanned;

/// Most etcd endpoints one group may list.
pub const MAX_QUORUM_ENDPOINTS: usize = 9;
/// `lease_ms` when the file does not say.
pub const DEFAULT_LEASE_MS: u64 = 3_000;

const QUORUM_KEYS: &[&str] = &[
    "endpoints",
    "lease_ms",
    "failover",
    "home_site",
    "backup_site",
    "ca",
    "cert",
    "key",
    "activate",
];

/// What the backup site's controller does when the home site's lease lapses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FailoverPolicy {
    /// Take over: win the generation, fence, fail over, activate.
    Automatic,
    /// Raise an alarm; an operator confirms the takeover with one command.
    #[default]
    AlarmOnly,
}

impl FailoverPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            FailoverPolicy::Automatic => "automatic",
            FailoverPolicy::AlarmOnly => "alarm-only",
        }
    }
}

/// The `[quorum]` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quorum {
    /// etcd client URLs (`http://` or `https://`).
    pub endpoints: Vec<String>,
    pub lease_ms: u64,
    pub failover: FailoverPolicy,
    pub home_site: String,
    pub backup_site: String,
    /// TLS to etcd: CA, and client certificate + key (both or neither).
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The group's activation hook, run at the backup site after a failover.
    pub activate: Option<PathBuf>,
}

impl Quorum {
    /// The lease timing (validated on load).
    pub fn lease(&self) -> LeaseConfig {
        LeaseConfig::new(self.lease_ms).expect("lease_ms validated when the topology was read")
    }
}

fn conv_endpoints(node: &Node) -> Result<Vec<String>, String> {
    let Node::Array(items) = node else {
        return Err(format!("found {}", node.kind()));
    };
    if items.is_empty() || items.len() > MAX_QUORUM_ENDPOINTS {
        return Err(format!("{} endpoints", items.len()));
    }
    items
        .iter()
        .map(|item| match item.get_ref() {
            Node::Str(s) if valid_endpoint(s) => Ok(s.clone()),
            Node::Str(s) => Err(format!("{s:?} is not an http:// or https:// HOST:PORT URL")),
            other => Err(format!("found {}", other.kind())),
        })
        .collect()
}

fn valid_endpoint(s: &str) -> bool {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"));
    rest.is_some_and(|r| {
        let r = r.trim_end_matches('/');
        !r.is_empty()
            && !r.contains('/')
            && r.rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
    })
}

fn conv_failover(node: &Node) -> Result<FailoverPolicy, String> {
    match node {
        Node::Str(s) if s == "automatic" => Ok(FailoverPolicy::Automatic),
        Node::Str(s) if s == "alarm-only" => Ok(FailoverPolicy::AlarmOnly),
        Node::Str(s) => Err(format!("unknown failover policy `{s}`")),
        other => Err(format!("found {}", other.kind())),
    }
}

fn conv_lease_ms(node: &Node) -> Result<u64, String> {
    let ms = conv_int_range(node, LEASE_MS_MIN as i64, LEASE_MS_MAX as i64)?;
    LeaseConfig::new(ms)
        .map(|c| c.lease_ms)
        .map_err(|e| e.to_string())
}

/// Reads `[quorum]` if present. `None` inside means an error was reported.
pub(super) fn parse_quorum(
    cx: &mut Cx<'_>,
    node: Option<&Spanned<Node>>,
) -> Option<Option<Quorum>> {
    let Some(node) = node else {
        return Some(None);
    };
    let table = as_table(cx, node, "quorum", "the `[quorum]` table")?;
    let mut t = TableReader::new("quorum".into(), node.span(), table, QUORUM_KEYS);
    let endpoints = t.required(
        cx,
        "endpoints",
        "a list of 1..=9 etcd client URLs, e.g. [\"http://10.0.3.1:2379\"]",
        conv_endpoints,
    );
    let lease_ms = t.optional(
        cx,
        "lease_ms",
        "a whole number of seconds in milliseconds, 1000..=600000",
        conv_lease_ms,
    );
    let failover = t.optional(
        cx,
        "failover",
        "\"automatic\" or \"alarm-only\"",
        conv_failover,
    );
    let home_site = t.optional(cx, "home_site", NAME_EXPECTED, conv_name);
    let backup_site = t.optional(cx, "backup_site", NAME_EXPECTED, conv_name);
    let path_expected = "a path to a PEM file (relative paths are relative to the topology file)";
    let ca = t.optional(cx, "ca", path_expected, conv_path);
    let cert = t.optional(cx, "cert", path_expected, conv_path);
    let key = t.optional(cx, "key", path_expected, conv_path);
    let activate = t.optional(cx, "activate", "the path of an executable", conv_path);
    t.finish(cx);
    let endpoints = endpoints?.value;
    let home_site = home_site.map_or_else(|| "primary".to_owned(), |s| s.value);
    let backup_site = backup_site.map_or_else(|| "backup".to_owned(), |s| s.value);
    if home_site == backup_site {
        cx.error(
            &node.span(),
            "quorum.backup_site",
            "the same name as home_site; expected two site names",
        );
        return None;
    }
    if cert.is_some() != key.is_some() {
        cx.error(
            &node.span(),
            "quorum.cert",
            "cert and key go together; expected both or neither",
        );
        return None;
    }
    if endpoints.iter().any(|e| e.starts_with("https://")) && ca.is_none() {
        cx.error(
            &node.span(),
            "quorum.ca",
            "https:// endpoints need the CA of etcd's certificates",
        );
        return None;
    }
    Some(Some(Quorum {
        endpoints,
        lease_ms: lease_ms.map_or(DEFAULT_LEASE_MS, |v| v.value),
        failover: failover.map_or(FailoverPolicy::default(), |v| v.value),
        home_site,
        backup_site,
        ca: ca.map(|v| v.value),
        cert: cert.map(|v| v.value),
        key: key.map(|v| v.value),
        activate: activate.map(|v| v.value),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::test_fixture::{errors_of, GOOD};
    use crate::topology::Topology;

    fn with(q: &str) -> String {
        GOOD.replacen("[[host]]", &format!("[quorum]\n{q}\n\n[[host]]"), 1)
    }

    #[test]
    fn quorum_is_optional_and_read_with_defaults() {
        assert_eq!(Topology::parse(GOOD, "t").expect("valid").quorum, None);
        let t =
            Topology::parse(&with("endpoints = [\"http://127.0.0.1:2379\"]"), "t").expect("valid");
        let q = t.quorum.expect("quorum");
        assert_eq!((q.lease_ms, q.failover), (3000, FailoverPolicy::AlarmOnly));
        assert_eq!(
            (q.home_site.as_str(), q.backup_site.as_str()),
            ("primary", "backup")
        );
        let t = Topology::parse(
            &with("endpoints = [\"https://e1:2379\", \"https://e2:2379\"]\nlease_ms = 5000\nfailover = \"automatic\"\nca = \"ca.pem\"\nactivate = \"/bin/true\""),
            "t",
        )
        .expect("valid");
        let q = t.quorum.expect("quorum");
        assert_eq!(
            (q.lease_ms, q.failover, q.endpoints.len()),
            (5000, FailoverPolicy::Automatic, 2)
        );
    }

    #[test]
    fn quorum_errors_name_the_field() {
        for (q, field) in [
            ("endpoints = []", "quorum.endpoints"),
            ("endpoints = [\"10.0.0.1:2379\"]", "quorum.endpoints"),
            (
                "endpoints = [\"http://e:2379\"]\nlease_ms = 1500",
                "quorum.lease_ms",
            ),
            (
                "endpoints = [\"http://e:2379\"]\nfailover = \"maybe\"",
                "quorum.failover",
            ),
            ("endpoints = [\"https://e:2379\"]", "quorum.ca"),
            (
                "endpoints = [\"http://e:2379\"]\ncert = \"c.pem\"",
                "quorum.cert",
            ),
            (
                "endpoints = [\"http://e:2379\"]\nhome_site = \"x\"\nbackup_site = \"x\"",
                "quorum.backup_site",
            ),
            (
                "endpoints = [\"http://e:2379\"]\nwitness = 1",
                "quorum.witness",
            ),
        ] {
            let errs = errors_of(&with(q));
            assert!(errs.iter().any(|e| e.field == field), "{q}: {errs:?}");
        }
    }
}
