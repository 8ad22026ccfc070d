//! The `nat` command: measure this leaf's NAT now, publish it, and show what was found.

use serde_json::{json, Value};
use vesper_leafpeer::nat::NatReport;

use crate::output::Attached;

/// Runs `nat`.
pub async fn run(at: &Attached<'_>) -> anyhow::Result<()> {
    let report = at.leaf.discover_endpoints().await?;
    at.out.print(report_json(&report), || report_text(&report));
    Ok(())
}

fn report_json(report: &NatReport) -> Value {
    let reflexive: Vec<Value> = report
        .reflexive
        .iter()
        .map(|(server, mapped)| json!({ "server": server.to_string(), "mapped": mapped.to_string() }))
        .collect();
    json!({
        "nat_class": report.class.as_str(),
        "local": report.local.to_string(),
        "reflexive": reflexive,
        "unanswered": report.unanswered.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "candidates": report.candidates().iter().map(ToString::to_string).collect::<Vec<_>>(),
    })
}

fn report_text(report: &NatReport) -> String {
    let mut text = format!("NAT class: {}\nlocal:     {}", report.class, report.local);
    for (server, mapped) in &report.reflexive {
        text.push_str(&format!("\nmapped:    {mapped} (seen by {server})"));
    }
    for server in &report.unanswered {
        text.push_str(&format!("\nno answer: {server}"));
    }
    text
}
