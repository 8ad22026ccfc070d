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
