//! The in-process launcher for the test harness's `Cluster`: super peers started with `vesper_superpeer::spawn`
//! inside the test process, from the same command line the binary takes.

use std::ffi::OsString;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt;
use vesper_superpeer::RunningNode;
use vesper_tests::cluster::{Endpoints, InProcessNode, Launch};

/// Starts nodes with [`vesper_superpeer::spawn`].
pub struct InProcess;

/// The launcher to hand to `Cluster::start_in_process`.
pub fn launcher() -> Arc<dyn Launch> {
    Arc::new(InProcess)
}

struct Node(RunningNode);

impl InProcessNode for Node {
    fn endpoints(&self) -> Endpoints {
        let bound = &self.0.endpoints;
        Endpoints {
            leaf: bound.leaf,
            cluster: bound.cluster,
            admin: bound.admin,
            stun: bound.stun,
            ops: bound.ops,
        }
    }

    fn stop(self: Box<Self>) -> BoxFuture<'static, ()> {
        self.0.shutdown().boxed()
    }
}

impl Launch for InProcess {
    fn launch(
        &self,
        argv: Vec<OsString>,
    ) -> BoxFuture<'static, anyhow::Result<Box<dyn InProcessNode>>> {
        async move {
            let config = vesper_superpeer::cli::config_from_args(argv).map_err(|problems| {
                anyhow::anyhow!("invalid configuration: {}", problems.join("; "))
            })?;
            let node = vesper_superpeer::spawn(config).await?;
            Ok(Box::new(Node(node)) as Box<dyn InProcessNode>)
        }
        .boxed()
    }
}
