//! Decodes every CloudEvent vector in `tests/data/` (the messages the real XZepr
//! server published, realistic ones, and the malformed cases) and prints what the
//! decoder saw, then how fast it decodes the ~1 KB deployment event.
//!
//! `cargo run --release --example decode_samples`

use std::path::Path;
use std::time::Instant;

use xzepr_consumer::decode::{Decoder, DecoderConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let decoder = Decoder::new(DecoderConfig::default())?;
    for sub in ["", "malformed"] {
        let mut files: Vec<_> = std::fs::read_dir(dir.join(sub))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        files.sort();
        for path in files {
            let bytes = std::fs::read(&path)?;
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            match decoder.decode(&bytes) {
                Ok(ev) => {
                    let entities = ev
                        .entities()
                        .map(|e| {
                            format!(
                                "{} events, {} receivers, {} groups{}",
                                e.events.len(),
                                e.event_receivers.len(),
                                e.event_receiver_groups.len(),
                                if e.legacy.is_some() {
                                    " (legacy shape)"
                                } else {
                                    ""
                                }
                            )
                        })
                        .unwrap_or_else(|e| format!("data: {e}"));
                    println!(
                        "ok    {name:<34} {:>6} B  type={} receiver={} | {entities}",
                        bytes.len(),
                        ev.event_type(),
                        ev.source_receiver_id().unwrap_or("-"),
                    );
                }
                Err(e) => println!("error {name:<34} {:>6} B  {e}", bytes.len()),
            }
        }
    }

    let bytes = std::fs::read(dir.join("deployment-1k.json"))?;
    let rounds = 200_000u32;
    let start = Instant::now();
    let mut total = 0usize;
    for _ in 0..rounds {
        total += decoder
            .decode(std::hint::black_box(&bytes))?
            .event_type()
            .len();
    }
    let per = start.elapsed() / rounds;
    println!(
        "\ndecoded the {} B deployment event {rounds} times: {per:?} per event ({total} type bytes seen)",
        bytes.len()
    );
    Ok(())
}
