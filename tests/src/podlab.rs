//! Pods as processes: the chart's containers run as real processes the way a kubelet would run them, each pod
//! in its own network and mount namespace.
//!
//! ```text
//!   namespace <lab>-net: bridge br0, 10.244.0.0/24
//!      ├── <lab>-p0 (10.244.0.10)   super peer pod 0     /etc/netns/<lab>-p0/hosts
//!      ├── <lab>-p1 (10.244.0.11)   ...
//!      ├── <lab>-job (10.244.0.200) hook Jobs and the helm test Pod
//!      └── <lab>-client (10.244.0.201) the test's own leaves and vesperctl
//! ```
//!
//! Every namespace's `/etc/netns/<ns>/hosts` (which `ip netns exec` mounts over `/etc/hosts`) resolves what
//! cluster DNS would: each pod's stable name `<pod>.<headless>.<namespace>.svc.<domain>`, and the leaf and
//! admin Services' names to every pod (a ClusterIP Service spreads connections; here a resolver picks).
//!
//! A container runs as `ip netns exec <pod> sh -c <script>`: the script bind-mounts the pod's volumes (data,
//! ConfigMap, Secrets as directories, an emptyDir on /tmp, the "image" on /usr/local/bin), remounts the root
//! read-only when the container asks for a read-only root filesystem, and execs the container's command as
//! its user and group with no capabilities and no_new_privs (`setpriv`), in exactly the environment the
//! manifest gives it. Mounts live in the namespace `ip netns exec` creates, so none reaches the machine; the
//! empty directories the mounts need (`/var/lib/vesper`, `/etc/vesper/...`) are created once and left.
//!
//! Namespace names start with `vk<pid>-`; dropping the [`PodNet`] that made them deletes them and their
//! `/etc/netns` folders, and a new one first removes those of processes that no longer exist.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use serde_json::Value;

use crate::chart;

use crate::run_system as run;

fn remove_stale() {
    let Ok(listing) = run("ip", &["netns", "list"]) else {
        return;
    };
    for line in listing.lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some((pid, _)) = name
            .strip_prefix("vk")
            .and_then(|rest| rest.split_once('-'))
        else {
            continue;
        };
        if let Ok(pid) = pid.parse::<u32>() {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = run("ip", &["netns", "delete", name]);
                let _ = std::fs::remove_dir_all(format!("/etc/netns/{name}"));
            }
        }
    }
}

/// The pods' network: namespaces, the bridge and the hosts files.
pub struct PodNet {
    pub prefix: String,
    pub pods: usize,
    /// Whether this value made the namespaces (and deletes them on drop).
    owned: bool,
}

/// Namespaces besides the pods', with their host number on 10.244.0.0/24.
const OTHERS: &[(&str, u8)] = &[("job", 200), ("client", 201)];

impl PodNet {
    /// Makes the network for `pods` super peer pods (needs root and iproute2).
    pub fn create(pods: usize) -> anyhow::Result<PodNet> {
        ensure!(
            rustix::process::geteuid().is_root(),
            "the pod lab needs root (network and mount namespaces)"
        );
        remove_stale();
        let net = PodNet {
            prefix: format!("vk{}", std::process::id()),
            pods,
            owned: true,
        };
        let bridge = net.ns("net");
        run("ip", &["netns", "add", &bridge])?;
        run("ip", &["-n", &bridge, "link", "set", "lo", "up"])?;
        run(
            "ip",
            &["-n", &bridge, "link", "add", "br0", "type", "bridge"],
        )?;
        run("ip", &["-n", &bridge, "link", "set", "br0", "up"])?;
        let mut members: Vec<(String, Ipv4Addr)> = (0..pods)
            .map(|ordinal| (net.pod_ns(ordinal), net.pod_ip(ordinal)))
            .collect();
        members.extend(
            OTHERS
                .iter()
                .map(|(name, host)| (net.ns(name), Ipv4Addr::new(10, 244, 0, *host))),
        );
        let hosts = net.hosts_file();
        for (index, (ns, addr)) in members.iter().enumerate() {
            run("ip", &["netns", "add", ns])?;
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
            let port = format!("v{index}");
            run(
                "ip",
                &[
                    "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", &port,
                    "netns", &bridge,
                ],
            )?;
            run(
                "ip",
                &["-n", &bridge, "link", "set", &port, "master", "br0"],
            )?;
            run("ip", &["-n", &bridge, "link", "set", &port, "up"])?;
            run(
                "ip",
                &[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{addr}/24"),
                    "dev",
                    "eth0",
                ],
            )?;
            run("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
            let etc = PathBuf::from(format!("/etc/netns/{ns}"));
            std::fs::create_dir_all(&etc)?;
            std::fs::write(etc.join("hosts"), &hosts)?;
        }
        Ok(net)
    }

    /// The network made by another process (the outer half of a test), named by its prefix.
    pub fn attach(prefix: &str, pods: usize) -> PodNet {
        PodNet {
            prefix: prefix.to_string(),
            pods,
            owned: false,
        }
    }

    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    pub fn pod_ns(&self, ordinal: usize) -> String {
        self.ns(&format!("p{ordinal}"))
    }

    pub fn pod_ip(&self, ordinal: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, 0, 10 + ordinal as u8)
    }

    /// What cluster DNS would answer, as a hosts file.
    fn hosts_file(&self) -> String {
        let mut text = String::from("127.0.0.1 localhost\n::1 localhost\n");
        for ordinal in 0..self.pods {
            text.push_str(&format!(
                "{} {}\n",
                self.pod_ip(ordinal),
                chart::pod_host(ordinal)
            ));
        }
        for service in [chart::leaf_service_host(), chart::admin_service_host()] {
            for ordinal in 0..self.pods {
                text.push_str(&format!("{} {service}\n", self.pod_ip(ordinal)));
            }
        }
        text
    }
}

impl Drop for PodNet {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let mut names: Vec<String> = (0..self.pods).map(|ordinal| self.pod_ns(ordinal)).collect();
        names.extend(OTHERS.iter().map(|(name, _)| self.ns(name)));
        names.push(self.ns("net"));
        for name in names {
            let _ = run("ip", &["netns", "delete", &name]);
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{name}"));
        }
    }
}

/// A volume of a pod: a folder of the machine mounted at `mount_path`.
#[derive(Debug, Clone)]
pub struct Mount {
    pub host: PathBuf,
    pub path: String,
    pub read_only: bool,
}

/// How one container runs: taken from a manifest's pod spec, with the volumes given as folders.
#[derive(Debug, Clone)]
pub struct Container {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub mounts: Vec<Mount>,
    pub user: Option<(u32, u32)>,
    pub read_only_root: bool,
    pub grace: Duration,
}

/// Where the chart's image would be: a folder holding `superpeer`, `vesperctl` and `leafpeer`, mounted on
/// /usr/local/bin in every container (hard links to the built binaries, or copies across file systems).
pub fn image(dir: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("image-bin");
    std::fs::create_dir_all(&bin)?;
    for name in ["superpeer", "vesperctl", "leafpeer"] {
        let source = crate::binary(name);
        let target = bin.join(name);
        if std::fs::hard_link(&source, &target).is_err() {
            std::fs::copy(&source, &target).with_context(|| format!("copy {name}"))?;
        }
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))?;
    }
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
    Ok(bin)
}

impl Container {
    /// The container of `pod_spec` named `name` (the first when `None`), its `$(VAR)`s and downward-API
    /// fields resolved by `field`, with the volumes of `volumes` (volume name -> folder) and the image folder.
    pub fn from_pod_spec(
        pod_spec: &Value,
        name: Option<&str>,
        field: impl Fn(&str) -> Option<String>,
        volumes: &[(&str, PathBuf)],
        image: &Path,
    ) -> anyhow::Result<Container> {
        let containers = pod_spec["containers"].as_array().context("no containers")?;
        let container = match name {
            Some(name) => containers
                .iter()
                .find(|container| container["name"] == name)
                .with_context(|| format!("no container {name}"))?,
            None => &containers[0],
        };
        let mut env = chart::container_env(container, field);
        // What an image and the kubelet add: the image's PATH, HOME for a user without a passwd entry.
        env.insert(0, ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()));
        env.insert(1, ("HOME".into(), "/".into()));
        let argv = chart::container_argv(container, &env);
        let mut mounts = vec![Mount {
            host: image.to_path_buf(),
            path: "/usr/local/bin".into(),
            read_only: true,
        }];
        for mount in container["volumeMounts"].as_array().into_iter().flatten() {
            let volume = mount["name"].as_str().context("volumeMount name")?;
            ensure!(
                mount.get("subPath").is_none(),
                "subPath mounts are not emulated"
            );
            let host = volumes
                .iter()
                .find(|(name, _)| *name == volume)
                .map(|(_, dir)| dir.clone())
                .with_context(|| format!("no folder given for volume {volume}"))?;
            mounts.push(Mount {
                host,
                path: mount["mountPath"]
                    .as_str()
                    .context("mountPath")?
                    .to_string(),
                read_only: mount["readOnly"].as_bool().unwrap_or(false),
            });
        }
        let security = &container["securityContext"];
        let pod_security = &pod_spec["securityContext"];
        let id = |key: &str| {
            security[key]
                .as_u64()
                .or_else(|| pod_security[key].as_u64())
                .map(|id| id as u32)
        };
        let user = match (id("runAsUser"), id("runAsGroup")) {
            (Some(user), Some(group)) => Some((user, group)),
            (Some(user), None) => Some((user, user)),
            _ => None,
        };
        Ok(Container {
            argv,
            env,
            mounts,
            user,
            read_only_root: security["readOnlyRootFilesystem"]
                .as_bool()
                .unwrap_or(false),
            grace: Duration::from_secs(
                pod_spec["terminationGracePeriodSeconds"]
                    .as_u64()
                    .unwrap_or(30),
            ),
        })
    }

    /// The shell script that sets up the mounts and execs the container.
    fn script(&self) -> String {
        let mut script = String::from("set -e\n");
        // A mount over a folder that holds other volumes' sources (the emptyDir on /tmp, when the test's
        // folders live in /tmp) goes last, or it would hide them.
        let (hiding, plain): (Vec<&Mount>, Vec<&Mount>) = self.mounts.iter().partition(|mount| {
            self.mounts
                .iter()
                .any(|other| other.host.starts_with(&mount.path))
        });
        for mount in plain.into_iter().chain(hiding) {
            let path = quote(&mount.path);
            script.push_str(&format!(
                "mkdir -p {path}\nmount --bind {} {path}\n",
                quote_path(&mount.host)
            ));
            if mount.read_only {
                script.push_str(&format!("mount -o remount,bind,ro {path}\n"));
            }
        }
        if self.read_only_root {
            script.push_str("mount -o remount,bind,ro /\n");
        }
        script.push_str("exec ");
        if let Some((user, group)) = self.user {
            script.push_str(&format!(
                "setpriv --reuid={user} --regid={group} --clear-groups --no-new-privs \
                 --inh-caps=-all --bounding-set=-all -- "
            ));
        }
        // `--` ends env's options; the NAME=VALUE operands follow, then the command (whose name has no `=`).
        script.push_str("env -i --");
        for (key, value) in &self.env {
            script.push(' ');
            script.push_str(&quote(&format!("{key}={value}")));
        }
        for arg in &self.argv {
            script.push(' ');
            script.push_str(&quote(arg));
        }
        script.push('\n');
        script
    }

    /// Starts the container in namespace `ns`, its output appended to `log`.
    pub fn spawn(&self, ns: &str, log: &Path) -> anyhow::Result<Child> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        Command::new("ip")
            .args(["netns", "exec", ns, "sh", "-c", &self.script()])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("start a container in {ns}"))
    }

    /// Runs the container in `ns` to completion with `deadline`: its exit status and output.
    pub async fn run(
        &self,
        ns: &str,
        log: &Path,
        deadline: Duration,
    ) -> anyhow::Result<(bool, String)> {
        let start = std::fs::metadata(log).map(|meta| meta.len()).unwrap_or(0);
        let mut child = self.spawn(ns, log)?;
        let began = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if began.elapsed() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the container in {ns} ran longer than {deadline:?}: {}",
                    tail(log, start)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        Ok((status.success(), tail(log, start)))
    }
}

fn tail(log: &Path, from: u64) -> String {
    let text = std::fs::read(log).unwrap_or_default();
    String::from_utf8_lossy(&text[(from as usize).min(text.len())..]).into_owned()
}

/// Stops a running container as the kubelet does: SIGTERM, then SIGKILL once `grace` has passed. Returns how
/// long it took and whether SIGKILL was needed.
pub async fn terminate(child: &mut Child, grace: Duration) -> anyhow::Result<(Duration, bool)> {
    let began = Instant::now();
    if child.try_wait()?.is_none() {
        let pid = rustix::process::Pid::from_raw(child.id() as i32).context("pid")?;
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    loop {
        if child.try_wait()?.is_some() {
            return Ok((began.elapsed(), false));
        }
        if began.elapsed() > grace {
            let _ = child.kill();
            child.wait()?;
            return Ok((began.elapsed(), true));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Single-quotes `text` for sh.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

fn quote_path(path: &Path) -> String {
    quote(&path.display().to_string())
}

/// Gives a folder to the pod's fsGroup as the kubelet does for volumes: group `group`, group-writable (or
/// readable only, for Secrets: mode 0440 files), set-group-id on folders.
pub fn give_to_group(dir: &Path, group: u32, secret: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        std::os::unix::fs::chown(&path, None, Some(group))?;
        let meta = std::fs::metadata(&path)?;
        let mode = if meta.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                stack.push(entry?.path());
            }
            if secret {
                0o2755
            } else {
                0o2775
            }
        } else if secret {
            0o440
        } else {
            0o664
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_quotes_and_spaces() {
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), "'it'\\''s'");
        assert_eq!(quote(""), "''");
    }
}
