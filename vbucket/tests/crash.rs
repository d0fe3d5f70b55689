//! Crash sweeps of a whole store through couchfile's fault injection.
//!
//! A seeded workload of sets and deletes over three vbuckets runs against a
//! [`FaultyDirectory`] in bursts, each followed by a wait for persistence;
//! most bursts hold the flusher thread (in a persistence callback) until
//! they are queued, so they are committed in full batches. The workload is
//! first run a few times without a crash to count its mutating I/Os (file
//! writes and syncs, creates, removes, renames, directory syncs; the count
//! varies a little with the flusher's batching), then once per crash
//! point with the crash at that I/O. After each crash the directory a power
//! cut would leave (several torn tails of the unsynced writes, the synced or
//! the live names) is reopened as a new store, and for every vbucket:
//!
//! - its high seqno `H` is at least the highest seqno reported persisted and
//!   at most the last seqno accepted;
//! - its documents (by seq, deletions included, and by key, with seqno, CAS,
//!   flags and datatype) are exactly the workload's mutations up to `H`: what
//!   was reported persisted is there with its value, a batch is there whole
//!   or not at all, and nothing appears that was never written;
//! - its `_local/vbstate` says `H` is persisted;
//! - it has exactly one revision file, no `.compact` file, and every file
//!   passes `couchtool verify`;
//! - it accepts new writes with seqnos above `H`, and they survive a reopen.
//!
//! Reopening an image does I/O of its own when a vbucket's file is missing
//! or incomplete (early crash points): it is crashed at each of those I/Os
//! too, and the images of that second crash must pass the same checks.
//!
//! `crash_sweep_sample` (CI) tries a sample of the crash points and a few
//! torn tails; `full_crash_sweep` (ignored; `cargo xtask crash`, which sets
//! `CRASH_SWEEP=full`) tries every point with more torn tails. Setting
//! `CRASH_SWEEP=full` makes the sample test do the full sweep too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use btree::Snapshot;
use couchfile::{
    CouchFile, Directory, FaultController, FaultyDirectory, NameTail, OpenMode, TornTail,
};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use support::{check_against_model, crash_config as config, shortest_and_longest, Accepted, Rng};
use vbucket::tool::verify_snapshot;
use vbucket::{revision_name, ItemMeta, Store, VBucket, Vbid, DATATYPE_JSON};

/// Vbuckets of the workload.
const VBUCKETS: Vbid = 3;
/// Mutations of the workload.
const MUTATIONS: usize = 160;
/// Keys per vbucket: few enough that keys are often set again and deleted.
const KEYS: u64 = 16;
const SEED: u64 = 0x9e37_79b9_7f4a_7c15;
/// Runs without a crash that count the workload's I/Os.
const DRY_RUNS: usize = 4;
/// How long a wait for persistence may take before the test gives up (the
/// polling returns as soon as the crash has happened).
const PERSIST_TIMEOUT: Duration = Duration::from_secs(30);

/// One mutation of the workload.
#[derive(Debug, Clone)]
enum Op {
    Set {
        vb: Vbid,
        key: Vec<u8>,
        value: Vec<u8>,
        meta: ItemMeta,
    },
    Delete {
        vb: Vbid,
        key: Vec<u8>,
    },
}

impl Op {
    fn vb(&self) -> Vbid {
        match self {
            Op::Set { vb, .. } | Op::Delete { vb, .. } => *vb,
        }
    }
}

/// Mutations issued together, then waited for (every vbucket's accepted
/// mutations persisted).
#[derive(Debug, Clone)]
struct Burst {
    /// Hold the flusher thread after it has committed the burst's first
    /// mutation until the rest are queued, so they are cut into full
    /// batches (several per vbucket when the burst is long) rather than
    /// committed one by one as they arrive.
    gated: bool,
    ops: Vec<Op>,
}

/// A value of `len` bytes, either random or compressible, starting with
/// `tag` so that values rarely repeat.
fn value(rng: &mut Rng, tag: usize) -> Vec<u8> {
    let len = match rng.below(10) {
        0 => 0,
        1..=5 => rng.range(1, 100),
        6 | 7 => rng.range(100, 1500),
        // Large values: bodies that cross block boundaries.
        _ => rng.range(3000, 14000),
    } as usize;
    let mut v = format!("{tag}:").into_bytes();
    if rng.below(2) == 0 {
        while v.len() < len {
            v.push(rng.next() as u8);
        }
    } else {
        let byte = b'a' + rng.below(26) as u8;
        v.resize(len.max(v.len()), byte);
    }
    v.truncate(len);
    v
}

/// The workload of `seed`: sets (new keys, keys set again, values whose size
/// changes a lot) and deletes over [`VBUCKETS`] vbuckets, in bursts of one
/// to sixteen mutations, most of them gated.
fn workload(seed: u64) -> Vec<Burst> {
    let mut rng = Rng::new(seed);
    let mut bursts = Vec::new();
    let mut i = 0;
    while i < MUTATIONS {
        let len = (rng.range(1, 17) as usize).min(MUTATIONS - i);
        let mut ops = Vec::with_capacity(len);
        for _ in 0..len {
            let vb = rng.below(u64::from(VBUCKETS)) as Vbid;
            let k = rng.below(KEYS);
            // Some long keys, so the by-id tree has more than one level.
            let key = if k.is_multiple_of(5) {
                format!("vb{vb}/key-{k:03}/{}", "x".repeat(150)).into_bytes()
            } else {
                format!("vb{vb}/key-{k:03}").into_bytes()
            };
            if rng.below(5) == 0 {
                ops.push(Op::Delete { vb, key });
            } else {
                let meta = ItemMeta {
                    flags: rng.next() as u32,
                    datatype: if rng.below(2) == 0 { DATATYPE_JSON } else { 0 },
                    ..ItemMeta::default()
                };
                ops.push(Op::Set {
                    vb,
                    key,
                    value: value(&mut rng, i),
                    meta,
                });
            }
            i += 1;
        }
        bursts.push(Burst {
            gated: rng.below(8) != 0,
            ops,
        });
    }
    bursts
}

/// What one run of the workload did.
struct Run {
    dir: Arc<FaultyDirectory>,
    /// Per vbucket, every accepted mutation in seqno order.
    accepted: Vec<Vec<Accepted>>,
    /// Per vbucket, the highest seqno reported persisted.
    persisted: Vec<u64>,
    /// The crash happened.
    crashed: bool,
    /// Mutating I/Os done (the crashed one included).
    mutations: u64,
}

/// Opens the store and its vbuckets; `None` if the crash hit the opening.
fn open_store(dir: &Arc<FaultyDirectory>) -> Option<(Store, Vec<VBucket>)> {
    let store = Store::open_in(Arc::clone(dir) as Arc<dyn Directory>, config()).ok()?;
    let vbs = (0..VBUCKETS)
        .map(|v| store.open_vbucket(v).ok())
        .collect::<Option<Vec<_>>>()?;
    Some((store, vbs))
}

/// Runs `bursts` on a new in-memory directory, crashing at mutating I/O
/// `crash_at`; stops at the first failure it sees after the crash.
fn run(bursts: &[Burst], crash_at: Option<u64>) -> Run {
    let controller = FaultController::new();
    let dir = Arc::new(FaultyDirectory::new(controller.clone()));
    if let Some(n) = crash_at {
        controller.crash_at(n);
    }
    let mut accepted = vec![Vec::new(); usize::from(VBUCKETS)];
    let mut persisted = vec![0u64; usize::from(VBUCKETS)];
    let Some((store, vbs)) = open_store(&dir) else {
        assert!(controller.has_crashed(), "opening failed without a crash");
        return Run {
            dir,
            accepted,
            persisted,
            crashed: true,
            mutations: controller.mutation_count(),
        };
    };
    let mut failed = false;
    'bursts: for burst in bursts {
        // The gate: the flusher thread waits in a persistence callback of
        // the burst's first mutation until the sender is dropped. (It waits
        // at most a few seconds, so a mistake cannot hang the test.)
        let (gate, gate_rx) = mpsc::channel::<()>();
        if let (true, Some(first)) = (burst.gated, burst.ops.first()) {
            let vb = &vbs[usize::from(first.vb())];
            vb.on_persisted(vb.high_seqno() + 1, move |_| {
                let _ = gate_rx.recv_timeout(Duration::from_secs(5));
            });
        }
        for op in &burst.ops {
            let v = usize::from(op.vb());
            let (m, key, value, meta) = match op {
                Op::Set {
                    key, value, meta, ..
                } => (vbs[v].set(key, value, *meta), key, Some(value), *meta),
                Op::Delete { key, .. } => (
                    vbs[v].delete(key, ItemMeta::default()),
                    key,
                    None,
                    ItemMeta::default(),
                ),
            };
            let Ok(m) = m else {
                assert!(controller.has_crashed(), "a mutation failed: {m:?}");
                failed = true;
                break 'bursts;
            };
            accepted[v].push(Accepted {
                seqno: m.seqno,
                key: key.clone(),
                value: value.cloned(),
                cas: m.cas,
                flags: meta.flags,
                datatype: meta.datatype,
            });
        }
        drop(gate);
        for (v, vb) in vbs.iter().enumerate() {
            let Some(last) = accepted[v].last().map(|a| a.seqno) else {
                continue;
            };
            let start = Instant::now();
            // Short waits, so the crash is noticed at once.
            loop {
                match vb.wait_persisted(last, Duration::from_millis(2)) {
                    Ok(p) => {
                        persisted[v] = persisted[v].max(p);
                        break;
                    }
                    Err(e) if e.is_timeout() => {
                        if controller.has_crashed() {
                            failed = true;
                            break 'bursts;
                        }
                        assert!(
                            start.elapsed() < PERSIST_TIMEOUT,
                            "seqno {last} of vbucket {v} not persisted without a crash"
                        );
                    }
                    Err(e) => panic!("wait_persisted: {e}"),
                }
            }
        }
    }
    // What was reported persisted, up to the moment the store goes.
    for (v, vb) in vbs.iter().enumerate() {
        persisted[v] = persisted[v].max(vb.persisted_seqno());
    }
    let closed = store.close();
    if crash_at.is_none() {
        closed.unwrap();
    }
    for (v, vb) in vbs.iter().enumerate() {
        persisted[v] = persisted[v].max(vb.persisted_seqno());
    }
    let crashed = controller.has_crashed();
    assert!(crashed || !failed);
    Run {
        dir,
        accepted,
        persisted,
        crashed,
        mutations: controller.mutation_count(),
    }
}

/// Checks vbucket `vb` against `accepted` and `persisted`; returns its high
/// seqno.
fn check_vbucket(vb: &VBucket, accepted: &[Accepted], persisted: u64, what: &str) -> u64 {
    let what = format!("{what}, vbucket {}", vb.vbid());
    let (high, expected, _) = check_against_model(vb, accepted, persisted, &what);
    // `get` returns live documents only.
    for a in accepted {
        let live = vb.get(&a.key).unwrap();
        let expected_live = expected.get(&a.key).and_then(|e| e.value.clone());
        assert_eq!(live.map(|d| d.value), expected_live, "{what}: get");
    }
    high
}

/// The files of `dir` are exactly the revisions `store`'s vbuckets use (no
/// older revision, no `.compact` file), and each passes verify.
fn check_files(dir: &FaultyDirectory, store: &Store, what: &str) {
    let mut names = dir.list().unwrap();
    names.sort();
    let mut expected: Vec<String> = Vec::new();
    for name in &names {
        assert!(!name.ends_with(".compact"), "{what}: {name} left behind");
        let file = CouchFile::new(dir.open(name).unwrap(), dir.path().join(name)).unwrap();
        let snapshot = Snapshot::open_latest(file, OpenMode::Normal)
            .unwrap_or_else(|e| panic!("{what}: {name}: {e}"));
        let report = verify_snapshot(&snapshot);
        assert!(report.is_ok(), "{what}: {name}: {:?}", report.problems);
    }
    for v in 0..VBUCKETS {
        let revision = store.vbucket(v).unwrap().snapshot().revision();
        expected.push(revision_name(v, revision));
    }
    expected.sort();
    assert_eq!(names, expected, "{what}: one revision per vbucket");
}

/// Reopens the crash image `torn`/`names` of `source` (the directory of
/// `run`, or one that crashed while reopening an image of it) and checks it
/// against `run`; with `write_on`, also writes more to every vbucket,
/// reopens and checks again.
fn check_image(
    run: &Run,
    source: &FaultyDirectory,
    torn: TornTail,
    names: NameTail,
    write_on: bool,
    what: &str,
) {
    let what = format!("{what}, {torn:?}/{names:?}");
    let image = Arc::new(source.crash_image(torn, names).unwrap());
    let store = Store::open_in(Arc::clone(&image) as Arc<dyn Directory>, config())
        .unwrap_or_else(|e| panic!("{what}: reopening: {e}"));
    let mut highs = Vec::new();
    for v in 0..VBUCKETS {
        let vb = store
            .open_vbucket(v)
            .unwrap_or_else(|e| panic!("{what}: opening vbucket {v}: {e}"));
        let i = usize::from(v);
        highs.push(check_vbucket(
            &vb,
            &run.accepted[i],
            run.persisted[i],
            &what,
        ));
    }
    check_files(&image, &store, &what);
    if !write_on {
        store.close().unwrap();
        return;
    }
    // Write on: new mutations continue above the high seqno.
    let mut histories = Vec::new();
    for v in 0..VBUCKETS {
        let i = usize::from(v);
        let vb = store.vbucket(v).unwrap();
        let mut history: Vec<Accepted> = run.accepted[i]
            .iter()
            .take_while(|a| a.seqno <= highs[i])
            .cloned()
            .collect();
        for k in 0..5u64 {
            let key = format!("vb{v}/key-{:03}", k * 7 % KEYS).into_bytes();
            let next = highs[i] + k + 1;
            let (m, value) = if k == 3 {
                (vb.delete(&key, ItemMeta::default()).unwrap(), None)
            } else {
                let value = format!("after the crash {k}").into_bytes();
                (
                    vb.set(&key, &value, ItemMeta::default()).unwrap(),
                    Some(value),
                )
            };
            assert_eq!(m.seqno, next, "{what}: seqnos continue above {}", highs[i]);
            history.push(Accepted {
                seqno: m.seqno,
                key,
                value,
                cas: m.cas,
                flags: 0,
                datatype: 0,
            });
        }
        vb.wait_persisted(highs[i] + 5, Duration::from_secs(30))
            .unwrap();
        histories.push(history);
    }
    store.close().unwrap();
    // Only what was synced counts.
    let image = Arc::new(
        image
            .crash_image(TornTail::Nothing, NameTail::Synced)
            .unwrap(),
    );
    let store = Store::open_in(Arc::clone(&image) as Arc<dyn Directory>, config()).unwrap();
    for v in 0..VBUCKETS {
        let i = usize::from(v);
        let vb = store.open_vbucket(v).unwrap();
        let high = check_vbucket(
            &vb,
            &histories[i],
            highs[i] + 5,
            &format!("{what}, written on"),
        );
        assert_eq!(high, highs[i] + 5);
    }
    check_files(&image, &store, &what);
    store.close().unwrap();
}

/// Crashes at every mutating I/O of reopening the crash image
/// `torn`/`names` of `run` (removing incomplete files, creating missing
/// ones, committing a new vbucket's state); each crashed reopen's own crash
/// images must pass the same checks. Returns the images checked.
fn recovery_crashes(run: &Run, torn: TornTail, names: NameTail, what: &str) -> u64 {
    let image = Arc::new(run.dir.crash_image(torn, names).unwrap());
    let (store, _) = open_store(&image).expect("reopening without a crash");
    store.close().unwrap();
    let count = image.controller().mutation_count();
    let mut checked = 0;
    for m in 0..count {
        let image = Arc::new(run.dir.crash_image(torn, names).unwrap());
        image.controller().crash_at(m);
        if let Some((store, _)) = open_store(&image) {
            let _ = store.close();
        }
        assert!(image.controller().has_crashed(), "{what}: reopening");
        let what = format!("{what}, {torn:?}/{names:?}, crash at I/O {m} of {count} of the reopen");
        for (torn, names) in [
            (TornTail::Nothing, NameTail::Synced),
            (TornTail::Everything, NameTail::Everything),
        ] {
            check_image(run, &image, torn, names, false, &what);
            checked += 1;
        }
    }
    checked
}

/// The crash images tried: torn tails of the unsynced writes, and the synced
/// or the live names.
fn images(full: bool) -> Vec<(TornTail, NameTail)> {
    let torn: Vec<TornTail> = if full {
        let mut t = vec![TornTail::Nothing];
        t.extend(
            [1, 7, 100, 1000, 4095, 4096, 4097, 5000, 9000, 20000]
                .into_iter()
                .map(TornTail::Prefix),
        );
        t.push(TornTail::Everything);
        t
    } else {
        vec![
            TornTail::Nothing,
            TornTail::Prefix(1),
            TornTail::Prefix(4097),
            TornTail::Everything,
        ]
    };
    let mut out = Vec::new();
    for (i, t) in torn.into_iter().enumerate() {
        if full {
            out.push((t, NameTail::Synced));
            out.push((t, NameTail::Everything));
        } else {
            // Alternate the names in the sample.
            out.push((
                t,
                if i % 2 == 0 {
                    NameTail::Synced
                } else {
                    NameTail::Everything
                },
            ));
        }
    }
    if !full {
        out.push((TornTail::Everything, NameTail::Synced));
    }
    out
}

/// The crash points of the sample: the first and last few (opening the
/// store, the end of the workload and the close) and an even spread.
fn sample_points(count: u64) -> Vec<u64> {
    let mut points: Vec<u64> = (0..12).collect();
    points.extend(count.saturating_sub(6)..count + 2);
    let stride = (count / 100).max(1);
    points.extend((12..count).step_by(stride as usize));
    points.sort_unstable();
    points.dedup();
    points
}

fn full_from_env() -> bool {
    std::env::var("CRASH_SWEEP").is_ok_and(|v| v == "full")
}

fn sweep(full: bool) {
    let started = Instant::now();
    let ops = workload(SEED);
    // The count varies with the flusher's batching (446 to 493 I/Os in a
    // few runs): the sample is placed by the shortest of a few dry runs, so
    // that its points fall inside almost every run; the full sweep goes
    // past the longest.
    let dry: Vec<Run> = (0..DRY_RUNS).map(|_| run(&ops, None)).collect();
    let (count, longest) = shortest_and_longest(dry.iter().map(|d| d.mutations));
    assert!(
        (100..5000).contains(&count),
        "the workload takes {count} mutating I/Os"
    );
    for d in &dry {
        assert!(!d.crashed);
        for (v, accepted) in d.accepted.iter().enumerate() {
            assert_eq!(d.persisted[v], accepted.last().map_or(0, |a| a.seqno));
        }
        check_image(
            d,
            &d.dir,
            TornTail::Nothing,
            NameTail::Synced,
            true,
            "no crash",
        );
    }
    let points: Vec<u64> = if full {
        (0..longest + longest / 16 + 8).collect()
    } else {
        sample_points(count)
    };
    let variants = images(full);
    // Crashes while reopening: on the first two images of the sample, on
    // the untorn ones of the full sweep.
    let crash_reopen = |i: usize, torn: TornTail| {
        if full {
            !matches!(torn, TornTail::Prefix(_))
        } else {
            i < 2
        }
    };
    let (mut crashed, mut checked, mut reopen_checked) = (0, 0, 0);
    for &n in &points {
        let r = run(&ops, Some(n));
        crashed += u64::from(r.crashed);
        for (i, &(torn, names)) in variants.iter().enumerate() {
            // Write on after one image per point (every image in full).
            let write_on = full || i == n as usize % variants.len();
            let what = format!("crash at I/O {n} of {count}");
            check_image(&r, &r.dir, torn, names, write_on, &what);
            checked += 1;
            if crash_reopen(i, torn) {
                reopen_checked += recovery_crashes(&r, torn, names, &what);
            }
        }
    }
    // The batching varies from run to run, but most points must crash.
    assert!(crashed * 10 >= points.len() as u64 * 8, "{crashed} crashed");
    println!(
        "{} sweep: {count} to {longest} mutating I/Os, {} crash points ({crashed} crashed), \
         {checked} crash images checked, and {reopen_checked} more after a crash \
         while reopening one, in {:.1?}",
        if full { "full" } else { "sample" },
        points.len(),
        started.elapsed()
    );
}

#[test]
fn crash_sweep_sample() {
    sweep(full_from_env());
}

/// The full sweep: `cargo xtask crash`.
#[test]
#[ignore = "the full crash sweep: run by `cargo xtask crash`"]
fn full_crash_sweep() {
    sweep(true);
}
