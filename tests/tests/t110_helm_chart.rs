//! The Helm chart `helm/vesper` checked with the real tools, as far as a machine without Kubernetes allows:
//! `helm lint --strict` and `helm template` over every value set in `helm/vesper/ci`, the schema refusing
//! nonsense with messages that name the value, offline schema validation of the manifests for two Kubernetes
//! versions (kubernetes-validate, strict), the checkov policy scan (exceptions in `helm/ci/checkov.yaml`, each
//! with its reason), structural assertions on the parsed manifests, and the rendered configuration accepted by
//! the real `superpeer --check-config`. The pods-as-processes run is t111.

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::Value;
use vesper_tests::chart::{self, Manifests};

fn defaults() -> Manifests {
    Manifests::render(&[&chart::value_set("defaults")], &[]).expect("render the defaults")
}

#[test]
fn lint_strict_and_template_pass_for_every_value_set() {
    let sets = chart::value_sets();
    for wanted in [
        "defaults",
        "five-zones",
        "cert-manager",
        "per-pod-services",
        "observability",
    ] {
        assert!(
            sets.iter().any(|set| set == wanted),
            "value set {wanted} missing from {sets:?}"
        );
    }
    let chart_dir = chart::chart_dir();
    for set in &sets {
        let file = chart::value_set(set);
        let output = chart::helm(&[
            "lint",
            "--strict",
            chart_dir.to_str().unwrap(),
            "--values",
            file.to_str().unwrap(),
        ]);
        assert!(
            output.status.success(),
            "helm lint --strict with {set} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let manifests = Manifests::render(&[&file], &[])
            .unwrap_or_else(|error| panic!("helm template with {set}: {error}"));
        assert!(
            !manifests.of_kind("StatefulSet").is_empty(),
            "{set} rendered no StatefulSet"
        );
    }
}

#[test]
fn the_schema_and_the_chart_refuse_nonsense_by_name() {
    let defaults = chart::value_set("defaults");
    let cases: &[(&[&str], &str)] = &[
        (&["replicas=0"], "replicas"),
        (&["replicas=-1"], "replicas"),
        (&["placement.voters=4"], "placement.voters"),
        (&["placement.voters=2"], "placement.voters"),
        (
            &["replicas=2"],
            "replicas (2) is below placement.voters (3)",
        ),
        (
            &["replicas=3", "placement.standbys=1"],
            "placement.voters + placement.standbys",
        ),
        (&["tls.mode=bogus"], "tls.mode"),
        (&["tls.existingSecret="], "tls.existingSecret"),
        (&["config.data_dir=/elsewhere"], "config"),
        (&["config.tls.cert=/x"], "config"),
        (&["ports.leaf=0"], "ports.leaf"),
        (
            &["terminationGracePeriodSeconds=5"],
            "terminationGracePeriodSeconds",
        ),
        (&["antiAffinity=sometimes"], "antiAffinity"),
        (&["zone.source=nodeName"], "zone.source"),
        (&["image.digest=latest"], "image.digest"),
    ];
    for (sets, named) in cases {
        match chart::template(&[&defaults], sets) {
            Ok(_) => panic!("helm template accepted {sets:?}"),
            Err(error) => {
                let message = error.to_string();
                assert!(
                    message.contains(named),
                    "the error for {sets:?} does not name {named:?}: {message}"
                );
            }
        }
    }
    // Without the values files: an existingSecret install must name both Secrets.
    let error = chart::template(&[], &[]).expect_err("no Secrets named");
    assert!(
        error.to_string().contains("tls.existingSecret")
            && error.to_string().contains("tls.operatorSecret"),
        "{error}"
    );
}

/// Kinds that come from CRDs (cert-manager, the Prometheus operator): kubernetes-validate has no schema for
/// them, so they are checked structurally below instead.
const CRD_KINDS: &[&str] = &["Certificate", "ServiceMonitor", "PrometheusRule"];

#[test]
fn manifests_validate_for_two_kubernetes_versions_and_pass_the_policy_scan() {
    let bin = chart::validators_bin();
    // Not a hidden folder (tempfile's default prefix is a dot): checkov skips those and would scan nothing.
    let work = tempfile::Builder::new()
        .prefix("vesper-t110-")
        .tempdir()
        .unwrap();
    for kube in ["1.27.0", "1.33.0"] {
        let dir = work.path().join(kube);
        std::fs::create_dir_all(&dir).unwrap();
        for set in chart::value_sets() {
            let text = chart::template_with(&[&chart::value_set(&set)], &[], kube)
                .unwrap_or_else(|error| panic!("template {set} for {kube}: {error}"));
            let file = dir.join(format!("{set}.yaml"));
            std::fs::write(&file, text).unwrap();
            let output = Command::new(bin.join("kubernetes-validate"))
                .args(["--kubernetes-version", kube, "--strict", "--quiet"])
                .arg(&file)
                .output()
                .expect("run kubernetes-validate");
            let report = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(
                output.status.success(),
                "{set} does not validate for Kubernetes {kube}:\n{report}"
            );
            for line in report.lines().filter(|line| !line.trim().is_empty()) {
                assert!(
                    line.starts_with("WARN")
                        && CRD_KINDS
                            .iter()
                            .any(|kind| line.contains(&format!("schema for kind {kind} "))),
                    "unexpected report from kubernetes-validate ({set}, {kube}): {line}"
                );
            }
        }
    }
    // The validator really checks: an unknown field in the StatefulSet's spec is refused.
    let broken = work.path().join("broken.yaml");
    let text = std::fs::read_to_string(work.path().join("1.27.0/defaults.yaml")).unwrap();
    std::fs::write(
        &broken,
        text.replace(
            "podManagementPolicy: Parallel",
            "podManagementPolicy: Parallel\n  surpriseField: 1",
        ),
    )
    .unwrap();
    let output = Command::new(bin.join("kubernetes-validate"))
        .args(["--kubernetes-version", "1.27.0", "--strict", "--quiet"])
        .arg(&broken)
        .output()
        .unwrap();
    assert!(
        !output.status.success(),
        "kubernetes-validate accepted an unknown field"
    );
    std::fs::remove_file(&broken).unwrap();

    let config = chart::repo_root().join("helm/ci/checkov.yaml");
    let output = Command::new(bin.join("checkov"))
        .arg("--config-file")
        .arg(&config)
        .arg("--directory")
        .arg(work.path().join("1.33.0"))
        .args(["--output", "json"])
        .output()
        .expect("run checkov");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "checkov printed no JSON ({error}): {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let summary = &report["summary"];
    let failed: Vec<String> = report["results"]["failed_checks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|check| {
            format!(
                "{} {} on {}",
                check["check_id"], check["check_name"], check["resource"]
            )
        })
        .collect();
    assert!(
        output.status.success() && failed.is_empty(),
        "checkov found {} problems: {failed:#?}",
        failed.len()
    );
    assert!(
        summary["passed"].as_u64().unwrap_or(0) > 500 && summary["parsing_errors"] == 0,
        "checkov scanned too little: {summary}"
    );
}

fn annotations(doc: &Value) -> &Value {
    &doc["metadata"]["annotations"]
}

#[test]
fn the_manifests_have_the_shape_that_avoids_the_known_failures() {
    let manifests = defaults();
    let sts = manifests.statefulset();
    let spec = &sts["spec"];
    assert_eq!(
        spec["podManagementPolicy"], "Parallel",
        "no OrderedReady deadlock"
    );
    assert_eq!(spec["serviceName"], chart::headless());
    assert_eq!(spec["updateStrategy"]["type"], "RollingUpdate");
    assert!(spec["minReadySeconds"].as_u64().unwrap() >= 5);
    assert_eq!(
        spec["persistentVolumeClaimRetentionPolicy"]["whenScaled"],
        "Delete"
    );
    assert_eq!(spec["volumeClaimTemplates"][0]["metadata"]["name"], "data");

    let headless = manifests.get("Service", &chart::headless());
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert_eq!(headless["spec"]["publishNotReadyAddresses"], true);

    let leaf = manifests.get("Service", &format!("{}-leaf", chart::fullname()));
    let protocols: BTreeSet<&str> = leaf["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|port| port["protocol"].as_str().unwrap())
        .collect();
    assert_eq!(
        protocols,
        BTreeSet::from(["TCP", "UDP"]),
        "leaf ports: {leaf}"
    );

    let pdb = manifests.get("PodDisruptionBudget", &chart::fullname());
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);

    let pod = &spec["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["startupProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        assert_eq!(container[probe]["httpGet"]["port"], "ops", "{probe}");
    }
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert!(pod["affinity"]["podAntiAffinity"].is_object());
    assert!(pod["topologySpreadConstraints"].is_array());
    assert!(
        pod["terminationGracePeriodSeconds"].as_u64().unwrap() >= 30,
        "grace period"
    );

    // Every Secret is mounted as a directory: never subPath, or a renewed certificate never arrives.
    for doc in &manifests.docs {
        let pod = match doc["kind"].as_str() {
            Some("StatefulSet" | "Job") => &doc["spec"]["template"]["spec"],
            Some("Pod") => &doc["spec"],
            _ => continue,
        };
        let secrets: BTreeSet<&str> = pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|volume| volume["secret"].is_object())
            .map(|volume| volume["name"].as_str().unwrap())
            .collect();
        assert!(
            !secrets.is_empty(),
            "{} mounts no Secret",
            doc["metadata"]["name"]
        );
        for container in pod["containers"].as_array().unwrap() {
            for mount in container["volumeMounts"].as_array().into_iter().flatten() {
                if secrets.contains(mount["name"].as_str().unwrap()) {
                    assert!(
                        mount.get("subPath").is_none(),
                        "{} mounts Secret volume {} with subPath",
                        doc["metadata"]["name"],
                        mount["name"]
                    );
                }
            }
        }
    }

    let init = manifests.get("Job", &format!("{}-init", chart::fullname()));
    assert_eq!(
        annotations(init)["helm.sh/hook"],
        "post-install,post-upgrade"
    );
    let scale_down = manifests.get("Job", &format!("{}-scale-down", chart::fullname()));
    assert_eq!(
        annotations(scale_down)["helm.sh/hook"],
        "pre-upgrade,pre-rollback"
    );
    let test = manifests.get("Pod", &format!("{}-test", chart::fullname()));
    assert_eq!(annotations(test)["helm.sh/hook"], "test");
    for hook in [init, scale_down, test] {
        assert_eq!(
            annotations(hook)["helm.sh/hook-delete-policy"],
            "before-hook-creation",
            "{}",
            hook["metadata"]["name"]
        );
    }
    let script = test["spec"]["containers"][0]["args"][0].as_str().unwrap();
    for step in [
        "vesperctl status",
        "leafpeer $a put",
        "leafpeer $b listen",
        "leafpeer $a send",
    ] {
        assert!(script.contains(step), "the helm test lacks {step:?}");
    }

    // One network policy for the super peers, one closing the hook pods.
    assert_eq!(manifests.of_kind("NetworkPolicy").len(), 2);
    // A single replica has no disruption budget (it could never be drained).
    let single = Manifests::render(
        &[&chart::value_set("defaults")],
        &["replicas=1", "placement.voters=1"],
    )
    .unwrap();
    assert!(single.of_kind("PodDisruptionBudget").is_empty());
}

#[test]
fn scaling_never_changes_the_pod_template() {
    let defaults = chart::value_set("defaults");
    let three = Manifests::render(&[&defaults], &[]).unwrap();
    let five = Manifests::render(&[&defaults], &["replicas=5"]).unwrap();
    let seven = Manifests::render(&[&defaults], &["replicas=7", "placement.voters=5"]).unwrap();
    assert_eq!(five.statefulset()["spec"]["replicas"], 5);
    for other in [&five, &seven] {
        assert_eq!(
            three.statefulset()["spec"]["template"],
            other.statefulset()["spec"]["template"],
            "the pod template changed with the replica count"
        );
        assert_eq!(three.superpeer_toml(), other.superpeer_toml());
        assert_eq!(
            three.statefulset()["spec"]["volumeClaimTemplates"],
            other.statefulset()["spec"]["volumeClaimTemplates"]
        );
    }
    // A configuration change does roll the pods (through the checksum annotation).
    let changed = Manifests::render(&[&defaults], &["config.drain_timeout=30s"]).unwrap();
    assert_ne!(
        three.statefulset()["spec"]["template"]["metadata"]["annotations"]["checksum/config"],
        changed.statefulset()["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    );
}

#[test]
fn the_chart_ships_the_observability_files_unchanged() {
    let root = chart::repo_root();
    for (shipped, source) in [
        (
            "helm/vesper/files/vesper-rules.yml",
            "monitoring/prometheus/vesper-rules.yml",
        ),
        (
            "helm/vesper/files/vesper-dashboard.json",
            "monitoring/grafana/vesper-dashboard.json",
        ),
    ] {
        assert_eq!(
            std::fs::read(root.join(shipped)).unwrap(),
            std::fs::read(root.join(source)).unwrap(),
            "{shipped} differs from {source}: copy it again"
        );
    }
    let manifests = Manifests::render(&[&chart::value_set("observability")], &[]).expect("render");
    let rules = manifests.get("PrometheusRule", &chart::fullname());
    let groups = rules["spec"]["groups"].as_array().expect("rule groups");
    let source: String =
        std::fs::read_to_string(root.join("monitoring/prometheus/vesper-rules.yml")).unwrap();
    let parsed = chart::parse(&source).unwrap();
    assert_eq!(groups, parsed[0]["groups"].as_array().unwrap());
    assert_eq!(manifests.of_kind("ServiceMonitor").len(), 1);
    let dashboards: Vec<&Value> = manifests
        .of_kind("ConfigMap")
        .into_iter()
        .filter(|map| {
            map["data"]
                .as_object()
                .is_some_and(|data| data.keys().any(|k| k.ends_with(".json")))
        })
        .collect();
    assert_eq!(dashboards.len(), 1, "one dashboard ConfigMap");
}

#[test]
fn the_rendered_configuration_is_accepted_by_superpeer() {
    let dir = tempfile::tempdir().unwrap();
    for set in chart::value_sets() {
        let manifests = Manifests::render(&[&chart::value_set(&set)], &[]).unwrap();
        let file = dir.path().join(format!("{set}.toml"));
        std::fs::write(&file, manifests.superpeer_toml()).unwrap();
        let container = &manifests.statefulset()["spec"]["template"]["spec"]["containers"][0];
        let env = chart::container_env(container, |field| match field {
            "metadata.name" => Some(format!("{}-1", chart::fullname())),
            "metadata.namespace" => Some(chart::NAMESPACE.to_string()),
            _ => None,
        });
        let argv = chart::container_argv(container, &env);
        assert_eq!(argv[0], "superpeer", "{set}: {argv:?}");
        let config_index = argv
            .iter()
            .position(|arg| arg == "--config")
            .expect("--config");
        let output = Command::new(vesper_tests::binary("superpeer"))
            .args(&argv[1..config_index])
            .arg("--config")
            .arg(&file)
            .args(&argv[config_index + 2..])
            .arg("--check-config")
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .unwrap();
        let effective = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "superpeer refused the configuration of {set}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            effective.contains(&format!("advertise_host = \"{}\"", chart::pod_host(1))),
            "{set}: the advertised host is not the pod's DNS name:\n{effective}"
        );
        assert!(effective.contains("drain_timeout"), "{effective}");
    }
    // The loader does check: a key that is not in docs/CONFIG.md is refused.
    let manifests = defaults();
    let file = dir.path().join("typo.toml");
    std::fs::write(
        &file,
        format!(
            "{}\nheartbeat_intervall = \"1s\"\n",
            manifests.superpeer_toml()
        ),
    )
    .unwrap();
    let output = Command::new(vesper_tests::binary("superpeer"))
        .arg("--config")
        .arg(&file)
        .arg("--check-config")
        .env("VESPER_ADVERTISE_HOST", "x")
        .output()
        .unwrap();
    assert!(!output.status.success(), "a misspelt key was accepted");
}
