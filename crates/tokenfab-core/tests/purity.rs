//! tokenfab-core stays pure: no async runtime, network or disk crates. The simulator and
//! the live system run the same decision code only as long as this holds.

#[test]
fn core_depends_only_on_pure_data_crates() {
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    // humantime: duration text in policies (parsing and formatting only). schemars (optional,
    // feature `schema`): JSON Schemas of the published documents, for the Kubernetes
    // operator's custom resource; types and derives only.
    let allowed = [
        "hdrhistogram",
        "humantime",
        "schemars",
        "serde",
        "serde_json",
        "thiserror",
        "toml",
    ];
    let mut section = "";
    let mut found = Vec::new();
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
            continue;
        }
        let name = line
            .split(['=', ' ', '.'])
            .next()
            .filter(|n| !n.is_empty() && !n.starts_with('#'));
        if let (true, Some(name)) = (section == "[dependencies]", name) {
            found.push(name.to_string());
        }
    }
    assert!(!found.is_empty(), "could not read the [dependencies] section");
    for dep in &found {
        assert!(
            allowed.contains(&dep.as_str()),
            "tokenfab-core must not depend on '{dep}': it is sans-IO (allowed: {allowed:?}); put I/O in a shell crate"
        );
    }
}
