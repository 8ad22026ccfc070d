//! Structure that must stay true as the code grows: no import circle among the modules of the super peer or
//! of the leaf library (see `vesper_tests::modgraph` for what counts as an edge).

use std::path::Path;

use vesper_tests::modgraph;

fn assert_no_circles(crate_dir: &str) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(crate_dir)
        .join("src");
    let modules = modgraph::read_crate(&src).expect("read the crate's sources");
    assert!(
        modules.len() > 5,
        "found only {} modules under {}",
        modules.len(),
        src.display()
    );
    let edges = modgraph::edges(&modules);
    assert!(!edges.is_empty(), "no edges found: the reader is broken");
    let circles = modgraph::circles(&edges);
    assert!(
        circles.is_empty(),
        "import circles in {crate_dir}:\n{}",
        modgraph::report(&circles)
    );
}

#[test]
fn t00_the_super_peer_has_no_import_circle() {
    assert_no_circles("superpeer");
}

#[test]
fn t00_the_leaf_library_has_no_import_circle() {
    assert_no_circles("leafpeer");
}

/// Only `superpeer/src/error.rs` picks a gRPC code: everywhere else a super peer error is a `ServiceError`.
#[test]
fn t00_only_the_error_module_of_the_super_peer_picks_grpc_codes() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../superpeer/src");
    let modules = modgraph::read_crate(&src).expect("read the super peer's sources");
    let mut found = Vec::new();
    for (module, (file, text)) in &modules {
        if module == &["error".to_string()] {
            continue;
        }
        for (number, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            let mut rest = code;
            while let Some(at) = rest.find("Status::") {
                let after = &rest[at + "Status::".len()..];
                let constructor: String = after
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                let preceded_by_word = rest[..at]
                    .chars()
                    .last()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
                if !constructor.is_empty()
                    && !preceded_by_word
                    && after[constructor.len()..].starts_with('(')
                {
                    found.push(format!(
                        "{}:{}: {}",
                        file.display(),
                        number + 1,
                        line.trim()
                    ));
                }
                rest = after;
            }
        }
    }
    assert!(modules.len() > 5);
    assert!(
        found.is_empty(),
        "gRPC codes picked outside error.rs:\n{}",
        found.join("\n")
    );
}
