//! Runs one fuzz target on the given inputs, on stable: to replay a crash
//! file, or to see what a seed does (`STRATA_FUZZ_ECHO=1` makes
//! `qmp_daemon` print the daemon's answers).
//!
//!     cargo run --release -p strata-fuzz --example replay -- TARGET FILE...

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((name, files)) = args.split_first() else {
        eprintln!("usage: replay TARGET FILE...");
        std::process::exit(2);
    };
    let Some((_, target)) = strata_fuzz::TARGETS.iter().find(|(n, _)| n == name) else {
        let names: Vec<&str> = strata_fuzz::TARGETS.iter().map(|(n, _)| *n).collect();
        eprintln!("no target {name}; the targets: {}", names.join(" "));
        std::process::exit(2);
    };
    for f in files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("{f}: {e}"));
        target(&data);
    }
}
