//! Every scenario shipped in `simulations/` loads (parses, validates, names only models
//! and accelerators the catalog has), so the README's commands work on each.

use std::path::Path;
use tokenfab_sim::Scenario;

#[test]
fn every_shipped_scenario_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../simulations");
    let mut loaded = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let (s, _) = Scenario::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(
                path.file_stem().unwrap().to_str().unwrap(),
                s.name,
                "a scenario's file is named after it"
            );
            loaded.push(s.name);
        }
    }
    loaded.sort();
    assert!(loaded.len() >= 5, "{loaded:?}");
    assert!(loaded.contains(&"document-qa".to_string()));
}
