//! A small etcd v3 client over etcd's JSON gateway (docs/design.md §7).
//!
//! etcd serves its v3 API as gRPC and, on the same client port, as JSON over
//! HTTP/1.1 (`POST /v3/kv/range`, `/v3/kv/txn`, `/v3/lease/grant`, ...; keys and
//! values base64, 64-bit integers as strings, zero values omitted). The lease
//! logic needs six calls, all unary, so this client speaks JSON with `ureq`
//! instead of pulling in a gRPC stack (tonic, prost, h2, tower and a `protoc`
//! at build time). Consensus stays etcd's: this file only encodes requests.
//!
//! Endpoints are tried in turn, starting with the last one that answered: a
//! member cut off from the majority answers with an error or not at all (its
//! linearizable reads and lease calls need a leader), and the next one is
//! asked. Every attempt is bounded by [`EtcdConfig::attempt_timeout`]; a call
//! gives up after one attempt per endpoint. TLS (server CA, optional client
//! certificate) is supported with `https://` endpoints.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Largest response body read (a range of two keys is a few hundred bytes).
const RESPONSE_BYTES_MAX: u64 = 1 << 20;

/// Where etcd is and how to reach it.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// `http://host:port` or `https://host:port`, at least one.
    pub endpoints: Vec<String>,
    pub tls: Option<EtcdTls>,
    /// The bound of one attempt against one endpoint.
    pub attempt_timeout: Duration,
}

/// TLS to etcd: the CA that signed etcd's server certificates and, when etcd
/// requires client certificates (`--client-cert-auth`), ours.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd: no endpoint answered {call}: {}", .errors.join("; "))]
    Unreachable { call: String, errors: Vec<String> },
    #[error("etcd {endpoint}: {call}: unexpected answer: {detail}")]
    Decode {
        endpoint: String,
        call: String,
        detail: String,
    },
    #[error("etcd client configuration: {0}")]
    Config(String),
}

/// One key as etcd returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    /// The lease the key is attached to (0: none).
    pub lease: i64,
}

/// One condition of a transaction.
#[derive(Clone, Debug)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key exists and its value is `>` these bytes (etcd compares bytes).
    ValueAbove(String, Vec<u8>),
    /// The key exists and its value is `<` these bytes.
    ValueBelow(String, Vec<u8>),
    /// The key is attached to this lease.
    LeaseIs(String, i64),
}

/// One operation of a transaction branch.
#[derive(Clone, Debug)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: i64,
    },
    Get(String),
    Delete(String),
}

/// The outcome of a transaction: which branch ran and what its `Get`s read
/// (in order; `None`: no such key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnOutcome {
    pub succeeded: bool,
    pub gets: Vec<Option<KeyValue>>,
}

/// A client of one etcd cluster.
pub struct Etcd {
    agent: ureq::Agent,
    endpoints: Vec<String>,
    preferred: AtomicUsize,
}

impl Etcd {
    pub fn new(cfg: &EtcdConfig) -> Result<Etcd, EtcdError> {
        if cfg.endpoints.is_empty() {
            return Err(EtcdError::Config("no etcd endpoint given".into()));
        }
        for e in &cfg.endpoints {
            let tls = e.starts_with("https://");
            if !tls && !e.starts_with("http://") {
                return Err(EtcdError::Config(format!(
                    "endpoint {e:?}: must start with http:// or https://"
                )));
            }
            if tls && cfg.tls.is_none() {
                return Err(EtcdError::Config(format!(
                    "endpoint {e:?} is https but no etcd CA is configured"
                )));
            }
        }
        let mut builder = ureq::Agent::config_builder()
            .timeout_global(Some(cfg.attempt_timeout))
            .http_status_as_error(false)
            .max_idle_connections_per_host(2);
        if let Some(tls) = &cfg.tls {
            builder = builder.tls_config(tls_config(tls)?);
        }
        Ok(Etcd {
            agent: builder.build().new_agent(),
            endpoints: cfg
                .endpoints
                .iter()
                .map(|e| e.trim_end_matches('/').to_string())
                .collect(),
            preferred: AtomicUsize::new(0),
        })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// One call, trying every endpoint once from the preferred one.
    fn call(&self, path: &str, body: &Value) -> Result<(String, Value), EtcdError> {
        let body = body.to_string();
        let n = self.endpoints.len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let mut errors = Vec::new();
        for k in 0..n {
            let i = (first + k) % n;
            let endpoint = &self.endpoints[i];
            match self.attempt(endpoint, path, &body) {
                Ok(v) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok((endpoint.clone(), v));
                }
                Err(e) => errors.push(format!("{endpoint}: {e}")),
            }
        }
        Err(EtcdError::Unreachable {
            call: path.to_string(),
            errors,
        })
    }

    fn attempt(&self, endpoint: &str, path: &str, body: &str) -> Result<Value, String> {
        let mut resp = self
            .agent
            .post(format!("{endpoint}{path}"))
            .header("content-type", "application/json")
            .send(body)
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let text = resp
            .body_mut()
            .with_config()
            .limit(RESPONSE_BYTES_MAX)
            .read_to_string()
            .map_err(|e| e.to_string())?;
        // Streaming calls (lease keepalive) answer one JSON object per line.
        let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        let v: Value = serde_json::from_str(first)
            .map_err(|e| format!("HTTP {status}: not JSON ({e}): {:.200}", text))?;
        let err = v.get("error").or_else(|| v.pointer("/error/message"));
        if !status.is_success() || err.is_some() {
            let msg = v
                .get("message")
                .or(err)
                .and_then(Value::as_str)
                .map_or_else(|| v.to_string(), String::from);
            return Err(format!("HTTP {status}: {msg}"));
        }
        Ok(v)
    }

    /// The key's current value (a linearizable read).
    pub fn get(&self, key: &str) -> Result<Option<KeyValue>, EtcdError> {
        let path = "/v3/kv/range";
        let (endpoint, v) = self.call(path, &json!({ "key": B64.encode(key) }))?;
        first_kv(&v).map_err(|detail| decode(endpoint, path, detail))
    }

    /// Writes a key (no lease).
    pub fn put(&self, key: &str, value: &[u8]) -> Result<(), EtcdError> {
        self.call(
            "/v3/kv/put",
            &json!({ "key": B64.encode(key), "value": B64.encode(value) }),
        )?;
        Ok(())
    }

    /// One transaction: if every compare holds, run `success`, else `failure`.
    pub fn txn(
        &self,
        compares: &[Compare],
        success: &[Op],
        failure: &[Op],
    ) -> Result<TxnOutcome, EtcdError> {
        let path = "/v3/kv/txn";
        let body = json!({
            "compare": compares.iter().map(compare_json).collect::<Vec<_>>(),
            "success": success.iter().map(op_json).collect::<Vec<_>>(),
            "failure": failure.iter().map(op_json).collect::<Vec<_>>(),
        });
        let (endpoint, v) = self.call(path, &body)?;
        let succeeded = v.get("succeeded").and_then(Value::as_bool).unwrap_or(false);
        let mut gets = Vec::new();
        for r in v
            .get("responses")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            if let Some(range) = r.get("response_range") {
                gets.push(first_kv(range).map_err(|d| decode(endpoint.clone(), path, d))?);
            }
        }
        Ok(TxnOutcome { succeeded, gets })
    }

    /// A new lease of `ttl_s` seconds; returns its id.
    pub fn lease_grant(&self, ttl_s: i64) -> Result<i64, EtcdError> {
        let path = "/v3/lease/grant";
        let (endpoint, v) = self.call(path, &json!({ "TTL": ttl_s.to_string() }))?;
        let id = int_field(&v, "ID");
        if id == 0 {
            return Err(decode(endpoint, path, format!("no lease id in {v}")));
        }
        Ok(id)
    }

    /// Renews a lease; returns its new time to live in seconds, 0 when etcd no
    /// longer knows it (expired or revoked).
    pub fn lease_keepalive(&self, id: i64) -> Result<i64, EtcdError> {
        match self.call("/v3/lease/keepalive", &json!({ "ID": id.to_string() })) {
            Ok((_, v)) => Ok(int_field(v.get("result").unwrap_or(&v), "TTL")),
            Err(EtcdError::Unreachable { errors, .. })
                if errors.iter().any(|e| e.contains("lease not found")) =>
            {
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }

    /// Ends a lease at once (its keys are deleted).
    pub fn lease_revoke(&self, id: i64) -> Result<(), EtcdError> {
        match self.call("/v3/lease/revoke", &json!({ "ID": id.to_string() })) {
            Err(EtcdError::Unreachable { errors, .. })
                if errors.iter().any(|e| e.contains("lease not found")) =>
            {
                Ok(())
            }
            r => r.map(|_| ()),
        }
    }

    /// The lease's remaining time to live in seconds (-1 or 0: gone).
    pub fn lease_time_to_live(&self, id: i64) -> Result<i64, EtcdError> {
        let (_, v) = self.call("/v3/lease/timetolive", &json!({ "ID": id.to_string() }))?;
        Ok(int_field(&v, "TTL"))
    }
}

fn decode(endpoint: String, call: &str, detail: String) -> EtcdError {
    EtcdError::Decode {
        endpoint,
        call: call.to_string(),
        detail,
    }
}

/// A protobuf-JSON int64: a string, or absent for zero.
fn int_field(v: &Value, name: &str) -> i64 {
    match v.get(name) {
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn bytes_field(v: &Value, name: &str) -> Result<Vec<u8>, String> {
    match v.get(name).and_then(Value::as_str) {
        Some(s) => B64
            .decode(s)
            .map_err(|e| format!("{name}: bad base64: {e}")),
        None => Ok(Vec::new()),
    }
}

fn first_kv(range: &Value) -> Result<Option<KeyValue>, String> {
    let Some(kv) = range
        .get("kvs")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
    else {
        return Ok(None);
    };
    Ok(Some(KeyValue {
        key: bytes_field(kv, "key")?,
        value: bytes_field(kv, "value")?,
        create_revision: int_field(kv, "create_revision"),
        mod_revision: int_field(kv, "mod_revision"),
        version: int_field(kv, "version"),
        lease: int_field(kv, "lease"),
    }))
}

fn compare_json(c: &Compare) -> Value {
    match c {
        Compare::Absent(key) => json!({
            "key": B64.encode(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"
        }),
        Compare::ValueAbove(key, value) => json!({
            "key": B64.encode(key), "target": "VALUE", "result": "GREATER", "value": B64.encode(value)
        }),
        Compare::ValueBelow(key, value) => json!({
            "key": B64.encode(key), "target": "VALUE", "result": "LESS", "value": B64.encode(value)
        }),
        Compare::LeaseIs(key, lease) => json!({
            "key": B64.encode(key), "target": "LEASE", "result": "EQUAL", "lease": lease.to_string()
        }),
    }
}

fn op_json(op: &Op) -> Value {
    match op {
        Op::Put { key, value, lease } => {
            let mut put = json!({ "key": B64.encode(key), "value": B64.encode(value) });
            if *lease != 0 {
                put["lease"] = json!(lease.to_string());
            }
            json!({ "request_put": put })
        }
        Op::Get(key) => json!({ "request_range": { "key": B64.encode(key) } }),
        Op::Delete(key) => json!({ "request_delete_range": { "key": B64.encode(key) } }),
    }
}

fn tls_config(tls: &EtcdTls) -> Result<ureq::tls::TlsConfig, EtcdError> {
    use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig};
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|e| EtcdError::Config(format!("{}: {e}", p.display())))
    };
    let ca_pem = read(&tls.ca)?;
    let cas: Vec<Certificate<'static>> = ureq::tls::parse_pem(&ca_pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
        .collect::<Result<_, _>>()
        .map_err(|e| EtcdError::Config(format!("{}: {e}", tls.ca.display())))?;
    if cas.is_empty() {
        return Err(EtcdError::Config(format!(
            "{}: no certificate",
            tls.ca.display()
        )));
    }
    let mut b = TlsConfig::builder().root_certs(RootCerts::new_with_certs(&cas));
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let cert_pem = read(cert)?;
            let chain = ureq::tls::parse_pem(&cert_pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| EtcdError::Config(format!("{}: {e}", cert.display())))?;
            let key = PrivateKey::from_pem(&read(key)?)
                .map_err(|e| EtcdError::Config(format!("{}: {e}", key.display())))?;
            b = b.client_cert(Some(ClientCert::new_with_certs(&chain, key)));
        }
        (None, None) => {}
        _ => {
            return Err(EtcdError::Config(
                "etcd client cert and key go together".into(),
            ))
        }
    }
    Ok(b.build())
}
