//! Fuzzing of every decoder of network and disk bytes, and of the config parser, on the
//! stable toolchain: each target of `decoders/targets.rs` runs over a corpus generated from
//! its valid encodings by random mutations (bit flips, byte changes, truncations, insertions,
//! deletions, duplications, splices between seeds), a bounded number of cases from a fixed
//! PRNG seed, so a run is quick and repeatable. The same targets run coverage-guided on
//! nightly through the cargo-fuzz crate in `tests/fuzz/` (see its README.md).
//!
//! `DECODERS_CASES` (cases per target, default 1500) and `DECODERS_SEED` (the PRNG seed)
//! widen or vary a run; a failing case is printed in hex with the seed that made it.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

#[path = "decoders/targets.rs"]
mod targets;

use targets::{Target, TARGETS};

/// splitmix64: small, fast and good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when n is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

/// Bytes decoders treat specially: MessagePack markers, limits of integer widths.
const INTERESTING: &[u8] = &[
    0x00, 0x01, 0x02, 0x7f, 0x80, 0x90, 0x91, 0x9f, 0xa0, 0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xc5, 0xcc, 0xcd, 0xce, 0xcf,
    0xd0, 0xd3, 0xdc, 0xdd, 0xde, 0xdf, 0xff, b'=', b'[', b']', b'"', b'\n', b'.',
];

/// Apply one random mutation to `input`.
fn mutate(rng: &mut Rng, input: &mut Vec<u8>, seeds: &[Vec<u8>]) {
    let len = input.len();
    match rng.below(10) {
        // Flip one bit.
        0 if len > 0 => {
            let i = rng.below(len);
            input[i] ^= 1 << rng.below(8);
        }
        // Set a byte to a random or an interesting value.
        1 if len > 0 => {
            let i = rng.below(len);
            input[i] = if rng.below(2) == 0 { rng.byte() } else { INTERESTING[rng.below(INTERESTING.len())] };
        }
        // Truncate.
        2 => input.truncate(rng.below(len + 1)),
        // Insert a few random or interesting bytes.
        3 => {
            let at = rng.below(len + 1);
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n)
                .map(|_| if rng.below(2) == 0 { rng.byte() } else { INTERESTING[rng.below(INTERESTING.len())] })
                .collect();
            input.splice(at..at, bytes);
        }
        // Delete a range.
        4 if len > 0 => {
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(32));
            input.drain(at..at + n);
        }
        // Duplicate a range in place.
        5 if len > 0 => {
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(32));
            let copy = input[at..at + n].to_vec();
            let to = rng.below(len + 1);
            input.splice(to..to, copy);
        }
        // Splice: this input's head onto another seed's tail.
        6 => {
            let other = &seeds[rng.below(seeds.len())];
            let head = rng.below(len + 1);
            let tail = rng.below(other.len() + 1);
            input.truncate(head);
            input.extend_from_slice(&other[tail..]);
        }
        // Overwrite a 16- or 32-bit field with a boundary value (lengths, counts, counters).
        7 if len >= 4 => {
            let at = rng.below(len - 3);
            let v: u32 = [0, 1, 0x7f, 0x80, 0xff, 0x100, 0xffff, 0x1_0000, 0x7fff_ffff, u32::MAX][rng.below(10)];
            if rng.below(2) == 0 {
                input[at..at + 4].copy_from_slice(&v.to_be_bytes());
            } else {
                input[at..at + 2].copy_from_slice(&(v as u16).to_be_bytes());
            }
        }
        // Swap two bytes.
        8 if len >= 2 => {
            let (i, j) = (rng.below(len), rng.below(len));
            input.swap(i, j);
        }
        // Add or subtract a little from a byte (off-by-one lengths and tags).
        _ if len > 0 => {
            let i = rng.below(len);
            input[i] = input[i].wrapping_add([1, 2, 0xff, 0xfe][rng.below(4)]);
        }
        _ => input.push(rng.byte()),
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Run one target: its seeds as they are, then mutated seeds (1 to 8 stacked mutations,
/// now and then on random bytes instead), `DECODERS_CASES` cases in all.
fn run(name: &str) {
    let target: &Target = TARGETS.iter().find(|t| t.name == name).expect("a target of that name");
    let seeds = (target.seeds)();
    assert!(!seeds.is_empty());
    let cases = env_u64("DECODERS_CASES", 1500) as usize;
    let base = env_u64("DECODERS_SEED", 0x5eed_0001);
    // A stream per target, so targets do not share their mutations.
    let mut rng =
        Rng(base ^ name.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3)));
    let case = |input: &[u8]| {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| (target.run)(input))) {
            eprintln!("target {name} failed (DECODERS_SEED={base}) on input {}", hex(input));
            resume_unwind(panic);
        }
    };
    for s in &seeds {
        case(s);
    }
    for _ in 0..cases {
        let mut input = if rng.below(20) == 0 {
            (0..rng.below(64)).map(|_| rng.byte()).collect()
        } else {
            seeds[rng.below(seeds.len())].clone()
        };
        for _ in 0..1 + rng.below(8) {
            mutate(&mut rng, &mut input, &seeds);
        }
        case(&input);
    }
}

#[test]
fn frame() {
    run("frame");
}

#[test]
fn payload() {
    run("payload");
}

#[test]
fn frame_stream() {
    run("frame_stream");
}

#[test]
fn context_text() {
    run("context_text");
}

#[test]
fn context_bytes() {
    run("context_bytes");
}

#[test]
fn object_row() {
    run("object_row");
}

#[test]
fn object_row_body() {
    run("object_row_body");
}

#[test]
fn hint_row() {
    run("hint_row");
}

#[test]
fn hint_row_body() {
    run("hint_row_body");
}

#[test]
fn reaped_row() {
    run("reaped_row");
}

#[test]
fn reaped_row_body() {
    run("reaped_row_body");
}

#[test]
fn members() {
    run("members");
}

#[test]
fn members_body() {
    run("members_body");
}

#[test]
fn store_open() {
    run("store_open");
}

#[test]
fn config() {
    run("config");
}

/// Every target has a test above.
#[test]
fn every_target_runs() {
    let src = include_str!("decoders.rs");
    for t in TARGETS {
        assert!(src.contains(&format!("run(\"{}\");", t.name)), "no test runs target {}", t.name);
    }
}

/// Write every target's seeds as files, one directory per target, to seed the coverage-guided
/// fuzzer: `RINGKV_FUZZ_CORPUS=tests/fuzz/corpus cargo test -p ringkv --test decoders -- --ignored seed_corpus`.
#[test]
#[ignore = "writes files: run it to seed the cargo-fuzz corpus"]
fn seed_corpus() {
    let dir =
        std::path::PathBuf::from(std::env::var("RINGKV_FUZZ_CORPUS").expect("RINGKV_FUZZ_CORPUS names a directory"));
    for t in TARGETS {
        let d = dir.join(t.name);
        std::fs::create_dir_all(&d).unwrap();
        for (i, s) in (t.seeds)().iter().enumerate() {
            std::fs::write(d.join(format!("seed-{i:03}")), s).unwrap();
        }
    }
}
