//! The quick-start demo runs to completion and its summary holds: the roster after a decline, every chat line
//! (also those after a super peer was killed) received by both participants in one order.

use serde_json::Value;

#[test]
fn t95_the_demo_runs_and_its_summary_holds() {
    let output = std::process::Command::new(vesper_tests::binary("vesper-demo"))
        .arg("--json")
        .output()
        .expect("run the demo");
    assert!(
        output.status.success(),
        "demo failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: Value = serde_json::from_slice(&output.stdout).expect("JSON summary");
    assert_eq!(summary["same_order"], true, "{summary}");
    let alice = summary["received"]["alice"]
        .as_array()
        .expect("alice's lines");
    assert_eq!(alice.len(), 4, "{summary}");
    let texts: Vec<&str> = alice.iter().filter_map(Value::as_str).collect();
    assert!(
        texts[0].starts_with("#1 ") && texts[0].ends_with("good morning"),
        "{texts:?}"
    );
    assert!(
        texts[2].ends_with("my super peer just died, still here"),
        "{texts:?}"
    );
    let states: Vec<&str> = summary["roster"]
        .as_array()
        .expect("roster")
        .iter()
        .filter_map(|invitee| invitee["state"].as_str())
        .collect();
    assert!(
        states.contains(&"accepted") && states.contains(&"declined"),
        "{states:?}"
    );
}
