//! What the benchmark binaries share.

#![allow(dead_code)]

/// A free loopback port (bound then released; fine on loopback for benchmarks).
pub fn port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One named part of a benchmark.
pub type Part = (&'static str, std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>);

/// Runs the benchmark parts whose names contain one of the command line's words (all of
/// them without any), in order, on a multi-threaded runtime.
pub fn run_parts(parts: Vec<Part>) {
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for (name, part) in parts {
            if filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str())) {
                part.await;
            }
        }
    });
}
