//! `cargo run -p tokenfab-sim --example run -- SCENARIO [SEED]`: runs a scenario and
//! prints its summary and wall time (for quick experiments without the CLI).
fn main() {
    let path = std::env::args().nth(1).expect("usage: run SCENARIO [SEED]");
    let (s, base) = tokenfab_sim::Scenario::load(std::path::Path::new(&path)).unwrap_or_else(|e| panic!("{e}"));
    let seed = std::env::args().nth(2).map_or(s.seed, |x| x.parse().unwrap());
    let t = std::time::Instant::now();
    let r = tokenfab_sim::run(&s, &base, seed, |_| {}).unwrap();
    let wall = t.elapsed().as_secs_f64();
    for (k, v) in r.summary() {
        println!("{k:28} {v}");
    }
    if let Some(dir) = std::env::args().nth(3) {
        r.write(std::path::Path::new(&dir)).unwrap();
        tokenfab_sim::plot::report_plots(&r, std::path::Path::new(&dir)).unwrap();
    }
    println!(
        "wall {wall:.2} s, {} events, {:.0} requests/s simulated per wall second",
        r.events,
        r.requests.arrived as f64 / wall
    );
}
