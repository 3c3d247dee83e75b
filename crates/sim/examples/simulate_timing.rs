//! Runs scenarios in virtual time and says how long each took on this
//! machine (the figure `docs/benchmarks.md` quotes; a benchmark, not a
//! test). `cargo run --release -p spot-runners-sim --example simulate_timing -- examples/*.json`

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::time::Instant;

use spot_runners_sim::scenario::Scenario;

fn main() {
    for path in std::env::args().skip(1) {
        let scenario = match Scenario::load(std::path::Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{path}: {e}");
                std::process::exit(2);
            }
        };
        let started = Instant::now();
        match spot_runners_sim::simulate::run(&scenario, &mut |_| {}) {
            Ok(report) => {
                let secs = started.elapsed().as_secs_f64();
                println!(
                    "{path}: {secs:.2} s wall for {} s simulated; {} jobs, {} stranded, {} unfinished",
                    report.simulated_secs, report.total.jobs, report.total.stranded, report.total.unfinished
                );
            }
            Err(e) => {
                eprintln!("{path}: {e}");
                std::process::exit(1);
            }
        }
    }
}
