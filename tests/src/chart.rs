//! The Helm chart `helm/vesper` rendered by a real `helm` binary, and its manifests parsed.
//!
//! `helm` and the validators (kubernetes-validate, checkov, PyYAML) come from `scripts/chart-tools.sh`, which
//! installs them pinned and checksum-checked on first use; without them the tests fail, they never skip. Helm
//! runs with its own empty home and kubeconfig, so nothing of the machine's Kubernetes set-up is read or
//! changed. Manifests are parsed to JSON with the venv's PyYAML (the YAML parser the validators use).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use anyhow::{bail, ensure, Context};
use serde_json::Value;

/// The Kubernetes version `helm template` renders for unless a test names another.
pub const KUBE_VERSION: &str = "1.30.0";
/// Release name and namespace of every rendering.
pub const RELEASE: &str = "vt";
pub const NAMESPACE: &str = "demo";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the workspace")
        .to_path_buf()
}

pub fn chart_dir() -> PathBuf {
    repo_root().join("helm/vesper")
}

/// A value set of `helm/vesper/ci`.
pub fn value_set(name: &str) -> PathBuf {
    chart_dir().join("ci").join(format!("{name}.yaml"))
}

/// Every value set in `helm/vesper/ci`, by name.
pub fn value_sets() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(chart_dir().join("ci"))
        .expect("helm/vesper/ci exists")
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".yaml").map(str::to_string)
        })
        .collect();
    names.sort();
    names
}

fn chart_tool(which: &str) -> PathBuf {
    let output = Command::new(repo_root().join("scripts/chart-tools.sh"))
        .arg(which)
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/chart-tools.sh");
    assert!(
        output.status.success(),
        "scripts/chart-tools.sh {which} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
}

/// The pinned `helm` binary.
pub fn helm_binary() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| chart_tool("helm"))
}

/// The bin folder of the validators' venv (kubernetes-validate, checkov, python with PyYAML).
pub fn validators_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| chart_tool("validators"))
}

/// Helm's own home (cache, config, data) and an empty kubeconfig, made once per test process.
fn helm_home() -> &'static Path {
    static HOME: OnceLock<tempfile::TempDir> = OnceLock::new();
    HOME.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary folder for helm");
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, "").expect("write an empty kubeconfig");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&kubeconfig, std::fs::Permissions::from_mode(0o600))
            .expect("kubeconfig mode");
        dir
    })
    .path()
}

/// `helm ARGS` with its isolated home.
pub fn helm(args: &[&str]) -> Output {
    let home = helm_home();
    Command::new(helm_binary())
        .args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env("KUBECONFIG", home.join("kubeconfig"))
        .stdin(Stdio::null())
        .output()
        .expect("run helm")
}

/// `helm template` of the chart with value files `values`, `--set` pairs `sets` and Kubernetes `kube`: the
/// manifests as text, or helm's error.
pub fn template_with(values: &[&Path], sets: &[&str], kube: &str) -> anyhow::Result<String> {
    let chart = chart_dir();
    let mut args: Vec<String> = vec![
        "template".into(),
        RELEASE.into(),
        chart.display().to_string(),
        "--namespace".into(),
        NAMESPACE.into(),
        "--kube-version".into(),
        kube.into(),
    ];
    for file in values {
        args.push("--values".into());
        args.push(file.display().to_string());
    }
    for set in sets {
        args.push("--set".into());
        args.push(set.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = helm(&args);
    if !output.status.success() {
        bail!("{}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8(output.stdout)?)
}

/// As [`template_with`] for Kubernetes [`KUBE_VERSION`].
pub fn template(values: &[&Path], sets: &[&str]) -> anyhow::Result<String> {
    template_with(values, sets, KUBE_VERSION)
}

/// The documents of a YAML stream as JSON values (empty documents left out).
pub fn parse(manifests: &str) -> anyhow::Result<Vec<Value>> {
    let python = validators_bin().join("python");
    let script = "import json, sys, yaml\n\
                  docs = [d for d in yaml.safe_load_all(sys.stdin) if d is not None]\n\
                  json.dump(docs, sys.stdout)\n";
    let mut child = Command::new(&python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("run {}", python.display()))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let text = manifests.to_string();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        stdin.write_all(text.as_bytes())
    });
    let output = child.wait_with_output()?;
    writer.join().expect("writer thread")?;
    ensure!(
        output.status.success(),
        "the manifests are not YAML: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    match serde_json::from_slice(&output.stdout)? {
        Value::Array(docs) => Ok(docs),
        other => bail!("PyYAML gave {other}, not a list"),
    }
}

/// Rendered and parsed manifests.
pub struct Manifests {
    pub docs: Vec<Value>,
}

impl Manifests {
    pub fn render(values: &[&Path], sets: &[&str]) -> anyhow::Result<Manifests> {
        Ok(Manifests {
            docs: parse(&template(values, sets)?)?,
        })
    }

    /// Every document of `kind`.
    pub fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|doc| doc["kind"] == kind).collect()
    }

    /// The document of `kind` named `name`.
    pub fn get(&self, kind: &str, name: &str) -> &Value {
        self.docs
            .iter()
            .find(|doc| doc["kind"] == kind && doc["metadata"]["name"] == name)
            .unwrap_or_else(|| {
                let names: Vec<String> = self
                    .docs
                    .iter()
                    .map(|doc| format!("{}/{}", doc["kind"], doc["metadata"]["name"]))
                    .collect();
                panic!("no {kind} named {name} among {names:?}")
            })
    }

    /// The super peers' StatefulSet.
    pub fn statefulset(&self) -> &Value {
        self.get("StatefulSet", &fullname())
    }

    /// The super peer configuration file the ConfigMap holds.
    pub fn superpeer_toml(&self) -> String {
        let configmap = self.get("ConfigMap", &format!("{}-config", fullname()));
        configmap["data"]["superpeer.toml"]
            .as_str()
            .expect("the ConfigMap holds superpeer.toml")
            .to_string()
    }
}

/// The release's full name (release "vt", chart "vesper").
pub fn fullname() -> String {
    format!("{RELEASE}-vesper")
}

/// The headless Service's name.
pub fn headless() -> String {
    format!("{}-headless", fullname())
}

/// Pod `ordinal`'s stable DNS name, as the chart advertises it.
pub fn pod_host(ordinal: usize) -> String {
    format!(
        "{}-{ordinal}.{}.{NAMESPACE}.svc.cluster.local",
        fullname(),
        headless()
    )
}

/// The Admin Service's DNS name.
pub fn admin_service_host() -> String {
    format!("{}-admin.{NAMESPACE}.svc.cluster.local", fullname())
}

/// The leaf Service's DNS name.
pub fn leaf_service_host() -> String {
    format!("{}-leaf.{NAMESPACE}.svc.cluster.local", fullname())
}

/// A container's environment as the kubelet gives it: `value`s with `$(NAME)` references to earlier variables
/// expanded (an unknown reference stays as written, `$$` is a literal `$`), and `fieldRef`s resolved by
/// `field` (for example `metadata.name`). Variables whose field `field` does not know are left out (as a
/// downward-API label that the pod lacks).
pub fn container_env(
    container: &Value,
    field: impl Fn(&str) -> Option<String>,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().expect("env name").to_string();
        let value = if let Some(value) = var["value"].as_str() {
            Some(expand(value, &env))
        } else if let Some(path) = var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            field(path)
        } else {
            panic!("env {name} has neither value nor fieldRef: {var}")
        };
        if let Some(value) = value {
            env.retain(|(existing, _)| existing != &name);
            env.push((name, value));
        }
    }
    env
}

/// Kubernetes' `$(VAR)` expansion against `env`.
pub fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match env.iter().find(|(key, _)| key == name) {
                        Some((_, value)) => out.push_str(value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A container's command followed by its args, with `$(VAR)` references expanded.
pub fn container_argv(container: &Value, env: &[(String, String)]) -> Vec<String> {
    let strings = |key: &str| -> Vec<String> {
        container[key]
            .as_array()
            .into_iter()
            .flatten()
            .map(|item| expand(item.as_str().expect("a string"), env))
            .collect()
    };
    let mut argv = strings("command");
    argv.extend(strings("args"));
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn expansion_follows_the_kubelet() {
        let vars = env(&[("POD_NAME", "vt-vesper-1"), ("NS", "demo")]);
        for (text, expected) in [
            ("$(POD_NAME).h.$(NS)", "vt-vesper-1.h.demo"),
            ("$(UNKNOWN)", "$(UNKNOWN)"),
            ("$$(POD_NAME)", "$(POD_NAME)"),
            ("cost $5", "cost $5"),
            ("$(unclosed", "$(unclosed"),
            ("", ""),
        ] {
            assert_eq!(expand(text, &vars), expected, "expanding {text:?}");
        }
    }
}
