//! Pods as processes: the chart rendered by a real `helm`, its StatefulSet's container run as real
//! `superpeer` processes exactly as the manifest says (command, arguments, environment with the downward API
//! filled in, volumes mounted where the manifest mounts them, its user, no capabilities, a read-only root),
//! each pod in its own network namespace whose hosts file resolves the headless Service's pod names, and the
//! hook Jobs and the `helm test` Pod run the same way. The life of a release, in the order helm and the
//! StatefulSet controller would act:
//!
//! - install of 3 pods (all at once, Parallel), then the post-install init Job;
//! - an upgrade to 5 replicas: the pre-upgrade scale-down Job finds nothing, pods 3 and 4 start, the
//!   post-upgrade init Job sets 3 voters and 2 standbys;
//! - an upgrade back to 3: the scale-down Job takes pods 4 and 3 out of the cluster while they still run, the
//!   StatefulSet then stops them and deletes their volumes, the init Job sets the targets again;
//! - a rolling restart of every pod, highest ordinal first, each waiting for the previous to be ready for
//!   minReadySeconds, under write load with attached leaves: no acknowledged write lost, the leaves of each
//!   stopped pod moved, the longest stretch without an acknowledged write reported;
//! - pod 0 restarted with its volume (same node id), then with an empty one (a new node id in the same
//!   cluster, which replaces the old one; never a second cluster);
//! - the `helm test` Pod passing against the cluster;
//! - `vesperctl --tls-server-name` reaching a pod by an address its certificate does not name (NOTES.txt's
//!   port-forward advice), which is refused without it.
//!
//! The test runs in two halves: the outer one builds the namespaces and runs the inner one (this same test
//! binary) inside the client namespace, so that the test's own leaves and `vesperctl` resolve pod names as a
//! pod would. Needs root, iproute2 and util-linux (`setpriv`). `VESPER_T111_KEEP=1` keeps the pods' logs and
//! volumes in the folder it prints.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use serde_json::Value;
use vesper_leafpeer::{Keypair, Leaf, LeafConfig};
use vesper_tests::chart::{self, Manifests};
use vesper_tests::load::{self, Load};
use vesper_tests::pki::Pki;
use vesper_tests::podlab::{self, Container, PodNet};
use vesper_tests::wait;

/// Set in the inner half: the pod network's prefix.
const INNER: &str = "VESPER_T111_NET";
const MAX_PODS: usize = 5;
/// Room for a loaded 2-core machine.
const TIMEOUT: Duration = Duration::from_secs(120);
const LEAVES: usize = 6;
/// Writes must stay available through a rolling restart: each stop hands leadership over first.
const WRITE_GAP_BOUND: Duration = Duration::from_secs(10);

/// Values the test installs with, besides the Secrets: a shorter drain, and a dead voter replaced after 10 s
/// and a dead standby retired after 15 s (defaults 5 m and 30 m), so that the lost-volume case completes in
/// test time; everything else is the chart's default.
const VALUES: &str = "\
tls:
  existingSecret: vesper-tls
  operatorSecret: vesper-operator-tls
minReadySeconds: 5
config:
  drain_timeout: 6s
  placement:
    dead_voter_after: 10s
    dead_standby_after: 15s
";

#[test]
fn t111_the_chart_runs_as_processes_through_install_scaling_restarts_and_helm_test() {
    if let Ok(prefix) = std::env::var(INNER) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        if let Err(error) = runtime.block_on(inner(PodNet::attach(&prefix, MAX_PODS))) {
            panic!("{error:#}");
        }
        return;
    }
    let net = PodNet::create(MAX_PODS).expect("the pod network");
    let status = Command::new("ip")
        .args(["netns", "exec", &net.ns("client")])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "t111_the_chart_runs_as_processes_through_install_scaling_restarts_and_helm_test",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(INNER, &net.prefix)
        .status()
        .expect("run the inner half");
    drop(net);
    assert!(
        status.success(),
        "the pods-as-processes run failed (its output is above)"
    );
}

/// A running super peer pod.
struct Pod {
    child: Child,
    grace: Duration,
}

struct Lab {
    net: PodNet,
    dir: tempfile::TempDir,
    image: PathBuf,
    values: PathBuf,
    superpeer_secret: PathBuf,
    operator_secret: PathBuf,
    operator_env: Vec<(String, String)>,
    ca_pem: Vec<u8>,
    pods: BTreeMap<usize, Pod>,
    manifests: Manifests,
    /// Where the ConfigMap is "mounted" from.
    config_dir: PathBuf,
    group: u32,
}

impl Lab {
    fn new(net: PodNet) -> anyhow::Result<Lab> {
        // VESPER_T111_KEEP=1 keeps the folder (pod logs, volumes, rendered files) for a look afterwards.
        let keep = std::env::var_os("VESPER_T111_KEEP").is_some();
        let dir = tempfile::Builder::new()
            .prefix("vesper-t111-")
            .disable_cleanup(keep)
            .tempdir()?;
        if keep {
            println!("keeping {}", dir.path().display());
        }
        let image = podlab::image(dir.path())?;
        let sans: Vec<String> = vec![
            format!(
                "*.{}.{}.svc.cluster.local",
                chart::headless(),
                chart::NAMESPACE
            ),
            chart::leaf_service_host(),
            chart::admin_service_host(),
        ];
        let pki = Pki::create_with_sans(&dir.path().join("pki"), &sans)?;
        let values = dir.path().join("values.yaml");
        std::fs::write(&values, VALUES)?;
        let manifests = Manifests::render(&[&values], &[])?;
        let pod_spec = &manifests.statefulset()["spec"]["template"]["spec"];
        let group = pod_spec["securityContext"]["fsGroup"]
            .as_u64()
            .context("the pods have an fsGroup")? as u32;
        let secret = |name: &str, (cert, key): (PathBuf, PathBuf)| -> anyhow::Result<PathBuf> {
            let folder = dir.path().join(name);
            std::fs::create_dir_all(&folder)?;
            std::fs::copy(pki.ca_cert(), folder.join("ca.crt"))?;
            std::fs::copy(cert, folder.join("tls.crt"))?;
            std::fs::copy(key, folder.join("tls.key"))?;
            podlab::give_to_group(&folder, group, true)?;
            Ok(folder)
        };
        let superpeer_secret = secret("secret-vesper-tls", pki.superpeer_cert())?;
        let operator_secret = secret("secret-vesper-operator-tls", pki.operator_cert())?;
        let operator_env = vec![
            (
                "VESPER_CA".into(),
                operator_secret.join("ca.crt").display().to_string(),
            ),
            (
                "VESPER_CERT".into(),
                operator_secret.join("tls.crt").display().to_string(),
            ),
            (
                "VESPER_KEY".into(),
                operator_secret.join("tls.key").display().to_string(),
            ),
        ];
        let config_dir = dir.path().join("configmap");
        std::fs::create_dir_all(&config_dir)?;
        let lab = Lab {
            net,
            image,
            values,
            superpeer_secret,
            operator_secret,
            operator_env,
            ca_pem: pki.ca_pem(),
            pods: BTreeMap::new(),
            manifests,
            config_dir,
            group,
            dir,
        };
        lab.write_configmap()?;
        Ok(lab)
    }

    /// Renders the chart for `replicas` (what `helm upgrade --set replicas=N` applies).
    fn render(&mut self, replicas: usize) -> anyhow::Result<()> {
        let before = self.manifests.statefulset()["spec"]["template"].clone();
        self.manifests = Manifests::render(&[&self.values], &[&format!("replicas={replicas}")])?;
        ensure!(
            self.manifests.statefulset()["spec"]["template"] == before,
            "scaling to {replicas} changed the pod template"
        );
        self.write_configmap()
    }

    fn write_configmap(&self) -> anyhow::Result<()> {
        std::fs::write(
            self.config_dir.join("superpeer.toml"),
            self.manifests.superpeer_toml(),
        )?;
        podlab::give_to_group(&self.config_dir, self.group, true)
    }

    fn replicas(&self) -> usize {
        self.manifests.statefulset()["spec"]["replicas"]
            .as_u64()
            .unwrap() as usize
    }

    fn volume(&self, ordinal: usize) -> PathBuf {
        self.dir.path().join(format!("pvc-data-{ordinal}"))
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// A fresh emptyDir.
    fn empty_dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.dir.path().join(format!("emptydir-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777))?;
        Ok(dir)
    }

    /// Starts pod `ordinal` (its volume kept from before, or provisioned empty).
    fn start_pod(&mut self, ordinal: usize) -> anyhow::Result<()> {
        let volume = self.volume(ordinal);
        if !volume.exists() {
            std::fs::create_dir_all(&volume)?;
            podlab::give_to_group(&volume, self.group, false)?;
        }
        let tmp = self.empty_dir(&format!("p{ordinal}"))?;
        let pod_spec = &self.manifests.statefulset()["spec"]["template"]["spec"];
        let name = format!("{}-{ordinal}", chart::fullname());
        let container = Container::from_pod_spec(
            pod_spec,
            Some("superpeer"),
            |field| match field {
                "metadata.name" => Some(name.clone()),
                "metadata.namespace" => Some(chart::NAMESPACE.to_string()),
                _ => None,
            },
            &[
                ("data", volume),
                ("config", self.config_dir.clone()),
                ("tls", self.superpeer_secret.clone()),
                ("tmp", tmp),
            ],
            &self.image,
        )?;
        let child = container.spawn(
            &self.net.pod_ns(ordinal),
            &self.log(&format!("pod-{ordinal}")),
        )?;
        self.pods.insert(
            ordinal,
            Pod {
                child,
                grace: container.grace,
            },
        );
        Ok(())
    }

    /// Stops pod `ordinal` as the kubelet does; returns how long it took.
    async fn stop_pod(&mut self, ordinal: usize) -> anyhow::Result<Duration> {
        let mut pod = self
            .pods
            .remove(&ordinal)
            .context("the pod is not running")?;
        let (took, killed) = podlab::terminate(&mut pod.child, pod.grace).await?;
        ensure!(!killed, "pod {ordinal} needed SIGKILL after {took:?}");
        Ok(took)
    }

    /// Fails when a pod's process has exited: a super peer waits and retries, it never gives up by exiting.
    fn check_running(&mut self) -> anyhow::Result<()> {
        for (ordinal, pod) in &mut self.pods {
            if let Some(status) = pod.child.try_wait()? {
                let log =
                    std::fs::read_to_string(self.dir.path().join(format!("pod-{ordinal}.log")))
                        .unwrap_or_default();
                anyhow::bail!("pod {ordinal} exited ({status}):\n{log}");
            }
        }
        Ok(())
    }

    async fn ready(&self, ordinal: usize) -> bool {
        let addr = (self.net.pod_ip(ordinal), ops_port(&self.manifests)).into();
        matches!(vesper_tests::ops::get(addr, "/readyz").await, Ok((200, _)))
    }

    /// Waits until every running pod is ready.
    async fn wait_ready(&mut self, what: &str) -> anyhow::Result<()> {
        let ordinals: Vec<usize> = self.pods.keys().copied().collect();
        wait::until(what, TIMEOUT, || async {
            for &ordinal in &ordinals {
                if !self.ready(ordinal).await {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        })
        .await?;
        self.check_running()
    }

    /// Runs a hook Job's or the test Pod's container in the job namespace, with the restarts its
    /// restartPolicy and backoffLimit allow; returns its output.
    async fn run_hook(&self, kind: &str, name: &str) -> anyhow::Result<String> {
        let doc = self
            .manifests
            .get(kind, &format!("{}-{name}", chart::fullname()));
        let (pod_spec, attempts) = if kind == "Job" {
            let backoff = doc["spec"]["backoffLimit"].as_u64().unwrap_or(6) as usize;
            (&doc["spec"]["template"]["spec"], backoff + 1)
        } else {
            (&doc["spec"], 1)
        };
        let pod_name = format!("{}-{name}", chart::fullname());
        let tmp = self.empty_dir(name)?;
        let container = Container::from_pod_spec(
            pod_spec,
            None,
            |field| match field {
                "metadata.name" => Some(pod_name.clone()),
                "metadata.namespace" => Some(chart::NAMESPACE.to_string()),
                _ => None,
            },
            &[("operator-tls", self.operator_secret.clone()), ("tmp", tmp)],
            &self.image,
        )?;
        let deadline =
            Duration::from_secs(doc["spec"]["activeDeadlineSeconds"].as_u64().unwrap_or(300));
        let mut output = String::new();
        for attempt in 1..=attempts {
            let (ok, text) = container
                .run(&self.net.ns("job"), &self.log(name), deadline)
                .await?;
            output.push_str(&text);
            if ok {
                println!("{kind} {name} succeeded (attempt {attempt})");
                return Ok(output);
            }
        }
        anyhow::bail!("{kind} {name} failed {attempts} times:\n{output}")
    }

    /// `vesperctl ARGS --json` as the operator, against pod `ordinal`'s Admin port by its DNS name.
    fn vesperctl(&self, ordinal: usize, args: &[&str]) -> anyhow::Result<Value> {
        let server = format!(
            "{}:{}",
            chart::pod_host(ordinal),
            admin_port(&self.manifests)
        );
        let output = Command::new(vesper_tests::binary("vesperctl"))
            .args(args)
            .args(["--server", &server, "--json"])
            .envs(
                self.operator_env
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .output()?;
        ensure!(
            output.status.success(),
            "vesperctl {args:?} against pod {ordinal}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(serde_json::from_slice(&output.stdout)?)
    }

    /// The live members as pod pods see them: (node id, ordinal from the Cluster address, role).
    fn members(&self, ordinal: usize) -> anyhow::Result<Vec<(u64, Option<usize>, String)>> {
        let status = self.vesperctl(ordinal, &["status"])?;
        Ok(status["members"]
            .as_array()
            .context("members")?
            .iter()
            .filter(|member| member["role"] != "removed")
            .map(|member| {
                let addr = member["cluster_addr"].as_str().unwrap_or_default();
                let ordinal =
                    (0..MAX_PODS).find(|&o| addr.starts_with(&format!("{}:", chart::pod_host(o))));
                (
                    member["node_id"].as_u64().unwrap_or(0),
                    ordinal,
                    member["role"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect())
    }

    /// Waits until pod `ordinal` lists exactly `voters` voters and `standbys` standbys among the pods `pods`.
    async fn wait_roles(
        &self,
        ordinal: usize,
        voters: usize,
        standbys: usize,
        pods: usize,
    ) -> anyhow::Result<()> {
        wait::until(
            &format!("{voters} voters and {standbys} standbys on pods 0..{pods}"),
            TIMEOUT,
            || async {
                let Ok(members) = self.members(ordinal) else {
                    return Ok(None);
                };
                let count = |role: &str| members.iter().filter(|(_, _, r)| r == role).count();
                let on_pods = members.iter().all(|(_, o, _)| o.is_some_and(|o| o < pods));
                Ok(
                    (count("voter") == voters && count("standby") == standbys && on_pods)
                        .then_some(()),
                )
            },
        )
        .await
    }

    async fn leaf(&self, ordinal: usize) -> anyhow::Result<Leaf> {
        let port = leaf_port(&self.manifests);
        let seeds = vec![
            format!("{}:{port}", chart::pod_host(ordinal)),
            format!("{}:{port}", chart::leaf_service_host()),
        ];
        let mut config = LeafConfig::new(seeds, self.ca_pem.clone(), Keypair::generate());
        config.publish_endpoints = false;
        Ok(Leaf::connect(config).await?)
    }
}

fn port(manifests: &Manifests, name: &str) -> u16 {
    let container = &manifests.statefulset()["spec"]["template"]["spec"]["containers"][0];
    container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|port| port["name"] == name)
        .and_then(|port| port["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no container port {name}")) as u16
}

fn ops_port(manifests: &Manifests) -> u16 {
    port(manifests, "ops")
}

fn admin_port(manifests: &Manifests) -> u16 {
    port(manifests, "admin")
}

fn leaf_port(manifests: &Manifests) -> u16 {
    port(manifests, "leaf")
}

fn min_ready(manifests: &Manifests) -> Duration {
    Duration::from_secs(
        manifests.statefulset()["spec"]["minReadySeconds"]
            .as_u64()
            .unwrap_or(0),
    )
}

fn on_pod(leaf: &Leaf, ordinal: usize) -> bool {
    leaf.server()
        .starts_with(&format!("{}:", chart::pod_host(ordinal)))
}

async fn inner(net: PodNet) -> anyhow::Result<()> {
    let mut lab = Lab::new(net)?;
    let run = scenario(&mut lab).await;
    let ordinals: Vec<usize> = lab.pods.keys().copied().collect();
    for ordinal in ordinals {
        let _ = lab.stop_pod(ordinal).await;
    }
    if run.is_err() {
        for ordinal in 0..MAX_PODS {
            let log = lab.log(&format!("pod-{ordinal}"));
            if let Ok(text) = std::fs::read_to_string(&log) {
                let lines: Vec<&str> = text.lines().collect();
                println!("--- last lines of pod {ordinal}'s log");
                for line in &lines[lines.len().saturating_sub(40)..] {
                    println!("{line}");
                }
            }
        }
    }
    run
}

async fn scenario(lab: &mut Lab) -> anyhow::Result<()> {
    // Install: the StatefulSet starts every pod at once; then the post-install hook.
    let started = Instant::now();
    for ordinal in 0..lab.replicas() {
        lab.start_pod(ordinal)?;
    }
    let init = lab.run_hook("Job", "init").await?;
    lab.wait_ready("3 pods ready after the install").await?;
    lab.wait_roles(0, 3, 0, 3).await?;
    let bootstrapped = init
        .lines()
        .find(|line| line.starts_with("bootstrapped"))
        .with_context(|| format!("the first init Job did not bootstrap: {init}"))?;
    println!(
        "install: 3 pods ready, 3 voters, in {} ms; the init Job said: {bootstrapped}",
        started.elapsed().as_millis()
    );
    // What NOTES.txt tells an operator behind a port-forward: an address the certificate does not name, and
    // --tls-server-name naming the admin Service.
    let by_ip = format!("{}:{}", lab.net.pod_ip(0), admin_port(&lab.manifests));
    let operator = |extra: &[&str]| {
        Command::new(vesper_tests::binary("vesperctl"))
            .args(["status", "--server", &by_ip])
            .args(extra)
            .envs(
                lab.operator_env
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .output()
    };
    let refused = operator(&[])?;
    ensure!(
        !refused.status.success(),
        "a pod IP the certificate does not name was accepted"
    );
    let named = operator(&["--tls-server-name", &chart::admin_service_host()])?;
    ensure!(
        named.status.success(),
        "vesperctl --tls-server-name failed: {}",
        String::from_utf8_lossy(&named.stderr)
    );
    let ids: BTreeMap<usize, u64> = lab
        .members(0)?
        .into_iter()
        .filter_map(|(id, ordinal, _)| Some((ordinal?, id)))
        .collect();
    ensure!(ids.len() == 3, "each pod is one member: {ids:?}");

    // Leaves attached to every pod, and a steady write load through them.
    let mut leaves = Vec::new();
    for index in 0..LEAVES {
        leaves.push(lab.leaf(index % 3).await?);
    }
    let load = Load::start(leaves.clone(), "chart", "w");
    wait::until("100 acknowledged writes", TIMEOUT, || async {
        Ok((load.acknowledged() >= 100).then_some(()))
    })
    .await?;

    // Upgrade to 5 replicas.
    let load_began = Instant::now();
    lab.render(5)?;
    let scale = lab.run_hook("Job", "scale-down").await?;
    ensure!(
        scale.contains("\"steps\":[]") || scale.contains("nothing"),
        "the scale-down Job acted on a scale-up: {scale}"
    );
    for ordinal in 3..5 {
        lab.start_pod(ordinal)?;
    }
    lab.wait_ready("5 pods ready").await?;
    let again = lab.run_hook("Job", "init").await?;
    ensure!(
        again.contains("already initialised") && !again.contains("bootstrapped"),
        "the init Job of an upgrade did more than find the cluster: {again}"
    );
    lab.wait_roles(0, 3, 2, 5).await?;
    println!("scaled to 5: 3 voters, 2 standbys");

    // Upgrade back to 3: the hook first, then the StatefulSet removes pods 4 and 3 and their volumes.
    lab.render(3)?;
    let scale = lab.run_hook("Job", "scale-down").await?;
    println!("scale-down Job: {}", scale.trim());
    let members = lab.members(0)?;
    ensure!(
        members
            .iter()
            .all(|(_, ordinal, _)| ordinal.is_some_and(|o| o < 3)),
        "pods 3 and 4 are still members after the scale-down Job: {members:?}"
    );
    for ordinal in [4, 3] {
        lab.stop_pod(ordinal).await?;
        std::fs::remove_dir_all(lab.volume(ordinal))?;
    }
    lab.run_hook("Job", "init").await?;
    lab.wait_roles(0, 3, 0, 3).await?;
    let now = Instant::now();
    wait::until("a write acknowledged after scaling", TIMEOUT, || async {
        Ok(load.first_ack_after(now))
    })
    .await?;
    println!("scaled back to 3: 3 voters, pods 3 and 4 gone");

    // A rolling restart, highest ordinal first, under the load.
    let rolling_began = Instant::now();
    for ordinal in (0..3).rev() {
        let attached: Vec<&Leaf> = leaves.iter().filter(|leaf| on_pod(leaf, ordinal)).collect();
        let took = lab.stop_pod(ordinal).await?;
        for leaf in &attached {
            ensure!(
                !on_pod(leaf, ordinal),
                "{} is still on the stopped pod {ordinal}",
                leaf.peer_id()
            );
        }
        println!(
            "rolling restart: pod {ordinal} stopped in {} ms, {} of its leaves moved",
            took.as_millis(),
            attached.len()
        );
        lab.start_pod(ordinal)?;
        lab.wait_ready(&format!("pod {ordinal} ready again"))
            .await?;
        tokio::time::sleep(min_ready(&lab.manifests)).await;
        lab.wait_ready(&format!("pod {ordinal} still ready after minReadySeconds"))
            .await?;
    }
    let rolling_ended = Instant::now();
    lab.wait_roles(0, 3, 0, 3).await?;
    let after: BTreeMap<usize, u64> = lab
        .members(0)?
        .into_iter()
        .filter_map(|(id, ordinal, _)| Some((ordinal?, id)))
        .collect();
    ensure!(
        after == ids,
        "a restart with its data changed a pod's node id: {ids:?} -> {after:?}"
    );

    // Pod 0 with an empty volume: a new node of the same cluster at the same address. The old id stops
    // answering (Raft calls name the node they are for, and the new node refuses the old one's), so the
    // placement controller replaces it in the voting set, then retires it.
    lab.stop_pod(0).await?;
    std::fs::remove_dir_all(lab.volume(0))?;
    lab.start_pod(0)?;
    let old = ids[&0];
    let new = wait::until(
        "pod 0 back under a new node id, replacing the old one",
        TIMEOUT,
        || async {
            let Ok(members) = lab.members(1) else {
                return Ok(None);
            };
            let on_zero: Vec<&(u64, Option<usize>, String)> = members
                .iter()
                .filter(|(_, ordinal, _)| *ordinal == Some(0))
                .collect();
            let voters = members
                .iter()
                .filter(|(_, _, role)| role == "voter")
                .count();
            Ok(match on_zero.as_slice() {
                [(id, _, role)] if *id != old && role == "voter" && voters == 3 => Some(*id),
                _ => None,
            })
        },
    )
    .await;
    let new = match new {
        Ok(new) => new,
        Err(error) => {
            for args in [&["status"][..], &["placement", "status"][..]] {
                println!(
                    "vesperctl {args:?} on pod 1: {:#}",
                    lab.vesperctl(1, args).unwrap_or_default()
                );
            }
            return Err(error);
        }
    };
    lab.check_running()?;
    lab.wait_ready("pod 0 ready with its new id").await?;
    let own = lab.vesperctl(0, &["status"])?;
    ensure!(
        own["node_id"] == new,
        "pod 0 answers as {} not {new}",
        own["node_id"]
    );
    let listed = own["members"].as_array().map(Vec::len).unwrap_or(0);
    ensure!(
        listed >= 3,
        "pod 0 sees a cluster of {listed}: a second cluster?"
    );
    println!("pod 0 with an empty volume: node {old} replaced by node {new} in the same cluster");

    // helm test.
    let test = lab.run_hook("Pod", "test").await?;
    ensure!(
        test.contains("message sent and received"),
        "helm test output: {test}"
    );
    println!("helm test passed");

    let report = load.stop().await;
    let gap = report.longest_gap(rolling_began, rolling_ended);
    println!(
        "rolling restart of 3 pods: {} s; longest stretch without an acknowledged write: {} ms; \
         {} writes acknowledged over {} s, {} attempts failed",
        rolling_ended.duration_since(rolling_began).as_secs(),
        gap.as_millis(),
        report.acknowledged.len(),
        load_began.elapsed().as_secs(),
        report.failures.len()
    );
    ensure!(
        gap < WRITE_GAP_BOUND,
        "writes were unavailable for {gap:?} in the rolling restart"
    );
    let reader = lab.leaf(1).await?;
    load::verify(&reader, "chart", &report.acknowledged).await?;
    println!(
        "every one of {} acknowledged writes is readable",
        report.acknowledged.len()
    );
    Ok(())
}
