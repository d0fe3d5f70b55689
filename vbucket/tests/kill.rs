#![allow(clippy::unwrap_used, clippy::expect_used)]
//! A process killed outright: a child process writes to several vbuckets
//! (sets and deletes, each batch acknowledged by `wait_persisted`) while
//! another of its threads compacts them back to back, and is killed with
//! SIGKILL after a number of acknowledgements that differs from round to
//! round, so that the kill lands in flushes, in the copies and catch-up
//! rounds of compactions and in their switches. After every kill the
//! directory must open with nothing reported damaged, and every
//! acknowledged mutation must read back as itself or as a later mutation
//! of its key. Another vbucket is created, written and deleted in a loop
//! meanwhile, and must open after any kill. The rounds share one directory, so each opens what the
//! kills before it left.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;
use support::Rng;
use vbucket::{CompactionOptions, ItemMeta, Store, StoreConfig, VBucket};

/// Set in the child process: the directory it writes in.
const CHILD_DIR_ENV: &str = "VBUCKET_KILL_TEST_DIR";
/// Set in the child process: the round, which every version it writes
/// starts with, so that versions grow across rounds.
const CHILD_ROUND_ENV: &str = "VBUCKET_KILL_TEST_ROUND";
const VBUCKETS: u16 = 3;
/// The vbucket the child creates, writes and deletes in a loop.
const CHURN_VBUCKET: u16 = VBUCKETS;
const KEYS: u64 = 300;
/// Acknowledgements after which each round's child is killed.
const KILL_AFTER: [usize; 12] = [1, 40, 700, 150, 2500, 400, 5, 1200, 90, 3000, 260, 20];
/// A child that lives this long was not killed: it stops by itself.
const CHILD_LIFETIME: Duration = Duration::from_secs(120);

fn config() -> StoreConfig {
    let mut c = StoreConfig::default();
    // Small batches: more commits, so more places for a kill to land.
    c.flusher.max_batch_items = 64;
    c
}

/// A mutation's version: its round in the high bits, then a count that
/// grows within the round. Stored as the item's flags (kept by deletes too)
/// and, for sets, as the value.
fn version(round: u32, n: u32) -> u32 {
    (round << 24) | n
}

/// The child process: writes and compacts until it is killed, printing
/// `ACK <vbucket> <key> <version>` once a mutation is persisted.
#[test]
fn killed_writer_process() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return;
    };
    let round: u32 = std::env::var(CHILD_ROUND_ENV).unwrap().parse().unwrap();
    let store = Arc::new(Store::open(&dir, config()).unwrap());
    let vbuckets: Vec<VBucket> = (0..VBUCKETS)
        .map(|vb| store.open_vbucket(vb).unwrap())
        .collect();
    let compactor = {
        let vbuckets = vbuckets.clone();
        std::thread::spawn(move || loop {
            for vb in &vbuckets {
                vb.compact(&CompactionOptions::default()).unwrap();
            }
        })
    };
    // Vbucket CHURN_VBUCKET is created, written and deleted over and over,
    // so that kills land in those too.
    let churn = {
        let store = Arc::clone(&store);
        std::thread::spawn(move || loop {
            let vb = store.open_vbucket(CHURN_VBUCKET).unwrap();
            let m = vb.set(b"churn", b"value", ItemMeta::default()).unwrap();
            vb.wait_persisted(m.seqno, Duration::from_secs(60)).unwrap();
            store.delete_vbucket(CHURN_VBUCKET).unwrap();
        })
    };
    let writers: Vec<_> = vbuckets
        .into_iter()
        .enumerate()
        .map(|(i, vb)| {
            std::thread::spawn(move || {
                let mut rng = Rng::new(u64::from(round) * 1_000 + i as u64);
                let mut n = 0u32;
                let out = std::io::stdout();
                loop {
                    let mut batch = Vec::new();
                    let mut last = 0;
                    for _ in 0..rng.range(1, 40) {
                        n += 1;
                        let v = version(round, n);
                        let key = format!("key{}", rng.below(KEYS));
                        let meta = ItemMeta {
                            flags: v,
                            ..ItemMeta::default()
                        };
                        last = if rng.below(8) == 0 {
                            vb.delete(key.as_bytes(), meta)
                        } else {
                            vb.set(key.as_bytes(), &v.to_be_bytes(), meta)
                        }
                        .unwrap()
                        .seqno;
                        batch.push((key, v));
                    }
                    vb.wait_persisted(last, Duration::from_secs(60)).unwrap();
                    // Straight to the pipe (the harness may capture
                    // `println!`), one locked write per batch.
                    let mut lines = String::new();
                    for (key, v) in batch {
                        lines.push_str(&format!("ACK {i} {key} {v}\n"));
                    }
                    let mut out = out.lock();
                    out.write_all(lines.as_bytes()).unwrap();
                    out.flush().unwrap();
                }
            })
        })
        .collect();
    std::thread::sleep(CHILD_LIFETIME);
    drop((compactor, churn, writers));
    std::process::exit(0);
}

/// Starts this test binary as `killed_writer_process` in `dir`, reads its
/// acknowledgements into `acked` and kills it after `kill_after` of them.
fn run_and_kill(
    dir: &Path,
    round: u32,
    kill_after: usize,
    acked: &mut HashMap<(u16, String), u32>,
) {
    let round_text = round.to_string();
    let mut child = support::spawn_test_process(
        "killed_writer_process",
        &[
            (CHILD_DIR_ENV, dir.as_os_str()),
            (CHILD_ROUND_ENV, round_text.as_ref()),
        ],
    );
    let stdout = child.stdout.take().unwrap();
    let (lines, received) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // The harness's `test killed_writer_process ... ` may come first.
            if let Some(ack) = line.find("ACK ").map(|at| line[at..].to_string()) {
                if lines.send(ack).is_err() {
                    break;
                }
            }
        }
    });
    let mut record = |line: String| {
        let mut fields = line.split(' ').skip(1);
        let vb: u16 = fields.next().unwrap().parse().unwrap();
        let key = fields.next().unwrap().to_string();
        let v: u32 = fields.next().unwrap().parse().unwrap();
        let previous = acked.insert((vb, key), v);
        assert!(previous.is_none_or(|p| p < v), "{line}: versions must grow");
    };
    for _ in 0..kill_after {
        match received.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => record(line),
            Err(e) => {
                let _ = child.kill();
                panic!("round {round}: no acknowledgement from the child: {e}");
            }
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // What it acknowledged before it died counts too.
    reader.join().unwrap();
    while let Ok(line) = received.try_recv() {
        record(line);
    }
}

#[test]
fn a_writer_killed_anywhere_loses_no_acknowledged_mutation() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked: HashMap<(u16, String), u32> = HashMap::new();
    for (round, &kill_after) in (1u32..).zip(&KILL_AFTER) {
        run_and_kill(dir.path(), round, kill_after, &mut acked);
        let store = Store::open(dir.path(), config()).unwrap();
        for vb in 0..VBUCKETS {
            // Damaged files fail the open (the default policy).
            let vbucket = store.open_vbucket(vb).unwrap();
            for ((_, key), &v) in acked.iter().filter(|((k, _), _)| *k == vb) {
                let doc = vbucket
                    .get_including_deleted(key.as_bytes())
                    .unwrap()
                    .unwrap_or_else(|| panic!("round {round}: vb {vb} {key} acked at {v} is gone"));
                assert!(
                    doc.meta.flags >= v,
                    "round {round}: vb {vb} {key} acked at {v} reads as {}",
                    doc.meta.flags
                );
                if !doc.deleted {
                    assert_eq!(doc.value, doc.meta.flags.to_be_bytes(), "vb {vb} {key}");
                }
            }
        }
        // Created, written or deleted when the kill came: it opens, with
        // its one document or none.
        let churned = store.open_vbucket(CHURN_VBUCKET).unwrap();
        if let Some(doc) = churned.get(b"churn").unwrap() {
            assert_eq!(doc.value, b"value");
        }
        store.delete_vbucket(CHURN_VBUCKET).unwrap();
        store.close().unwrap();
        // The open finished what the kill interrupted: one revision a
        // vbucket, no compaction's file left, each file sound.
        let files = support::names(dir.path());
        assert_eq!(
            files.len(),
            usize::from(VBUCKETS),
            "round {round}: {files:?}"
        );
        for name in &files {
            assert!(!name.ends_with(".compact"), "round {round}: {files:?}");
            support::verify_file(&dir.path().join(name));
        }
    }
    assert!(acked.len() > 100, "only {} keys acknowledged", acked.len());
}
