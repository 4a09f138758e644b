//! TLS to etcd: a real three-member cluster serving `https://` and requiring
//! client certificates (`--client-cert-auth`). The lease works with the right
//! CA and client certificate; without a client certificate, or trusting
//! another CA, every call fails (and the lease is never won).

use pipecloud_core::lease::{Reply, Request};
use pipecloud_quorum::etcd::{Etcd, EtcdConfig, EtcdTls};
use pipecloud_quorum::records::GroupRecords;
use pipecloud_quorum::testkit::{EtcdCluster, ServerTls};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(cn: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().unwrap();
    Ca {
        cert: p.self_signed(&key).unwrap(),
        key,
    }
}

/// Writes `<name>.pem` and `<name>.key` signed by `ca`.
fn leaf(dir: &Path, ca: &Ca, name: &str, server: bool) -> (PathBuf, PathBuf) {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    if server {
        p.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
    } else {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.cert, &ca.key).unwrap();
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

/// Removes the directory on drop.
struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn client(cluster: &EtcdCluster, tls: EtcdTls) -> Arc<Etcd> {
    let cfg = EtcdConfig {
        endpoints: cluster.endpoints(),
        tls: Some(tls),
        attempt_timeout: Duration::from_millis(1000),
    };
    Arc::new(Etcd::new(&cfg).expect("etcd client"))
}

#[test]
fn lease_over_tls_with_client_certificates() {
    let dir = Dir(std::env::temp_dir().join(format!("pipecloud-etcd-tls-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let good = ca("etcd test CA");
    let other = ca("another CA");
    let ca_pem = dir.0.join("ca.pem");
    std::fs::write(&ca_pem, good.cert.pem()).unwrap();
    let other_pem = dir.0.join("other-ca.pem");
    std::fs::write(&other_pem, other.cert.pem()).unwrap();
    let (server_cert, server_key) = leaf(&dir.0, &good, "etcd-server", true);
    let (client_cert, client_key) = leaf(&dir.0, &good, "pipecloud-agent", false);
    let with_cert = EtcdTls {
        ca: ca_pem.clone(),
        cert: Some(client_cert),
        key: Some(client_key),
    };
    let cluster = EtcdCluster::start_local_with(
        "tls",
        Some(ServerTls {
            cert: server_cert,
            key: server_key,
            client_ca: Some(ca_pem.clone()),
            client: with_cert.clone(),
        }),
    )
    .expect("etcd cluster over TLS");
    assert!(cluster
        .endpoints()
        .iter()
        .all(|e| e.starts_with("https://")));

    let mut site = GroupRecords::new(client(&cluster, with_cert), "shop", "primary", 2000).unwrap();
    assert!(matches!(site.execute(Request::Observe), Reply::Observed(_)));
    assert_eq!(
        site.execute(Request::Acquire { expected: 0 }),
        Reply::Acquired { generation: 1 }
    );
    assert_eq!(
        site.execute(Request::Renew),
        Reply::Renewed {
            alive: true,
            generation: 1
        }
    );

    // No client certificate: etcd refuses the handshake.
    let no_cert = client(
        &cluster,
        EtcdTls {
            ca: ca_pem,
            cert: None,
            key: None,
        },
    );
    let err = no_cert
        .get("/pipecloud/group/shop/generation")
        .expect_err("must be refused");
    println!("without a client certificate: {err}");
    // Trusting another CA: we refuse etcd's certificate.
    let wrong_ca = client(
        &cluster,
        EtcdTls {
            ca: other_pem,
            cert: None,
            key: None,
        },
    );
    let err = wrong_ca
        .get("/pipecloud/group/shop/generation")
        .expect_err("must be refused");
    println!("with another CA: {err}");
    let mut intruder = GroupRecords::new(wrong_ca, "shop", "backup", 2000).unwrap();
    assert_eq!(
        intruder.execute(Request::Acquire { expected: 1 }),
        Reply::Failed
    );
}
