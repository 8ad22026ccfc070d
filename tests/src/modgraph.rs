//! The module graph of a crate, read from its source files, and the import circles in it.
//!
//! A module is a file (`a/b.rs` or `a/b/mod.rs` is `a::b`; `lib.rs` is the root; `bin/` is left out). A
//! reference is a path that starts with `crate::`, `super::` or `self::` (in `use` items and in code), resolved
//! to the longest prefix that names a module. Each reference is an edge between *siblings*: the two children of
//! the modules' deepest common ancestor that lead to them. So `leaf::broker -> router` is the edge
//! `leaf -> router` at the root, and `leaf::broker -> leaf::sessions` is `broker -> sessions` inside `leaf`.
//! References between a module and its own ancestors (a child using its folder's shared items, a `mod.rs`
//! re-exporting a child) are not edges: a folder is one unit to the outside.
//!
//! A circle is a strongly connected set of two or more siblings: neither side can be read, tested or moved
//! without the other.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path, e.g. `["leaf", "broker"]`; empty for the crate root.
pub type ModulePath = Vec<String>;

/// One edge between siblings, with where it comes from (file and line), for the report.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Edge {
    pub parent: ModulePath,
    pub from: String,
    pub to: String,
    pub evidence: String,
}

/// The source of each module of a crate, by module path.
pub fn read_crate(src: &Path) -> std::io::Result<BTreeMap<ModulePath, (PathBuf, String)>> {
    let mut modules = BTreeMap::new();
    let mut pending = vec![src.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let relative = path.strip_prefix(src).expect("under src");
            if path.is_dir() {
                if relative != Path::new("bin") {
                    pending.push(path);
                }
                continue;
            }
            if path.extension().is_none_or(|extension| extension != "rs") {
                continue;
            }
            let mut parts: ModulePath = relative
                .with_extension("")
                .iter()
                .map(|part| part.to_string_lossy().into_owned())
                .collect();
            if matches!(
                parts.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                parts.pop();
            }
            let text = std::fs::read_to_string(&path)?;
            modules.insert(parts, (path, text));
        }
    }
    Ok(modules)
}

/// Every sibling edge of the crate whose modules are `modules` (path -> (file, source)).
pub fn edges(modules: &BTreeMap<ModulePath, (PathBuf, String)>) -> BTreeSet<Edge> {
    let known: BTreeSet<&ModulePath> = modules.keys().collect();
    let mut edges = BTreeSet::new();
    for (module, (file, text)) in modules {
        for (number, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for (anchor, segments) in references(code) {
                let mut target: ModulePath = match anchor {
                    "crate" => Vec::new(),
                    "self" => module.clone(),
                    _ => module[..module.len().saturating_sub(1)].to_vec(),
                };
                target.extend(segments);
                while !target.is_empty() && !known.contains(&target) {
                    target.pop();
                }
                let common = module
                    .iter()
                    .zip(&target)
                    .take_while(|(a, b)| a == b)
                    .count();
                if common < module.len() && common < target.len() {
                    edges.insert(Edge {
                        parent: module[..common].to_vec(),
                        from: module[common].clone(),
                        to: target[common].clone(),
                        evidence: format!("{}:{}: {}", file.display(), number + 1, line.trim()),
                    });
                }
            }
        }
    }
    edges
}

/// The paths in one line of code that start at `crate`, `super` or `self`: the anchor and the lowercase
/// segments after it (a `{` group or a type name ends the path; the resolution stops at modules anyway).
fn references(code: &str) -> Vec<(&'static str, Vec<String>)> {
    let mut found = Vec::new();
    let bytes = code.as_bytes();
    for anchor in ["crate", "super", "self"] {
        let mut start = 0;
        while let Some(offset) = code[start..].find(anchor) {
            let at = start + offset;
            start = at + anchor.len();
            let before_ok =
                at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
            if !before_ok || !code[start..].starts_with("::") {
                continue;
            }
            let mut segments = Vec::new();
            let mut rest = &code[start..];
            while let Some(after) = rest.strip_prefix("::") {
                let length = after
                    .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                    .unwrap_or(after.len());
                if length == 0 {
                    break;
                }
                segments.push(after[..length].to_string());
                rest = &after[length..];
            }
            found.push((anchor, segments));
        }
    }
    found
}

/// The import circles among siblings: each is the set of siblings (under `parent`) and the edges inside it.
pub fn circles(edges: &BTreeSet<Edge>) -> Vec<(ModulePath, BTreeSet<String>, Vec<Edge>)> {
    let mut by_parent: BTreeMap<&ModulePath, Vec<&Edge>> = BTreeMap::new();
    for edge in edges {
        by_parent.entry(&edge.parent).or_default().push(edge);
    }
    let mut circles = Vec::new();
    for (parent, edges) in by_parent {
        let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for edge in &edges {
            graph.entry(&edge.from).or_default().insert(&edge.to);
            graph.entry(&edge.to).or_default();
        }
        for component in strongly_connected(&graph) {
            if component.len() < 2 {
                continue;
            }
            let inside: Vec<Edge> = edges
                .iter()
                .filter(|edge| component.contains(&edge.from) && component.contains(&edge.to))
                .map(|edge| (*edge).clone())
                .collect();
            circles.push((parent.clone(), component, inside));
        }
    }
    circles
}

/// Strongly connected components (Tarjan), each as a set of names.
fn strongly_connected(graph: &BTreeMap<&str, BTreeSet<&str>>) -> Vec<BTreeSet<String>> {
    struct State<'a> {
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        found: Vec<BTreeSet<String>>,
    }
    fn visit<'a>(
        node: &'a str,
        graph: &BTreeMap<&'a str, BTreeSet<&'a str>>,
        state: &mut State<'a>,
    ) {
        state.index.insert(node, state.next);
        state.low.insert(node, state.next);
        state.next += 1;
        state.stack.push(node);
        state.on_stack.insert(node);
        for &next in &graph[node] {
            if !state.index.contains_key(next) {
                visit(next, graph, state);
                let low = state.low[node].min(state.low[next]);
                state.low.insert(node, low);
            } else if state.on_stack.contains(next) {
                let low = state.low[node].min(state.index[next]);
                state.low.insert(node, low);
            }
        }
        if state.low[node] == state.index[node] {
            let mut component = BTreeSet::new();
            while let Some(member) = state.stack.pop() {
                state.on_stack.remove(member);
                component.insert(member.to_string());
                if member == node {
                    break;
                }
            }
            state.found.push(component);
        }
    }
    let mut state = State {
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        found: Vec::new(),
    };
    for &node in graph.keys() {
        if !state.index.contains_key(node) {
            visit(node, graph, &mut state);
        }
    }
    state.found
}

/// A readable report of `circles`, one line per edge inside each.
pub fn report(circles: &[(ModulePath, BTreeSet<String>, Vec<Edge>)]) -> String {
    let mut text = String::new();
    for (parent, members, edges) in circles {
        let parent = if parent.is_empty() {
            "the crate root".to_string()
        } else {
            parent.join("::")
        };
        text.push_str(&format!("circle in {parent}: {members:?}\n"));
        for edge in edges {
            text.push_str(&format!(
                "  {} -> {}  ({})\n",
                edge.from, edge.to, edge.evidence
            ));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crate_of(files: &[(&str, &str)]) -> BTreeMap<ModulePath, (PathBuf, String)> {
        files
            .iter()
            .map(|(path, text)| {
                let path: ModulePath = if path.is_empty() {
                    Vec::new()
                } else {
                    path.split("::").map(str::to_string).collect()
                };
                (
                    path.clone(),
                    (PathBuf::from(path.join("/")), text.to_string()),
                )
            })
            .collect()
    }

    #[test]
    fn a_circle_between_siblings_is_found_with_its_evidence() {
        let modules = crate_of(&[
            ("", "pub mod a; pub mod b;"),
            ("a", "use crate::b::Thing;"),
            ("b", "fn f() { crate::a::helper(); }"),
        ]);
        let found = circles(&edges(&modules));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].1, BTreeSet::from(["a".into(), "b".into()]));
        assert!(report(&found).contains("a -> b"));
    }

    #[test]
    fn a_circle_through_descendants_counts_at_the_level_where_the_paths_part() {
        let modules = crate_of(&[
            ("", ""),
            ("leaf", ""),
            ("leaf::broker", "use crate::router::Router;"),
            ("router", ""),
            ("router::links", "use crate::leaf::broker::roles;"),
        ]);
        let found = circles(&edges(&modules));
        assert_eq!(found.len(), 1);
        assert!(found[0].0.is_empty(), "at the root");
        assert_eq!(found[0].1, BTreeSet::from(["leaf".into(), "router".into()]));
    }

    #[test]
    fn a_folder_using_its_own_items_and_a_one_way_graph_have_no_circle() {
        let modules = crate_of(&[
            ("", ""),
            (
                "store",
                "pub use records::Page; fn f() { self::records::get(); }",
            ),
            (
                "store::records",
                "use super::{cf, StoreError}; use super::presence::x;",
            ),
            (
                "store::presence",
                "use super::cf; // crate::store::records::y in a comment",
            ),
            ("raft", "use crate::store::records::Page;"),
        ]);
        let all = edges(&modules);
        assert!(circles(&all).is_empty(), "{all:?}");
        assert!(all
            .iter()
            .any(|edge| edge.from == "records" && edge.to == "presence"));
        assert!(all
            .iter()
            .any(|edge| edge.from == "raft" && edge.to == "store"));
        assert!(
            !all.iter().any(|edge| edge.from == "presence"),
            "comments are not code"
        );
    }
}
