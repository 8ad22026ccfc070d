//! An in-process super peer (`vesper_superpeer::spawn`, every port 0) leaves no task behind when it shuts down:
//! the node's tracker is empty once `shutdown` returns, and so is the tokio runtime's own count of live tasks
//! (which also sees a `tokio::spawn` that nothing owns).

use std::path::Path;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use vesper_superpeer::config::StartMode;
use vesper_superpeer::tls::TlsPaths;
use vesper_superpeer::Config;

/// A CA and a super peer certificate for 127.0.0.1, written into `dir`.
fn pki(dir: &Path) -> TlsPaths {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "test CA");
    ca.distinguished_name = name;
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca_cert.pem(), ca_key).unwrap();
    let mut params = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, "sp1");
    subject.push(DnType::OrganizationalUnitName, "superpeer");
    params.distinguished_name = subject;
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let paths = TlsPaths {
        ca_cert: dir.join("ca.pem"),
        cert: dir.join("sp1.pem"),
        key: dir.join("sp1.key"),
    };
    std::fs::write(&paths.ca_cert, ca_cert.pem()).unwrap();
    std::fs::write(&paths.cert, cert.pem()).unwrap();
    std::fs::write(&paths.key, key.serialize_pem()).unwrap();
    paths
}

/// Waits up to `timeout` for `done`, checking every few milliseconds; false when it never held.
async fn eventually(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}

/// Starts a leader, proposes once, shuts down; returns what the runtime counted alive after shutdown.
fn run_a_node_and_shut_it_down() -> usize {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tls = pki(dir.path());
    let any_port = "127.0.0.1:0".parse().unwrap();
    let config = Config {
        data_dir: dir.path().join("data"),
        leaf_listen: any_port,
        cluster_listen: any_port,
        admin_listen: any_port,
        ops_listen: any_port,
        start: StartMode::Bootstrap,
        tls: Some(tls),
        ..Config::default()
    };
    let metrics = runtime.metrics();
    runtime.block_on(async {
        let node = vesper_superpeer::spawn(config).await.expect("node starts");
        // A leader, so that Raft, the leader's jobs and the forwarder all run.
        let replica = node.replica.clone();
        assert!(
            eventually(Duration::from_secs(30), || replica.raft().is_ok_and(
                |raft| raft.metrics().borrow_watched().current_leader.is_some()
            ))
            .await,
            "the node never became leader"
        );
        // A proposal through the whole path, and a stale member view.
        let op: vesper_superpeer::command::Op =
            vesper_superpeer::command::TombstoneNode { node_id: 99 }.into();
        let _ = replica.propose(op).await;
        assert!(replica.members().is_ok());
        assert!(metrics.num_alive_tasks() > 0, "the node runs tasks");
        let tracker = node.task_tracker();
        // The test's own handle on the replica (and so on Raft) goes first, as an embedding program's would.
        drop(replica);
        node.shutdown().await;
        assert!(
            tracker.is_empty(),
            "{} tracked tasks outlived shutdown",
            tracker.len()
        );
        eventually(Duration::from_secs(10), || metrics.num_alive_tasks() == 0).await;
        metrics.num_alive_tasks()
    })
}

#[test]
fn a_shut_down_node_leaves_no_task_of_its_own_running() {
    run_a_node_and_shut_it_down();
}

#[test]
fn a_shut_down_node_leaves_no_task_at_all_by_the_runtime_count() {
    let alive = run_a_node_and_shut_it_down();
    assert_eq!(alive, 0, "{alive} tasks are still alive after shutdown");
}
