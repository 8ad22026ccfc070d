//! gRPC server reflection: a generic client discovers the Leaf API on the Leaf port and the Admin API on the
//! Admin port (with an operator certificate), and is told nothing of the Cluster service on either.

use prost::Message as _;
use tonic::transport::Channel;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use vesper_tests::cluster::{Cluster, NodeOptions};

/// One reflection request on a fresh stream, and its answer.
async fn ask(channel: Channel, request: MessageRequest) -> anyhow::Result<MessageResponse> {
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    answers
        .message()
        .await?
        .and_then(|answer| answer.message_response)
        .ok_or_else(|| anyhow::anyhow!("no reflection answer"))
}

async fn services(channel: Channel) -> anyhow::Result<Vec<String>> {
    match ask(channel, MessageRequest::ListServices(String::new())).await? {
        MessageResponse::ListServicesResponse(list) => Ok(list
            .service
            .into_iter()
            .map(|service| service.name)
            .collect()),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}

/// The methods of `service`, from the file descriptors reflection returns for it.
async fn methods(channel: Channel, service: &str) -> anyhow::Result<Vec<String>> {
    let answer = ask(
        channel,
        MessageRequest::FileContainingSymbol(service.into()),
    )
    .await?;
    let MessageResponse::FileDescriptorResponse(files) = answer else {
        anyhow::bail!("unexpected answer {answer:?}");
    };
    let short = service.rsplit('.').next().unwrap_or(service);
    let mut found = Vec::new();
    for bytes in files.file_descriptor_proto {
        let file = prost_types::FileDescriptorProto::decode(bytes.as_slice())?;
        for described in file.service {
            if described.name() == short {
                found.extend(
                    described
                        .method
                        .iter()
                        .map(|method| method.name().to_string()),
                );
            }
        }
    }
    Ok(found)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t76_generic_clients_discover_the_leaf_and_admin_apis() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, NodeOptions::default()).await?;
    let leaf_port = vesper_tests::raw::channel(
        &cluster.nodes[0].endpoints().leaf.to_string(),
        &cluster.pki.ca_pem(),
    )
    .await?;
    let listed = services(leaf_port.clone()).await?;
    assert!(listed.contains(&"vesper.v1.Leaf".to_string()), "{listed:?}");
    assert!(
        listed.contains(&"grpc.health.v1.Health".to_string()),
        "{listed:?}"
    );
    assert!(
        !listed
            .iter()
            .any(|name| name.contains("Cluster") || name.contains("Admin")),
        "{listed:?}"
    );
    let leaf_methods = methods(leaf_port, "vesper.v1.Leaf").await?;
    for method in ["Session", "PutRecord", "SendMessage"] {
        assert!(
            leaf_methods.contains(&method.to_string()),
            "{leaf_methods:?}"
        );
    }

    let admin_port = cluster.admin_channel(0).await?;
    let listed = services(admin_port.clone()).await?;
    assert!(
        listed.contains(&"vesper.v1.Admin".to_string()),
        "{listed:?}"
    );
    assert!(
        !listed.iter().any(|name| name.contains("Cluster")),
        "{listed:?}"
    );
    let admin_methods = methods(admin_port, "vesper.v1.Admin").await?;
    assert!(
        admin_methods.contains(&"Status".to_string()),
        "{admin_methods:?}"
    );
    Ok(())
}
