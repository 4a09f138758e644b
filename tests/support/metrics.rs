//! Test helpers for the `/metrics` endpoints: a scrape over plain HTTP, a strict
//! reader of the Prometheus text format 0.0.4 (so a test fails on output a
//! Prometheus server would reject), and a minimal NBD client (fixed newstyle,
//! `NBD_OPT_EXPORT_NAME`, simple replies) to write through a live agent without
//! external tools.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// A free TCP port on loopback (probed; the caller binds it soon after).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("probe port");
    l.local_addr().expect("probe addr").port()
}

/// `GET /metrics` on `addr`; the body of a `200` answer in the Prometheus text format.
pub fn scrape(addr: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let (head, body) = out
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP head in {out:?}"))?;
    if !head.starts_with("HTTP/1.1 200 ") {
        return Err(format!("not 200: {head}"));
    }
    if !head.contains("Content-Type: text/plain; version=0.0.4") {
        return Err(format!("not the Prometheus text format: {head}"));
    }
    Ok(body.to_owned())
}

fn is_metric_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

/// Parses `{k="v",...}` at the start of `s`; returns the canonical label text and the rest.
fn parse_labels(s: &str) -> Result<(String, &str), String> {
    let mut rest = s.strip_prefix('{').ok_or("labels must start with {")?;
    let mut labels = Vec::new();
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels.join(","), r));
        }
        let eq = rest.find('=').ok_or("label without =")?;
        let name = &rest[..eq];
        if !is_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value must be quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?}")),
                },
                Some((_, '\n')) | None => return Err("unterminated label value".into()),
                Some((_, c)) => value.push(c),
            }
        };
        labels.push(format!("{name}=\"{value}\""));
        rest = &rest[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse().map_err(|_| format!("bad sample value {s:?}")),
    }
}

/// Reads a whole exposition strictly (text format 0.0.4): `# HELP`/`# TYPE` lines
/// with valid names, each family typed once and before its samples, every sample
/// of a declared family (histograms: `_bucket` with `le`, `_sum`, `_count`), valid
/// label syntax, a float value, no sample twice. Returns `name{labels}` -> value.
pub fn parse_exposition(text: &str) -> Result<BTreeMap<String, f64>, String> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let err = |m: String| format!("line {}: {m}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(c) = line.strip_prefix('#') {
            let mut w = c.trim_start().splitn(3, ' ');
            match (w.next(), w.next(), w.next()) {
                (Some("HELP"), Some(name), _) if is_metric_name(name) => {}
                (Some("TYPE"), Some(name), Some(t)) if is_metric_name(name) => {
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&t) {
                        return Err(err(format!("unknown type {t}")));
                    }
                    if types.insert(name.to_owned(), t.to_owned()).is_some() {
                        return Err(err("family typed twice".into()));
                    }
                }
                (Some("HELP" | "TYPE"), ..) => return Err(err("bad HELP/TYPE line".into())),
                _ => {} // other comments are allowed
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| err("no value".into()))?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(err(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(err)?
        } else {
            (String::new(), &line[name_end..])
        };
        let mut parts = rest.split_whitespace();
        let value =
            parse_value(parts.next().ok_or_else(|| err("no value".into()))?).map_err(err)?;
        if let Some(ts) = parts.next() {
            ts.parse::<i64>()
                .map_err(|_| err(format!("bad timestamp {ts:?}")))?;
        }
        let family = types
            .iter()
            .find(|(f, t)| {
                name == f.as_str()
                    || (t.as_str() == "histogram"
                        && [
                            format!("{f}_bucket"),
                            format!("{f}_sum"),
                            format!("{f}_count"),
                        ]
                        .contains(&name.to_owned()))
            })
            .ok_or_else(|| err("sample of no declared family (TYPE must come first)".into()))?;
        if name.ends_with("_bucket") && family.1 == "histogram" && !labels.contains("le=\"") {
            return Err(err("histogram bucket without le".into()));
        }
        let key = format!("{name}{{{labels}}}");
        if samples.insert(key, value).is_some() {
            return Err(err("sample repeated".into()));
        }
    }
    Ok(samples)
}

/// The value of `name{labels}` (labels in the order the endpoint writes them).
pub fn value(samples: &BTreeMap<String, f64>, key: &str) -> f64 {
    *samples
        .get(key)
        .unwrap_or_else(|| panic!("no sample {key}; have:\n{samples:#?}"))
}

/// A minimal NBD client over a Unix socket: one export, writes and flushes.
pub struct Nbd {
    sock: UnixStream,
    handle: u64,
    pub size: u64,
}

impl Nbd {
    /// Fixed newstyle handshake and `NBD_OPT_EXPORT_NAME` of `export`.
    pub fn connect(path: &Path, export: &str) -> std::io::Result<Nbd> {
        let mut sock = UnixStream::connect(path)?;
        let mut hello = [0u8; 18];
        sock.read_exact(&mut hello)?;
        assert_eq!(&hello[..16], b"NBDMAGICIHAVEOPT", "NBD server greeting");
        let no_zeroes = u16::from_be_bytes([hello[16], hello[17]]) & 2 != 0;
        let client_flags: u32 = 1 | if no_zeroes { 2 } else { 0 };
        sock.write_all(&client_flags.to_be_bytes())?;
        let mut opt = Vec::new();
        opt.extend_from_slice(b"IHAVEOPT");
        opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        sock.write_all(&opt)?;
        let mut info = vec![0u8; if no_zeroes { 10 } else { 134 }];
        sock.read_exact(&mut info)?;
        let size = u64::from_be_bytes(info[..8].try_into().expect("8 bytes"));
        Ok(Nbd {
            sock,
            handle: 0,
            size,
        })
    }

    fn request(&mut self, kind: u16, offset: u64, data: &[u8], len: u32) -> std::io::Result<()> {
        self.handle += 1;
        let mut r = Vec::with_capacity(28 + data.len());
        r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&self.handle.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r.extend_from_slice(data);
        self.sock.write_all(&r)?;
        let mut reply = [0u8; 16];
        self.sock.read_exact(&mut reply)?;
        assert_eq!(&reply[..4], &0x6744_6698u32.to_be_bytes(), "simple reply");
        let error = u32::from_be_bytes(reply[4..8].try_into().expect("4 bytes"));
        assert_eq!(error, 0, "NBD error {error}");
        assert_eq!(
            u64::from_be_bytes(reply[8..].try_into().expect("8 bytes")),
            self.handle
        );
        Ok(())
    }

    /// `NBD_CMD_WRITE` (waits for the reply).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.request(1, offset, data, data.len() as u32)
    }

    /// `NBD_CMD_FLUSH` (waits for the reply).
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.request(3, 0, &[], 0)
    }
}
