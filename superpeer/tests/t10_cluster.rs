//! Three super peers form one virtual super peer: writes through any node are readable through every node,
//! search answers exactly what a model of the data says, and bad input is refused without touching state.
//!
//! The nodes run inside the test process (`common::launcher`: `vesper_superpeer::spawn` on real sockets, TLS and
//! RocksDB); the tests that kill processes stay in `tests/tests/`.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rand::{Rng, SeedableRng};
use tonic::Code;
use vesper_leafpeer::{Consistency, Leaf, SearchTerm};
use vesper_proto::v1::{
    search_term, DeleteRecordRequest, GetRecordRequest, PutRecordRequest, SearchRecordsRequest,
};
use vesper_proto::Keypair;
use vesper_tests::cluster::{Cluster, NodeOptions};
use vesper_tests::raw::{self, Signing};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_records_written_through_any_node_are_readable_through_every_node() -> anyhow::Result<()>
{
    let cluster = Cluster::start_in_process(common::launcher(), 3, NodeOptions::default()).await?;
    let mut leaves = Vec::new();
    for index in 0..3 {
        leaves.push(cluster.leaf(index).await?);
    }
    for (index, leaf) in leaves.iter().enumerate() {
        let attributes = HashMap::from([("via".to_string(), format!("sp{}", index + 1))]);
        let record = leaf
            .put(
                "apps.test",
                &format!("from-{index}"),
                attributes,
                vec![index as u8; 100],
                None,
            )
            .await?;
        assert_eq!(record.version, 1);
        assert_eq!(record.owner, leaf.peer_id().to_string());
    }
    for reader in &leaves {
        for (index, writer) in leaves.iter().enumerate() {
            let record = reader
                .get(
                    "apps.test",
                    &format!("from-{index}"),
                    Consistency::Linearizable,
                )
                .await?
                .unwrap_or_else(|| {
                    panic!("from-{index} missing when read via {}", reader.server())
                });
            assert_eq!(record.value, vec![index as u8; 100]);
            assert_eq!(record.owner, writer.peer_id().to_string());
            assert_eq!(record.attributes["via"], format!("sp{}", index + 1));
        }
    }
    // A stale read is served by the replica itself and says which index it reflects.
    let leader = cluster.status_of(0).await?;
    for (index, reader) in leaves.iter().enumerate() {
        cluster.wait_applied(index, leader.applied_index).await?;
        let page = reader
            .list("apps.test", "from-", 10, None, Consistency::Stale)
            .await?;
        assert_eq!(page.records.len(), 3);
        assert!(page.applied_index >= leader.applied_index);
    }
    Ok(())
}

/// The test's model of one record.
#[derive(Debug, Clone)]
struct Modelled {
    owner: usize,
    attributes: HashMap<String, String>,
}

const COLORS: &[&str] = &["red", "green", "blue", "black"];
const SIZES: &[&str] = &["s", "m", "l"];
const NAMES: &[&str] = &["alice", "alina", "bob", "bobby", "carol", "carla", "dave"];

fn matches(model: &Modelled, terms: &[SearchTerm]) -> bool {
    terms.iter().all(|term| match term {
        SearchTerm::Equals(name, value) => model.attributes.get(name) == Some(value),
        SearchTerm::Prefix(name, prefix) => model
            .attributes
            .get(name)
            .is_some_and(|value| value.starts_with(prefix.as_str())),
    })
}

async fn search_all(leaf: &Leaf, terms: &[SearchTerm]) -> anyhow::Result<BTreeSet<String>> {
    let mut keys = BTreeSet::new();
    let mut token = None;
    loop {
        // A small page size makes the pagination path part of every check.
        let page = leaf
            .search("people", terms, 7, token, Consistency::Linearizable)
            .await?;
        for record in page.records {
            assert!(
                keys.insert(record.key.clone()),
                "{} returned twice",
                record.key
            );
        }
        match page.next_page_token {
            Some(next) => token = Some(next),
            None => return Ok(keys),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_search_returns_exactly_the_matching_records() -> anyhow::Result<()> {
    let cluster = Cluster::start_in_process(common::launcher(), 3, NodeOptions::default()).await?;
    let mut leaves = Vec::new();
    for index in 0..3 {
        leaves.push(cluster.leaf(index).await?);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut model: BTreeMap<String, Modelled> = BTreeMap::new();
    for step in 0..300 {
        let key = format!("p{:03}", rng.random_range(0..120));
        match model.get(&key).cloned() {
            // Deletes now and then, always by the owner.
            Some(existing) if step % 7 == 0 => {
                assert!(leaves[existing.owner].delete("people", &key, None).await?);
                model.remove(&key);
            }
            existing => {
                let owner = existing.map_or_else(|| rng.random_range(0..3), |record| record.owner);
                let mut attributes = HashMap::new();
                attributes.insert(
                    "color".into(),
                    COLORS[rng.random_range(0..COLORS.len())].into(),
                );
                if rng.random_bool(0.7) {
                    attributes.insert(
                        "size".into(),
                        SIZES[rng.random_range(0..SIZES.len())].into(),
                    );
                }
                attributes.insert(
                    "name".into(),
                    NAMES[rng.random_range(0..NAMES.len())].into(),
                );
                leaves[owner]
                    .put(
                        "people",
                        &key,
                        attributes.clone(),
                        key.clone().into_bytes(),
                        None,
                    )
                    .await?;
                model.insert(key, Modelled { owner, attributes });
            }
        }
    }
    // A record in another namespace with the same attributes must never show up.
    leaves[0]
        .put(
            "other",
            "p000",
            HashMap::from([("color".to_string(), "red".to_string())]),
            vec![],
            None,
        )
        .await?;

    let mut queries: Vec<Vec<SearchTerm>> = Vec::new();
    for color in COLORS {
        queries.push(vec![SearchTerm::Equals("color".into(), color.to_string())]);
        for size in SIZES {
            queries.push(vec![
                SearchTerm::Equals("color".into(), color.to_string()),
                SearchTerm::Equals("size".into(), size.to_string()),
            ]);
        }
    }
    for prefix in ["a", "al", "ali", "bob", "c", "z", ""] {
        queries.push(vec![SearchTerm::Prefix("name".into(), prefix.into())]);
        queries.push(vec![
            SearchTerm::Prefix("name".into(), prefix.into()),
            SearchTerm::Equals("color".into(), "red".into()),
        ]);
    }
    queries.push(vec![SearchTerm::Equals("missing".into(), "x".into())]);
    for (index, terms) in queries.iter().enumerate() {
        let expected: BTreeSet<String> = model
            .iter()
            .filter(|(_, record)| matches(record, terms))
            .map(|(key, _)| key.clone())
            .collect();
        // Ask a different super peer each time.
        let found = search_all(&leaves[index % 3], terms).await?;
        assert_eq!(found, expected, "search {terms:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_bad_input_is_refused_and_changes_nothing() -> anyhow::Result<()> {
    let cluster = Cluster::start_in_process(common::launcher(), 3, NodeOptions::default()).await?;
    let address = cluster.nodes[1].endpoints().leaf.to_string();
    let owner_key = Keypair::generate();
    let owner = raw::open(
        raw::channel(&address, &cluster.pki.ca_pem()).await?,
        &owner_key,
        Signing::Valid,
    )
    .await?;
    let intruder = raw::open(
        raw::channel(&address, &cluster.pki.ca_pem()).await?,
        &Keypair::generate(),
        Signing::Valid,
    )
    .await?;
    let put =
        |key: &str, value: Vec<u8>, attributes: HashMap<String, String>, expected: Option<u64>| {
            PutRecordRequest {
                namespace: "ns".into(),
                key: key.into(),
                attributes,
                value,
                expected_version: expected,
            }
        };
    let stored = owner
        .client
        .clone()
        .put_record(owner.request(put("k", b"original".to_vec(), HashMap::new(), None)))
        .await?
        .into_inner();
    let written_at = stored.applied_index;
    let leader = cluster.wait_leader_index().await?;
    cluster.wait_quiet(leader).await?;
    let before = cluster.status_of(leader).await?.last_log_index;

    let many: HashMap<String, String> = (0..33)
        .map(|i| (format!("a{i}"), "v".to_string()))
        .collect();
    let cases: Vec<(&str, PutRecordRequest, Code, &str)> = vec![
        (
            "value over the limit",
            put("k", vec![0; 64 * 1024 + 1], HashMap::new(), None),
            Code::ResourceExhausted,
            "value is 65537 bytes",
        ),
        (
            "too many attributes",
            put("k", vec![], many, None),
            Code::ResourceExhausted,
            "33 attributes",
        ),
        (
            "attribute value too long",
            put(
                "k",
                vec![],
                HashMap::from([("a".into(), "v".repeat(257))]),
                None,
            ),
            Code::ResourceExhausted,
            "attribute value is 257 bytes",
        ),
        (
            "bad attribute name",
            put(
                "k",
                vec![],
                HashMap::from([("Bad Name".into(), "v".into())]),
                None,
            ),
            Code::InvalidArgument,
            "attribute name",
        ),
        (
            "bad namespace",
            PutRecordRequest {
                namespace: "No/Such".into(),
                ..put("k", vec![], HashMap::new(), None)
            },
            Code::InvalidArgument,
            "namespace",
        ),
        (
            "key with a control character",
            put("a\u{1}b", vec![], HashMap::new(), None),
            Code::InvalidArgument,
            "key contains a control character",
        ),
        (
            "empty key",
            put("", vec![], HashMap::new(), None),
            Code::InvalidArgument,
            "key is empty",
        ),
        (
            "stale compare-and-set",
            put("k", b"new".to_vec(), HashMap::new(), Some(7)),
            Code::FailedPrecondition,
            "expected 7, current 1",
        ),
        (
            "create-only on an existing record",
            put("k", b"new".to_vec(), HashMap::new(), Some(0)),
            Code::FailedPrecondition,
            "expected 0, current 1",
        ),
    ];
    for (what, request, code, message) in cases {
        let status = owner
            .client
            .clone()
            .put_record(owner.request(request))
            .await
            .expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(
            status.message().contains(message),
            "{what}: {:?} lacks {message:?}",
            status.message()
        );
    }

    // Another peer's record: neither overwrite nor delete.
    let status = intruder
        .client
        .clone()
        .put_record(intruder.request(put("k", b"mine now".to_vec(), HashMap::new(), None)))
        .await
        .expect_err("foreign put");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("owned by another peer"));
    let delete = DeleteRecordRequest {
        namespace: "ns".into(),
        key: "k".into(),
        expected_version: None,
    };
    let status = intruder
        .client
        .clone()
        .delete_record(intruder.request(delete.clone()))
        .await
        .expect_err("foreign delete");
    assert_eq!(status.code(), Code::PermissionDenied);

    // No session, an unknown token.
    let mut anonymous = vesper_proto::v1::leaf_client::LeafClient::new(
        raw::channel(&address, &cluster.pki.ca_pem()).await?,
    );
    let status = anonymous
        .put_record(put("k", vec![], HashMap::new(), None))
        .await
        .expect_err("no session");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("no session"));
    let status = anonymous
        .get_record(raw::with_token(
            GetRecordRequest {
                namespace: "ns".into(),
                key: "k".into(),
                consistency: 0,
            },
            "0000",
        ))
        .await
        .expect_err("bad token");
    assert_eq!(status.code(), Code::Unauthenticated);

    // Bad signatures never get a session.
    for signing in [Signing::Corrupt, Signing::WrongNonce] {
        let channel = raw::channel(&address, &cluster.pki.ca_pem()).await?;
        let status = raw::open(channel, &Keypair::generate(), signing)
            .await
            .err()
            .expect("a bad signature must be refused");
        assert_eq!(
            status.code(),
            Code::Unauthenticated,
            "{signing:?}: {status:?}"
        );
        assert!(status.message().contains("signature"), "{status:?}");
    }

    // A search without terms or with too many.
    let search = |terms: Vec<vesper_proto::v1::SearchTerm>| SearchRecordsRequest {
        namespace: "ns".into(),
        terms,
        ..Default::default()
    };
    let status = owner
        .client
        .clone()
        .search_records(owner.request(search(vec![])))
        .await
        .expect_err("no terms");
    assert_eq!(status.code(), Code::InvalidArgument);
    let term = vesper_proto::v1::SearchTerm {
        attribute: "a".into(),
        condition: Some(search_term::Condition::Equals("v".into())),
    };
    let status = owner
        .client
        .clone()
        .search_records(owner.request(search(vec![term; 9])))
        .await
        .expect_err("too many terms");
    assert_eq!(status.code(), Code::ResourceExhausted);

    // Nothing reached Raft, and the record is as it was.
    let after = cluster.status_of(leader).await?.last_log_index;
    assert_eq!(before, after, "a refused request moved the Raft log");
    let record = owner.record("ns", "k").await?.expect("record still there");
    assert_eq!(record.value, b"original");
    assert_eq!(record.version, 1);
    assert_eq!(record.owner, owner_key.peer_id().to_string());
    assert!(written_at <= after);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_health_answers_on_every_port_and_plaintext_is_refused() -> anyhow::Result<()> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let cluster = Cluster::start_in_process(common::launcher(), 1, NodeOptions::default()).await?;
    let endpoints = cluster.nodes[0].endpoints();
    let (cert, key) = cluster.pki.operator_cert();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(cluster.pki.ca_pem()))
        .identity(Identity::from_pem(
            std::fs::read(cert)?,
            std::fs::read(key)?,
        ))
        .domain_name("127.0.0.1");
    for (port, address) in [
        ("leaf", endpoints.leaf),
        ("cluster", endpoints.cluster),
        ("admin", endpoints.admin),
    ] {
        let channel = Endpoint::from_shared(format!("https://{address}"))?
            .tls_config(tls.clone())?
            .connect()
            .await?;
        for service in ["", "vesper.v1.Leaf"] {
            let reply = HealthClient::new(channel.clone())
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await?
                .into_inner();
            assert_eq!(
                reply.status, 1,
                "{port} port, service {service:?}: {reply:?}"
            );
        }
        // A plaintext client gets nothing from a TLS port.
        let plaintext = Endpoint::from_shared(format!("http://{address}"))?
            .connect()
            .await;
        if let Ok(channel) = plaintext {
            let result = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            assert!(result.is_err(), "{port} port answered plaintext");
        }
    }
    // Cluster and admin ports require a client certificate.
    let server_only = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(cluster.pki.ca_pem()))
        .domain_name("127.0.0.1");
    for address in [endpoints.cluster, endpoints.admin] {
        let attempt = async {
            let channel = Endpoint::from_shared(format!("https://{address}"))?
                .tls_config(server_only.clone())?
                .connect()
                .await?;
            HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await?;
            anyhow::Ok(())
        };
        assert!(
            attempt.await.is_err(),
            "{address} accepted a client without a certificate"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_certificates_are_checked_for_their_ca_and_role() -> anyhow::Result<()> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    use vesper_proto::v1::admin_client::AdminClient;
    use vesper_proto::v1::cluster_client::ClusterClient;
    use vesper_proto::v1::{DescribeRequest, StatusRequest};

    let cluster = Cluster::start_in_process(common::launcher(), 1, NodeOptions::default()).await?;
    let endpoints = cluster.nodes[0].endpoints();
    let tls = |ca: &std::path::Path,
               cert: &std::path::Path,
               key: &std::path::Path|
     -> anyhow::Result<ClientTlsConfig> {
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(ca)?))
            .identity(Identity::from_pem(
                std::fs::read(cert)?,
                std::fs::read(key)?,
            ))
            .domain_name("127.0.0.1"))
    };
    let channel = |address: std::net::SocketAddr, tls: ClientTlsConfig| async move {
        anyhow::Ok(
            Endpoint::from_shared(format!("https://{address}"))?
                .tls_config(tls)?
                .connect()
                .await?,
        )
    };
    let (operator_cert, operator_key) = cluster.pki.operator_cert();
    let (superpeer_cert, superpeer_key) = cluster.pki.superpeer_cert();
    let ca = cluster.pki.ca_cert();

    // An operator certificate cannot speak Raft or join.
    let mut as_operator = ClusterClient::new(
        channel(endpoints.cluster, tls(&ca, &operator_cert, &operator_key)?).await?,
    );
    let status = as_operator
        .describe(DescribeRequest {})
        .await
        .expect_err("operator on the cluster port");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("role superpeer"), "{status:?}");
    // Only operators reach the Admin service; a super peer certificate is refused there too (followers forward
    // membership calls over the Cluster port, t50 runs them through followers).
    let mut admin =
        AdminClient::new(channel(endpoints.admin, tls(&ca, &operator_cert, &operator_key)?).await?);
    admin.status(StatusRequest {}).await?;
    let mut as_superpeer = AdminClient::new(
        channel(endpoints.admin, tls(&ca, &superpeer_cert, &superpeer_key)?).await?,
    );
    let status = as_superpeer
        .status(StatusRequest {})
        .await
        .expect_err("super peer on the admin port");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("role operator"), "{status:?}");

    // Certificates of another CA get nowhere, on any port.
    let other = vesper_tests::pki::Pki::create(&cluster.root().join("other-pki"))?;
    let (foreign_cert, foreign_key) = other.operator_cert();
    for address in [endpoints.admin, endpoints.cluster] {
        let attempt = async {
            let mut admin =
                AdminClient::new(channel(address, tls(&ca, &foreign_cert, &foreign_key)?).await?);
            admin.status(StatusRequest {}).await?;
            anyhow::Ok(())
        };
        assert!(
            attempt.await.is_err(),
            "{address} accepted a certificate of another CA"
        );
    }
    // A leaf that trusts another CA does not trust these super peers.
    let foreign_leaf = vesper_leafpeer::Leaf::connect(vesper_leafpeer::LeafConfig::new(
        vec![endpoints.leaf.to_string()],
        other.ca_pem(),
        Keypair::generate(),
    ))
    .await;
    assert!(
        foreign_leaf.is_err(),
        "a leaf attached to a super peer its CA did not sign"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_a_leaf_port_whose_udp_twin_is_taken_is_refused_by_name() -> anyhow::Result<()> {
    // The STUN and relay port is the UDP port with the Leaf port's number. Given explicitly and taken, start-up
    // fails naming it (with port 0 the node picks another pair instead; the other tests start every node so).
    let dir = tempfile::tempdir()?;
    let pki = vesper_tests::pki::Pki::create(&dir.path().join("pki"))?;
    let (cert, key) = pki.superpeer_cert();
    for attempt in 0..5 {
        let taken = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let address = taken.local_addr()?.to_string();
        let output = std::process::Command::new(vesper_tests::binary("superpeer"))
            .arg("--data-dir")
            .arg(dir.path().join(format!("data-{attempt}")))
            .args(["--leaf-listen", &address])
            .args([
                "--cluster-listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--ops-listen",
                "127.0.0.1:0",
            ])
            .arg("--tls-ca")
            .arg(pki.ca_cert())
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .arg("--bootstrap")
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        // Another program may hold the TCP port of that number too (then the Leaf port itself is named); take
        // another UDP port and try again.
        if stderr.contains("cannot bind leaf service") {
            continue;
        }
        assert!(
            stderr.contains("stun port (udp") && stderr.contains(&address),
            "{stderr}"
        );
        return Ok(());
    }
    anyhow::bail!("five UDP ports in a row had their TCP twin taken too")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_protocol_versions_are_agreed_at_attach_and_between_members() -> anyhow::Result<()> {
    use vesper_proto::v1::cluster_client::ClusterClient;
    use vesper_proto::v1::DescribeRequest;
    use vesper_proto::version::{CLUSTER_METADATA_KEY, NEWEST, OLDEST};

    let cluster = Cluster::start_in_process(common::launcher(), 1, NodeOptions::default()).await?;
    let leaf_address = cluster.nodes[0].endpoints().leaf.to_string();
    let ca = cluster.pki.ca_pem();
    let attach = |protocol: (u32, u32)| {
        let (address, ca) = (leaf_address.clone(), ca.clone());
        async move {
            let channel = raw::channel(&address, &ca).await?;
            anyhow::Ok(
                raw::open_with(channel, &Keypair::generate(), Signing::Valid, protocol).await,
            )
        }
    };
    // A leaf that names no version, or only versions this build does not speak, is refused with both ranges.
    for (protocol, expected) in [
        ((0, 0), "names no protocol version (Attach.protocol_newest)"),
        (
            (90, 99),
            "the peer speaks 90-99, this side speaks 2; this side is older",
        ),
    ] {
        let Err(status) = attach(protocol).await? else {
            anyhow::bail!("an attach with protocol {protocol:?} was welcomed");
        };
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains(expected), "{status:?}");
    }
    // A leaf of this build, and one of a later release that still speaks this one: the highest common version.
    for protocol in [(OLDEST, NEWEST), (OLDEST, NEWEST + 1)] {
        let session = attach(protocol).await?.map_err(anyhow::Error::from)?;
        assert_eq!(session.welcome.protocol_version, NEWEST, "{protocol:?}");
    }

    // Between members: every Cluster call carries the caller's range.
    cluster
        .cluster_client(0)
        .await?
        .describe(DescribeRequest {})
        .await?;
    let unstamped = ClusterClient::new(cluster.cluster_channel(0).await?)
        .describe(DescribeRequest {})
        .await
        .expect_err("a Cluster call without a protocol range");
    assert_eq!(unstamped.code(), Code::FailedPrecondition, "{unstamped:?}");
    assert!(
        unstamped.message().contains("x-vesper-protocol"),
        "{unstamped:?}"
    );
    let future = ClusterClient::with_interceptor(
        cluster.cluster_channel(0).await?,
        |mut request: tonic::Request<()>| {
            let range = tonic::metadata::MetadataValue::from_static("90-99");
            request.metadata_mut().insert(CLUSTER_METADATA_KEY, range);
            Ok(request)
        },
    )
    .describe(DescribeRequest {})
    .await
    .expect_err("a Cluster call from a far newer member");
    assert_eq!(future.code(), Code::FailedPrecondition, "{future:?}");
    assert!(
        future.message().contains("the peer speaks 90-99"),
        "{future:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_a_malformed_message_is_invalid_argument_naming_the_field() -> anyhow::Result<()> {
    use prost::Message as _;
    use vesper_proto::v1::{PutRecordRequest, PutRecordResponse};

    let cluster = Cluster::start_in_process(common::launcher(), 1, NodeOptions::default()).await?;
    let address = cluster.nodes[0].endpoints().leaf.to_string();
    let ca = cluster.pki.ca_pem();
    let session = raw::open(
        raw::channel(&address, &ca).await?,
        &Keypair::generate(),
        Signing::Valid,
    )
    .await?;
    // Field 1 (namespace), length 2, bytes that are not UTF-8; then a valid key.
    let mut body = vec![0x0a, 0x02, 0xff, 0xfe];
    body.extend(
        PutRecordRequest {
            key: "k".into(),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let refused = raw::unary_bytes::<PutRecordResponse>(
        raw::channel(&address, &ca).await?,
        "/vesper.v1.Leaf/PutRecord",
        body,
        Some(&session.token),
    )
    .await
    .expect_err("a namespace that is not UTF-8");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("PutRecordRequest.namespace"),
        "{refused:?}"
    );
    // A field cut short is refused the same way; the session that made the calls goes on.
    let refused = raw::unary_bytes::<PutRecordResponse>(
        raw::channel(&address, &ca).await?,
        "/vesper.v1.Leaf/PutRecord",
        vec![0x12, 0x10, b'k'],
        Some(&session.token),
    )
    .await
    .expect_err("a truncated key");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    let put = PutRecordRequest {
        namespace: "apps.test".into(),
        key: "after".into(),
        value: b"still attached".to_vec(),
        ..Default::default()
    };
    session
        .client
        .clone()
        .put_record(session.request(put))
        .await?;
    assert!(session.record("apps.test", "after").await?.is_some());
    Ok(())
}
