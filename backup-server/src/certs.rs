//! Test PKI in one command (`backup-server certs`), built with rcgen.
//!
//! Writes into a directory:
//! - `ca.pem` / `ca.key`: a fresh CA (the key is mode 0600 and only needed to issue more);
//! - `server.pem` / `server.key`: the server certificate for `--server-name`
//!   (a DNS name or an IP address), signed by the CA;
//! - `<group>-agent.pem` / `<group>-agent.key` per `--group`: an agent certificate
//!   bound to that protection group (see [`crate::tls`] for the binding:
//!   SAN URI `pipecloud:group/<group>`, CN `agent.<group>`);
//! - `foreign-ca.pem` and `foreign-agent.pem` / `.key`: a certificate for the
//!   first group signed by an unrelated CA. The server must refuse it; tests use it.
//! - `backup-server.toml`: a config that uses all of the above, with data in `<dir>/data`
//!   written as an absolute path, so the `--data-dir` that `status`, `failover` and
//!   `restore` need is printed in the config as it is (not relative to some directory).
//!
//! These are for getting started and for tests; production deployments use their own PKI
//! with the same group binding.

use crate::tls::group_uri;
use pipecloud_core::codec::validate_name;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, Ia5String, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What [`generate`] wrote.
#[derive(Debug, Clone)]
pub struct Generated {
    /// Every file written, in order.
    pub files: Vec<PathBuf>,
    /// The config file written.
    pub config: PathBuf,
}

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn new_ca(cn: &str) -> anyhow::Result<Ca> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate()?;
    let cert = p.self_signed(&key)?;
    Ok(Ca { cert, key })
}

fn agent_cert(ca: &Ca, group: &str) -> anyhow::Result<(rcgen::Certificate, KeyPair)> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name
        .push(DnType::CommonName, format!("agent.{group}"));
    p.subject_alt_names
        .push(SanType::URI(Ia5String::try_from(group_uri(group))?));
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &ca.cert, &ca.key)?;
    Ok((cert, key))
}

fn write_file(
    path: &Path,
    contents: &str,
    secret: bool,
    files: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot create {}: {e} (refusing to overwrite)",
                path.display()
            )
        })?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    files.push(path.to_path_buf());
    Ok(())
}

/// Generates the test PKI and a config into `dir` (created if missing). Existing files
/// are never overwritten (error instead).
pub fn generate(
    dir: &Path,
    server_name: &str,
    groups: &[String],
    listen: &str,
) -> anyhow::Result<Generated> {
    if groups.is_empty() {
        anyhow::bail!("at least one --group is needed");
    }
    for g in groups {
        validate_name(g).map_err(|e| anyhow::anyhow!("group {g:?}: {e}"))?;
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    let dir = &std::fs::canonicalize(dir)
        .map_err(|e| anyhow::anyhow!("cannot resolve {}: {e}", dir.display()))?;
    let mut files = Vec::new();
    let ca = new_ca("PipeCloud backup test CA")?;
    write_file(&dir.join("ca.pem"), &ca.cert.pem(), false, &mut files)?;
    write_file(
        &dir.join("ca.key"),
        &ca.key.serialize_pem(),
        true,
        &mut files,
    )?;

    let mut p = CertificateParams::new(vec![server_name.to_string()])?;
    p.distinguished_name.push(DnType::CommonName, server_name);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let skey = KeyPair::generate()?;
    let scert = p.signed_by(&skey, &ca.cert, &ca.key)?;
    write_file(&dir.join("server.pem"), &scert.pem(), false, &mut files)?;
    write_file(
        &dir.join("server.key"),
        &skey.serialize_pem(),
        true,
        &mut files,
    )?;

    for g in groups {
        let (c, k) = agent_cert(&ca, g)?;
        write_file(
            &dir.join(format!("{g}-agent.pem")),
            &c.pem(),
            false,
            &mut files,
        )?;
        write_file(
            &dir.join(format!("{g}-agent.key")),
            &k.serialize_pem(),
            true,
            &mut files,
        )?;
    }

    let foreign = new_ca("Foreign CA (must be refused)")?;
    write_file(
        &dir.join("foreign-ca.pem"),
        &foreign.cert.pem(),
        false,
        &mut files,
    )?;
    let first = groups.first().map(String::as_str).unwrap_or("g");
    let (c, k) = agent_cert(&foreign, first)?;
    write_file(&dir.join("foreign-agent.pem"), &c.pem(), false, &mut files)?;
    write_file(
        &dir.join("foreign-agent.key"),
        &k.serialize_pem(),
        true,
        &mut files,
    )?;

    let config = dir.join("backup-server.toml");
    let data_dir = toml_string(&dir.join("data"))?;
    let text = format!(
        "# Generated by `backup-server certs`.\n\
         listen = \"{listen}\"\n\
         data_dir = {data_dir}\n\
         # metrics = \"127.0.0.1:9700\"\n\n\
         [tls]\nca = \"ca.pem\"\ncert = \"server.pem\"\nkey = \"server.key\"\n\n\
         [limits]\n# segment_bytes = 67108864\n# max_journal_bytes = 4294967296\n# retention_secs = 3600\n"
    );
    write_file(&config, &text, false, &mut files)?;
    Ok(Generated { files, config })
}

/// A path as a TOML basic string (quoted and escaped).
fn toml_string(path: &Path) -> anyhow::Result<String> {
    let s = path
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("{} is not valid UTF-8", path.display()))?;
    Ok(toml::Value::String(s.to_string()).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// The written config names its data directory by an absolute path, the canonical
    /// `<dir>/data`, even when `dir` was given relative (the operator passes that path to
    /// `status`/`failover --data-dir` from wherever they stand).
    #[test]
    fn config_has_absolute_data_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(tmp.path()).unwrap();
        // A relative `dir`: resolved against the current directory, which this test
        // does not change (tests run in parallel), so use a path relative to it.
        let cwd = std::env::current_dir().unwrap();
        let rel = pathdiff(&base.join("pki"), &cwd);
        assert!(rel.is_relative());
        let g = generate(&rel, "localhost", &["shop".to_string()], "127.0.0.1:0").unwrap();
        let text = std::fs::read_to_string(&g.config).unwrap();
        let want = base.join("pki").join("data");
        let line = text
            .lines()
            .find(|l| l.starts_with("data_dir"))
            .expect("data_dir line");
        assert_eq!(line, format!("data_dir = {:?}", want.to_str().unwrap()));
        assert!(g.config.is_absolute(), "{}", g.config.display());
        // And the server's own loader agrees.
        let cfg = Config::load(&g.config).unwrap();
        assert_eq!(cfg.data_dir, want);
    }

    /// `to` relative to `from` (both absolute), with `..` components as needed.
    fn pathdiff(to: &Path, from: &Path) -> PathBuf {
        let t: Vec<_> = to.components().collect();
        let f: Vec<_> = from.components().collect();
        let common = t.iter().zip(&f).take_while(|(a, b)| a == b).count();
        let mut out = PathBuf::new();
        for _ in common..f.len() {
            out.push("..");
        }
        for c in &t[common..] {
            out.push(c);
        }
        out
    }
}
