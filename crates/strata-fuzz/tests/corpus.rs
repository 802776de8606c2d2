//! Replays every input of `fuzz/corpus/TARGET/` through its target: the
//! inputs that once found a bug, and the seeds each fuzz run starts from.

use std::path::Path;

#[test]
fn corpus_replays_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    let mut total = 0;
    for (name, target) in strata_fuzz::TARGETS {
        let dir = root.join(name);
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "{name} has no corpus");
        for input in &inputs {
            let data = std::fs::read(input).unwrap();
            target(&data);
        }
        println!("{name}: {} inputs", inputs.len());
        total += inputs.len();
    }
    println!("{total} inputs replayed");
}
