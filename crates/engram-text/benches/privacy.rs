//! The privacy scanner on hostile and ordinary 32 KiB texts (the largest memory text by
//! default): the median of 20 scans of each, and how many findings it kept.
//!
//! `cargo bench --locked -p engram-text --bench privacy`

use std::time::{Duration, Instant};

use engram_text::privacy::scan;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn main() {
    const BYTES: usize = 32 * 1024;
    let fill = |unit: &str| unit.repeat(BYTES / unit.len());
    let texts = [
        ("\":: \" repeated (IPv6 candidates)", fill(":: ")),
        ("\"1:2:3:4 \" repeated (IPv6 and numbers)", fill("1:2:3:4 ")),
        ("card-shaped digit groups", fill("4111 1111 1111 1111 ")),
        ("e-mail addresses", fill("bo@example.com ")),
        (
            "ordinary prose",
            fill("We met at the cafe on Tuesday and talked about the garden. "),
        ),
    ];
    println!("| 32 KiB text | findings | median scan |");
    println!("| --- | --- | --- |");
    for (name, text) in &texts {
        let findings = scan(text).len();
        let samples = (0..20)
            .map(|_| {
                let started = Instant::now();
                std::hint::black_box(scan(std::hint::black_box(text)));
                started.elapsed()
            })
            .collect();
        println!("| {name} | {findings} | {:.2?} |", median(samples));
    }
}
