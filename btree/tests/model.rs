//! Property tests against simple models.
//!
//! Tree level: random sorted batches of fetch / remove / insert /
//! fetch-insert actions on byte keys are applied with [`BTree::modify`] (small
//! node thresholds, so trees get several levels) and to a `BTreeMap`; after
//! each batch the tree's structure is checked node by node (KP keys, reduces,
//! subtree sizes, leaf depth), and full folds, lookups, fetch callbacks, range
//! reduces, bounded folds with early stop and a tree built bottom-up from the
//! model's entries must all agree with the model. Old roots stay readable.
//!
//! Document level: random batches (ids of 1 to 4095 bytes, bodies from empty to
//! a few hundred KiB, plain, compressed and pre-compressed, inserts, updates,
//! deletes with and without body, re-creations, explicit sequence numbers,
//! local documents, abandoned saves) go to a [`Db`] on a real file and to a
//! model; the file is reopened between batches and every committed header,
//! read again with [`Snapshot::open_at`], must show exactly the model of its
//! time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use btree::node::Node;
use btree::{
    Action, ActionOp, BTree, Body, ById, BySeq, ChangesFilter, Db, DbOptions, DocUpdate, IdReduce,
    Local, LocalUpdate, NodeConfig, Snapshot, TreeOps,
};
use couchfile::{
    compress, encode_seq_key, CouchFile, DocInfo, FileBackend, FileWriter, MemBackend, NodePointer,
    CONTENT_META_COMPRESSED, MAX_U48,
};
use proptest::prelude::*;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::{Bound, ControlFlow};
use std::path::Path;
use std::sync::Arc;

// ------------------------------------------------------- shared functions

/// Picks an element of a collection whose size is known only later.
#[derive(Debug, Clone, Copy)]
struct Pick(usize);

impl Pick {
    fn index(&self, len: usize) -> usize {
        self.0 % len
    }
}

fn pick() -> impl Strategy<Value = Pick> {
    any::<usize>().prop_map(Pick)
}

/// Deterministic pseudo-random bytes (splitmix64).
fn rand_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn in_bounds<O: TreeOps>(ops: &O, key: &[u8], start: Bound<&[u8]>, end: Bound<&[u8]>) -> bool {
    let after_start = match start {
        Bound::Unbounded => true,
        Bound::Included(s) => ops.compare(key, s) != Ordering::Less,
        Bound::Excluded(s) => ops.compare(key, s) == Ordering::Greater,
    };
    let before_end = match end {
        Bound::Unbounded => true,
        Bound::Included(e) => ops.compare(key, e) != Ordering::Greater,
        Bound::Excluded(e) => ops.compare(key, e) == Ordering::Less,
    };
    after_start && before_end
}

fn as_ref(b: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    match b {
        Bound::Unbounded => Bound::Unbounded,
        Bound::Included(k) => Bound::Included(k.as_slice()),
        Bound::Excluded(k) => Bound::Excluded(k.as_slice()),
    }
}

/// What a structural walk of a tree found.
struct Walked {
    entries: Vec<(Vec<u8>, Vec<u8>)>,
    /// Levels from the root to the leaves (0 for an empty tree).
    depth: usize,
}

/// Reads every node of the tree under `root` and checks couchstore's
/// invariants: each KP key is the last key of its child, stored reduces and
/// subtree sizes equal the recomputed ones, all leaves are at the same depth,
/// keys strictly ascend. Returns the entries in order.
fn check_tree<O: TreeOps>(file: &CouchFile, ops: &O, root: Option<&NodePointer>) -> Walked {
    fn walk<O: TreeOps>(
        file: &CouchFile,
        ops: &O,
        offset: u64,
        depth: usize,
        leaf_depth: &mut Option<usize>,
        entries: &mut Vec<(Vec<u8>, Vec<u8>)>,
    ) -> (Vec<u8>, u64, Vec<u8>) {
        let node = Node::read(file, offset).unwrap();
        let disk_size = 8 + file.read_chunk(offset).unwrap().len() as u64;
        let last = node.key(node.len() - 1).to_vec();
        if node.is_leaf {
            match leaf_depth {
                Some(d) => assert_eq!(*d, depth, "leaves at different depths"),
                None => *leaf_depth = Some(depth),
            }
            entries.extend(node.entries().map(|(k, v)| (k.to_vec(), v.to_vec())));
            let reduce = ops.reduce(&mut node.entries()).unwrap();
            return (last, disk_size, reduce);
        }
        let mut size = disk_size;
        let mut reduces = Vec::new();
        for (key, value) in node.entries() {
            let child = NodePointer::decode_kp_value(value).unwrap();
            let (child_last, child_size, child_reduce) =
                walk(file, ops, child.pointer, depth + 1, leaf_depth, entries);
            assert_eq!(child_last, key, "KP key is not the child's last key");
            assert_eq!(child_size, child.subtree_size, "stored subtree size");
            assert_eq!(child_reduce, child.reduce, "stored reduce");
            size += child_size;
            reduces.push(child_reduce);
        }
        let reduce = ops
            .rereduce(&mut reduces.iter().map(Vec::as_slice))
            .unwrap();
        (last, size, reduce)
    }

    let mut entries = Vec::new();
    let mut leaf_depth = None;
    if let Some(root) = root {
        let (_, size, reduce) = walk(file, ops, root.pointer, 1, &mut leaf_depth, &mut entries);
        assert_eq!(size, root.subtree_size, "root subtree size");
        assert_eq!(reduce, root.reduce, "root reduce");
    }
    for pair in entries.windows(2) {
        assert_eq!(
            ops.compare(&pair[0].0, &pair[1].0),
            Ordering::Less,
            "keys not strictly ascending"
        );
    }
    Walked {
        entries,
        depth: leaf_depth.unwrap_or(0),
    }
}

// ------------------------------------------------------------- tree level

/// Byte order; reduce = (entry count, total value bytes), two u64s.
#[derive(Debug, Clone, Copy)]
struct CountOps;

fn count_reduce(count: u64, bytes: u64) -> Vec<u8> {
    let mut out = count.to_be_bytes().to_vec();
    out.extend_from_slice(&bytes.to_be_bytes());
    out
}

fn decode_count(r: &[u8]) -> (u64, u64) {
    assert_eq!(r.len(), 16, "count reduce length");
    (
        u64::from_be_bytes(r[..8].try_into().unwrap()),
        u64::from_be_bytes(r[8..].try_into().unwrap()),
    )
}

impl TreeOps for CountOps {
    fn compare(&self, a: &[u8], b: &[u8]) -> Ordering {
        a.cmp(b)
    }

    fn reduce(&self, entries: &mut dyn Iterator<Item = (&[u8], &[u8])>) -> btree::Result<Vec<u8>> {
        let (mut n, mut bytes) = (0, 0);
        for (_, v) in entries {
            n += 1;
            bytes += v.len() as u64;
        }
        Ok(count_reduce(n, bytes))
    }

    fn rereduce(&self, reduces: &mut dyn Iterator<Item = &[u8]>) -> btree::Result<Vec<u8>> {
        let (mut n, mut bytes) = (0, 0);
        for r in reduces {
            let (a, b) = decode_count(r);
            n += a;
            bytes += b;
        }
        Ok(count_reduce(n, bytes))
    }
}

type Model = BTreeMap<Vec<u8>, Vec<u8>>;

#[derive(Debug, Clone)]
enum TOp {
    Fetch,
    Remove,
    Insert(Vec<u8>),
    FetchInsert(Vec<u8>),
}

/// A key to probe with: one of the pool's or a fresh one.
#[derive(Debug, Clone)]
enum ProbeKey {
    Pool(Pick),
    Fresh(Vec<u8>),
}

impl ProbeKey {
    fn resolve(&self, pool: &[Vec<u8>]) -> Vec<u8> {
        match self {
            ProbeKey::Pool(i) => pool[i.index(pool.len())].clone(),
            ProbeKey::Fresh(k) => k.clone(),
        }
    }
}

#[derive(Debug, Clone)]
enum BoundSpec {
    Unbounded,
    Included(ProbeKey),
    Excluded(ProbeKey),
}

impl BoundSpec {
    fn resolve(&self, pool: &[Vec<u8>]) -> Bound<Vec<u8>> {
        match self {
            BoundSpec::Unbounded => Bound::Unbounded,
            BoundSpec::Included(k) => Bound::Included(k.resolve(pool)),
            BoundSpec::Excluded(k) => Bound::Excluded(k.resolve(pool)),
        }
    }
}

#[derive(Debug, Clone)]
struct TreeBatch {
    actions: Vec<(Pick, TOp)>,
    lookups: Vec<ProbeKey>,
    /// (start, end, stop after this many entries).
    ranges: Vec<(BoundSpec, BoundSpec, Option<usize>)>,
}

fn tree_key() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // A tiny alphabet: many keys are prefixes of others.
        3 => prop::collection::vec(0u8..3, 1..6),
        5 => prop::collection::vec(any::<u8>(), 1..40),
    ]
}

fn tree_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        20 => prop::collection::vec(any::<u8>(), 0..48),
        // Now and then an entry bigger than a whole node.
        1 => prop::collection::vec(any::<u8>(), 300..1500),
    ]
}

fn probe_key() -> impl Strategy<Value = ProbeKey> {
    prop_oneof![
        3 => pick().prop_map(ProbeKey::Pool),
        1 => tree_key().prop_map(ProbeKey::Fresh),
    ]
}

fn bound_spec() -> impl Strategy<Value = BoundSpec> {
    prop_oneof![
        1 => Just(BoundSpec::Unbounded),
        2 => probe_key().prop_map(BoundSpec::Included),
        2 => probe_key().prop_map(BoundSpec::Excluded),
    ]
}

fn tree_batch(actions: std::ops::Range<usize>) -> impl Strategy<Value = TreeBatch> {
    let op = prop_oneof![
        2 => Just(TOp::Fetch),
        2 => Just(TOp::Remove),
        4 => tree_value().prop_map(TOp::Insert),
        2 => tree_value().prop_map(TOp::FetchInsert),
    ];
    (
        prop::collection::vec((pick(), op), actions),
        prop::collection::vec(probe_key(), 0..30),
        prop::collection::vec(
            (bound_spec(), bound_spec(), proptest::option::of(1usize..40)),
            1..6,
        ),
    )
        .prop_map(|(actions, lookups, ranges)| TreeBatch {
            actions,
            lookups,
            ranges,
        })
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // No regression files next to the tests.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn mem_writer() -> FileWriter {
    let file = CouchFile::new(Arc::new(MemBackend::new()), "model.couch").unwrap();
    FileWriter::create_without_header(file).unwrap()
}

fn fold_all<O: TreeOps>(
    tree: &BTree<O>,
    file: &CouchFile,
    root: Option<&NodePointer>,
    start: Bound<&[u8]>,
    end: Bound<&[u8]>,
    stop: Option<usize>,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    tree.fold(file, root, start, end, &mut |k, v| {
        assert!(
            stop.is_none_or(|n| out.len() < n),
            "fold called f after it returned Break"
        );
        out.push((k.to_vec(), v.to_vec()));
        Ok(if stop.is_some_and(|n| out.len() >= n) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        })
    })
    .unwrap();
    out
}

fn model_entries(model: &Model) -> Vec<(Vec<u8>, Vec<u8>)> {
    model.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Checks lookups, bounded folds and range reduces of `root` against `model`.
fn check_queries(
    tree: &BTree<CountOps>,
    file: &CouchFile,
    root: Option<&NodePointer>,
    model: &Model,
    pool: &[Vec<u8>],
    batch: &TreeBatch,
) {
    // Point lookups of sorted, unique keys.
    let keys: BTreeSet<Vec<u8>> = batch.lookups.iter().map(|k| k.resolve(pool)).collect();
    let keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    let found = tree.lookup(file, root, &keys).unwrap();
    let expected: Vec<Option<Vec<u8>>> = keys.iter().map(|k| model.get(*k).cloned()).collect();
    assert_eq!(found, expected, "lookups");

    for (start, end, stop) in &batch.ranges {
        let (start, end) = (start.resolve(pool), end.resolve(pool));
        let (s, e) = (as_ref(&start), as_ref(&end));
        let inside: Vec<(Vec<u8>, Vec<u8>)> = model
            .iter()
            .filter(|(k, _)| in_bounds(&CountOps, k, s, e))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let want: Vec<_> = inside
            .iter()
            .take(stop.unwrap_or(usize::MAX))
            .cloned()
            .collect();
        assert_eq!(
            fold_all(tree, file, root, s, e, *stop),
            want,
            "fold {start:?}..{end:?} stop {stop:?}"
        );
        let reduce = tree.reduce_range(file, root, s, e).unwrap();
        let bytes: u64 = inside.iter().map(|(_, v)| v.len() as u64).sum();
        assert_eq!(
            decode_count(&reduce),
            (inside.len() as u64, bytes),
            "reduce_range {start:?}..{end:?}"
        );
    }
}

fn run_tree_case(
    config: NodeConfig,
    pool: Vec<Vec<u8>>,
    batches: Vec<TreeBatch>,
) -> Result<(), TestCaseError> {
    let pool: Vec<Vec<u8>> = pool
        .into_iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let tree = BTree::new(CountOps, config);
    let mut w = mem_writer();
    let file = w.file().clone();
    let mut root: Option<NodePointer> = None;
    let mut model = Model::new();
    let mut history: Vec<(Option<NodePointer>, Model)> = vec![(None, Model::new())];

    for batch in &batches {
        // Sorted, unique actions (the first action on a key wins).
        let mut by_key: BTreeMap<Vec<u8>, TOp> = BTreeMap::new();
        for (i, op) in &batch.actions {
            by_key
                .entry(pool[i.index(pool.len())].clone())
                .or_insert_with(|| op.clone());
        }
        let actions: Vec<Action<'_>> = by_key
            .iter()
            .map(|(k, op)| Action {
                key: k,
                op: match op {
                    TOp::Fetch => ActionOp::Fetch,
                    TOp::Remove => ActionOp::Remove,
                    TOp::Insert(v) => ActionOp::Insert(v),
                    TOp::FetchInsert(v) => ActionOp::FetchInsert(v),
                },
            })
            .collect();

        // The model, and what the fetches must report.
        let mut want_fetched = Vec::new();
        let mut changes = false;
        for (k, op) in &by_key {
            match op {
                TOp::Fetch => want_fetched.push((k.clone(), model.get(k).cloned())),
                TOp::Remove => changes |= model.remove(k).is_some(),
                TOp::Insert(v) => {
                    model.insert(k.clone(), v.clone());
                    changes = true;
                }
                TOp::FetchInsert(v) => {
                    want_fetched.push((k.clone(), model.insert(k.clone(), v.clone())));
                    changes = true;
                }
            }
        }

        let mut fetched = Vec::new();
        let new_root = tree
            .modify(&mut w, root.as_ref(), &actions, &mut |k, old| {
                fetched.push((k.to_vec(), old.map(<[u8]>::to_vec)));
                Ok(())
            })
            .unwrap();
        w.flush().unwrap();
        prop_assert_eq!(&fetched, &want_fetched, "fetch callbacks");
        if !changes {
            // Nothing changed: the old root is shared, not rewritten.
            prop_assert_eq!(&new_root, &root, "unchanged tree got a new root");
        }
        root = new_root;
        prop_assert_eq!(root.is_none(), model.is_empty());

        let walked = check_tree(&file, &CountOps, root.as_ref());
        prop_assert_eq!(&walked.entries, &model_entries(&model), "structure walk");
        prop_assert_eq!(
            fold_all(
                &tree,
                &file,
                root.as_ref(),
                Bound::Unbounded,
                Bound::Unbounded,
                None
            ),
            model_entries(&model),
            "full fold"
        );
        check_queries(&tree, &file, root.as_ref(), &model, &pool, batch);

        // A tree built bottom-up from the model's entries.
        let mut b = tree.builder();
        for (k, v) in &model {
            b.push(&mut w, k, v).unwrap();
        }
        let built = b.finish(&mut w).unwrap();
        w.flush().unwrap();
        prop_assert_eq!(built.is_none(), model.is_empty());
        let walked = check_tree(&file, &CountOps, built.as_ref());
        prop_assert_eq!(&walked.entries, &model_entries(&model), "built tree walk");
        prop_assert_eq!(
            fold_all(
                &tree,
                &file,
                built.as_ref(),
                Bound::Unbounded,
                Bound::Unbounded,
                None
            ),
            model_entries(&model),
            "built tree fold"
        );
        check_queries(&tree, &file, built.as_ref(), &model, &pool, batch);
        if let (Some(a), Some(b)) = (&root, &built) {
            prop_assert_eq!(&a.reduce, &b.reduce, "built and modified reduces");
        }

        history.push((root.clone(), model.clone()));
    }

    // Copy-on-write: every old root still reads as its model.
    for (old_root, old_model) in &history {
        let walked = check_tree(&file, &CountOps, old_root.as_ref());
        prop_assert_eq!(&walked.entries, &model_entries(old_model), "old root");
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn tree_matches_model(
        leaf in 100usize..400,
        interior in 100usize..400,
        pool in prop::collection::vec(tree_key(), 1..250),
        batches in prop::collection::vec(tree_batch(0..200), 1..7),
    ) {
        let config = NodeConfig { leaf_threshold: leaf, interior_threshold: interior };
        run_tree_case(config, pool, batches)?;
    }

    /// `btree::BySeq` with 6-byte sequence keys: range counts from the
    /// stored reduces equal the model's.
    #[test]
    fn by_seq_counts_match_model(
        threshold in 100usize..400,
        batches in prop::collection::vec(
            prop::collection::vec((0u64..3000, any::<bool>()), 0..300),
            1..5,
        ),
        ranges in prop::collection::vec((0u64..3100, 0u64..3100, 0u8..4), 1..20),
    ) {
        let tree = BTree::new(BySeq, NodeConfig { leaf_threshold: threshold, interior_threshold: threshold });
        let mut w = mem_writer();
        let file = w.file().clone();
        let mut root = None;
        let mut model: BTreeSet<u64> = BTreeSet::new();
        for batch in &batches {
            let ops: BTreeMap<u64, bool> = batch.iter().copied().collect();
            let keys: Vec<[u8; 6]> = ops.keys().map(|&s| encode_seq_key(s).unwrap()).collect();
            let value = b"v".to_vec();
            let actions: Vec<Action<'_>> = ops
                .values()
                .zip(&keys)
                .map(|(&insert, k)| Action {
                    key: k,
                    op: if insert { ActionOp::Insert(&value) } else { ActionOp::Remove },
                })
                .collect();
            for (&seq, &insert) in &ops {
                if insert { model.insert(seq); } else { model.remove(&seq); }
            }
            root = tree.modify(&mut w, root.as_ref(), &actions, &mut |_, _| Ok(())).unwrap();
            w.flush().unwrap();
            let walked = check_tree(&file, &BySeq, root.as_ref());
            prop_assert_eq!(walked.entries.len(), model.len());
            for &(a, b, kinds) in &ranges {
                let (ka, kb) = (encode_seq_key(a).unwrap(), encode_seq_key(b).unwrap());
                let start = if kinds & 1 == 0 { Bound::Included(&ka[..]) } else { Bound::Excluded(&ka[..]) };
                let end = if kinds & 2 == 0 { Bound::Included(&kb[..]) } else { Bound::Excluded(&kb[..]) };
                let want = model
                    .iter()
                    .filter(|&&s| in_bounds(&BySeq, &encode_seq_key(s).unwrap(), start, end))
                    .count() as u64;
                let got = btree::decode_seq_reduce(
                    &tree.reduce_range(&file, root.as_ref(), start, end).unwrap(),
                ).unwrap();
                prop_assert_eq!(got, want, "count in {:?}..{:?}", start, end);
                let unbounded_end = btree::decode_seq_reduce(
                    &tree.reduce_range(&file, root.as_ref(), start, Bound::Unbounded).unwrap(),
                ).unwrap();
                let want_tail = model
                    .iter()
                    .filter(|&&s| in_bounds(&BySeq, &encode_seq_key(s).unwrap(), start, Bound::Unbounded))
                    .count() as u64;
                prop_assert_eq!(unbounded_end, want_tail);
            }
        }
    }
}

proptest! {
    // Each case writes thousands of nodes.
    #![proptest_config(config(24))]

    /// The same with batches of at least `PARALLEL_MODIFY_MIN_ACTIONS`
    /// distinct keys on trees of many small nodes, which `BTree::modify`
    /// shares out between two threads.
    #[test]
    fn large_batches_match_model(
        leaf in 100usize..400,
        interior in 100usize..400,
        pool in prop::collection::vec(tree_key(), 1500..3000),
        batches in prop::collection::vec(tree_batch(800..2000), 2..4),
    ) {
        let config = NodeConfig { leaf_threshold: leaf, interior_threshold: interior };
        run_tree_case(config, pool, batches)?;
    }
}

/// The thresholds of the property test do give trees of several levels.
#[test]
fn small_thresholds_make_deep_trees() {
    let config = NodeConfig {
        leaf_threshold: 150,
        interior_threshold: 150,
    };
    let tree = BTree::new(CountOps, config);
    let mut w = mem_writer();
    let file = w.file().clone();
    let keys: BTreeSet<Vec<u8>> = (0..200u64)
        .map(|i| rand_bytes(1 + (i as usize % 39), i))
        .collect();
    let values: Vec<Vec<u8>> = keys.iter().map(|k| k.repeat(2)).collect();
    let actions: Vec<Action<'_>> = keys
        .iter()
        .zip(&values)
        .map(|(k, v)| Action {
            key: k,
            op: ActionOp::Insert(v),
        })
        .collect();
    let root = tree
        .modify(&mut w, None, &actions, &mut |_, _| Ok(()))
        .unwrap();
    w.flush().unwrap();
    let walked = check_tree(&file, &CountOps, root.as_ref());
    assert_eq!(walked.entries.len(), keys.len());
    assert!(walked.depth >= 3, "depth {}", walked.depth);
}

// --------------------------------------------------------- document level

#[derive(Debug, Clone, Copy)]
enum Fill {
    Random,
    Text,
    Zero,
}

#[derive(Debug, Clone, Copy)]
struct BodyGen {
    len: usize,
    seed: u64,
    fill: Fill,
}

impl BodyGen {
    fn make(&self) -> Vec<u8> {
        match self.fill {
            Fill::Random => rand_bytes(self.len, self.seed),
            Fill::Text => {
                let text = format!(
                    "{{\"seed\":{},\"tags\":[\"a\",\"bc\"],\"n\":42}}",
                    self.seed
                );
                text.bytes().cycle().take(self.len).collect()
            }
            Fill::Zero => vec![0; self.len],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Upsert,
    DeleteWithBody,
    DeleteNoBody,
}

#[derive(Debug, Clone)]
struct DocOp {
    id: Pick,
    kind: Kind,
    body: BodyGen,
    /// Save as [`Body::Stored`] (pre-compressed when the flag says so).
    stored: bool,
    content_meta: u8,
    rev_seq: u64,
    rev_meta: Vec<u8>,
    /// Explicit sequence number this far beyond the last one.
    seq_gap: Option<u8>,
}

#[derive(Debug, Clone)]
struct LocalOp {
    id: Pick,
    value: Option<BodyGen>,
}

#[derive(Debug, Clone)]
struct SaveCall {
    docs: Vec<DocOp>,
    locals: Vec<LocalOp>,
}

#[derive(Debug, Clone)]
struct DocBatch {
    /// Saved, then dropped with `rollback_pending` before the real saves.
    abandoned: Option<SaveCall>,
    calls: Vec<SaveCall>,
    /// Which recorded header to check after this batch.
    check_old: Pick,
    /// Check every recorded header after this batch.
    check_all: bool,
    probe: Probe,
}

/// Random queries for one check.
#[derive(Debug, Clone)]
struct Probe {
    seqs: Vec<u64>,
    since: u64,
    count_ranges: Vec<(u64, u64)>,
    id_range: (BoundSpec, BoundSpec),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct MDoc {
    seq: u64,
    rev_seq: u64,
    rev_meta: Vec<u8>,
    deleted: bool,
    content_meta: u8,
    body: Option<Arc<Vec<u8>>>,
    physical_size: u64,
}

#[derive(Debug, Clone, Default)]
struct DbModel {
    docs: BTreeMap<Vec<u8>, MDoc>,
    locals: BTreeMap<Vec<u8>, Vec<u8>>,
    update_seq: u64,
}

fn doc_id() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => prop::collection::vec(b'a'..b'd', 1..6),
        5 => prop::collection::vec(any::<u8>(), 1..64),
        1 => (prop_oneof![Just(4095usize), 1000usize..4095], any::<u64>())
            .prop_map(|(len, seed)| rand_bytes(len, seed)),
    ]
}

fn body_gen(big: bool) -> impl Strategy<Value = BodyGen> {
    let len = if big {
        prop_oneof![
            2 => Just(0usize),
            12 => 1usize..200,
            4 => 200usize..8192,
            1 => 100 * 1024usize..400 * 1024,
        ]
        .boxed()
    } else {
        prop_oneof![1 => Just(0usize), 6 => 1usize..300, 1 => 300usize..3000].boxed()
    };
    let fill = prop_oneof![Just(Fill::Random), Just(Fill::Text), Just(Fill::Zero)];
    (len, any::<u64>(), fill).prop_map(|(len, seed, fill)| BodyGen { len, seed, fill })
}

fn doc_op() -> impl Strategy<Value = DocOp> {
    let kind = prop_oneof![
        6 => Just(Kind::Upsert),
        2 => Just(Kind::DeleteWithBody),
        2 => Just(Kind::DeleteNoBody),
    ];
    let meta = prop_oneof![Just(0u8), Just(0x80), Just(3), Just(0x83), Just(0x81)];
    (
        pick(),
        kind,
        body_gen(true),
        prop::bool::weighted(0.2),
        meta,
        1..=MAX_U48,
        prop::collection::vec(any::<u8>(), 0..26),
        prop::option::weighted(0.15, any::<u8>()),
    )
        .prop_map(
            |(id, kind, body, stored, content_meta, rev_seq, rev_meta, seq_gap)| DocOp {
                id,
                kind,
                body,
                stored,
                content_meta,
                rev_seq,
                rev_meta,
                seq_gap,
            },
        )
}

fn save_call() -> impl Strategy<Value = SaveCall> {
    (
        prop::collection::vec(doc_op(), 0..60),
        prop::collection::vec(
            (pick(), prop::option::weighted(0.8, body_gen(false)))
                .prop_map(|(id, value)| LocalOp { id, value }),
            0..4,
        ),
    )
        .prop_map(|(docs, locals)| SaveCall { docs, locals })
}

fn probe() -> impl Strategy<Value = Probe> {
    (
        prop::collection::vec(0u64..3000, 0..20),
        0u64..3000,
        prop::collection::vec((0u64..3000, 0u64..3000), 1..5),
        (bound_spec(), bound_spec()),
    )
        .prop_map(|(seqs, since, count_ranges, id_range)| Probe {
            seqs,
            since,
            count_ranges,
            id_range,
        })
}

fn doc_batch() -> impl Strategy<Value = DocBatch> {
    (
        prop::option::weighted(0.15, save_call()),
        prop::collection::vec(save_call(), 0..4),
        pick(),
        prop::bool::weighted(0.2),
        probe(),
    )
        .prop_map(|(abandoned, calls, check_old, check_all, probe)| DocBatch {
            abandoned,
            calls,
            check_old,
            check_all,
            probe,
        })
}

/// Turns a save call into updates (ids unique, the last operation on an id
/// wins) and applies it to `model` unless `apply` is false.
fn prepare(
    call: &SaveCall,
    ids: &[Vec<u8>],
    local_ids: &[Vec<u8>],
    model: &mut DbModel,
    apply: bool,
) -> (Vec<DocUpdate>, Vec<LocalUpdate>, Vec<u64>) {
    let mut seen = BTreeSet::new();
    let mut ops: Vec<&DocOp> = call
        .docs
        .iter()
        .rev()
        .filter(|op| seen.insert(op.id.index(ids.len())))
        .collect();
    ops.reverse();
    let mut running = model.update_seq;
    let mut docs = Vec::new();
    let mut seqs = Vec::new();
    let mut new_docs = Vec::new();
    for op in ops {
        let id = ids[op.id.index(ids.len())].clone();
        let seq = running + 1 + op.seq_gap.map_or(0, u64::from);
        running = seq;
        seqs.push(seq);
        let compressed = op.content_meta & CONTENT_META_COMPRESSED != 0;
        let (body, stored_body, physical_size) = match op.kind {
            Kind::DeleteNoBody => (Body::None, None, 0),
            Kind::Upsert | Kind::DeleteWithBody => {
                let plain = op.body.make();
                let stored = if compressed {
                    compress(&plain)
                } else {
                    plain.clone()
                };
                let size = 8 + stored.len() as u64;
                let body = if op.stored {
                    Body::Stored(stored)
                } else {
                    Body::Plain(plain.clone())
                };
                (body, Some(Arc::new(plain)), size)
            }
        };
        let deleted = op.kind != Kind::Upsert;
        new_docs.push((
            id.clone(),
            MDoc {
                seq,
                rev_seq: op.rev_seq,
                rev_meta: op.rev_meta.clone(),
                deleted,
                content_meta: op.content_meta,
                body: stored_body,
                physical_size,
            },
        ));
        docs.push(DocUpdate {
            id,
            seq: op.seq_gap.map(|_| seq),
            rev_seq: op.rev_seq,
            rev_seq_above_stored: false,
            rev_meta: op.rev_meta.clone(),
            deleted,
            content_meta: op.content_meta,
            body,
        });
    }
    let mut seen = BTreeSet::new();
    let mut local_ops: Vec<&LocalOp> = call
        .locals
        .iter()
        .rev()
        .filter(|op| seen.insert(op.id.index(local_ids.len())))
        .collect();
    local_ops.reverse();
    let locals: Vec<LocalUpdate> = local_ops
        .iter()
        .map(|op| LocalUpdate {
            id: local_ids[op.id.index(local_ids.len())].clone(),
            value: op.value.map(|g| g.make()),
        })
        .collect();
    if apply {
        model.update_seq = running;
        model.docs.extend(new_docs);
        for l in &locals {
            match &l.value {
                Some(v) => model.locals.insert(l.id.clone(), v.clone()),
                None => model.locals.remove(&l.id),
            };
        }
    }
    (docs, locals, seqs)
}

fn expected_info(id: &[u8], d: &MDoc) -> DocInfo {
    DocInfo {
        id: id.to_vec(),
        db_seq: d.seq,
        rev_seq: d.rev_seq,
        rev_meta: d.rev_meta.clone(),
        deleted: d.deleted,
        content_meta: d.content_meta,
        bp: 0,
        physical_size: d.physical_size,
    }
}

fn without_bp(info: &DocInfo) -> DocInfo {
    DocInfo {
        bp: 0,
        ..info.clone()
    }
}

/// Checks everything a snapshot can tell against the model of its header.
fn check_snapshot(
    snap: &Snapshot,
    model: &DbModel,
    ids: &[Vec<u8>],
    local_ids: &[Vec<u8>],
    probe: &Probe,
) {
    let what = format!("header at {}", snap.offset());
    assert_eq!(
        snap.header().update_seq,
        model.update_seq,
        "{what}: update_seq"
    );

    // Counts from the by-id reduce.
    let live = model.docs.values().filter(|d| !d.deleted).count() as u64;
    let size: u64 = model.docs.values().map(|d| d.physical_size).sum();
    assert_eq!(
        snap.doc_counts().unwrap(),
        IdReduce {
            live,
            deleted: model.docs.len() as u64 - live,
            size,
        },
        "{what}: doc counts"
    );
    assert!(snap.space_used().unwrap() >= size);

    // Every id of the pool, present or not, in one sorted lookup.
    let refs: Vec<&[u8]> = ids.iter().map(Vec::as_slice).collect();
    let infos = snap.doc_infos(&refs).unwrap();
    let mut by_id = BTreeMap::new();
    for (id, info) in ids.iter().zip(infos) {
        match (model.docs.get(id), info) {
            (None, None) => {}
            (Some(d), Some(info)) => {
                assert_eq!(without_bp(&info), expected_info(id, d), "{what}: doc info");
                assert_eq!(info.bp == 0, d.body.is_none(), "{what}: body pointer");
                let body = snap.read_body(&info).unwrap();
                assert_eq!(
                    body.as_deref(),
                    d.body.as_deref().map(Vec::as_slice),
                    "{what}: body"
                );
                if let Some(stored) = snap.read_stored_body(&info).unwrap() {
                    assert_eq!(8 + stored.len() as u64, d.physical_size);
                }
                by_id.insert(id.clone(), info);
            }
            (want, got) => panic!("{what}: id {id:?}: model {want:?}, file {got:?}"),
        }
    }

    // The by-seq index: exactly one entry per document, in seq order.
    let mut changes = Vec::new();
    snap.changes_since(0, ChangesFilter::All, &mut |info| {
        changes.push(info);
        Ok(ControlFlow::Continue(()))
    })
    .unwrap();
    let mut want: Vec<(&Vec<u8>, &MDoc)> = model.docs.iter().collect();
    want.sort_by_key(|(_, d)| d.seq);
    assert_eq!(changes.len(), want.len(), "{what}: by-seq entries");
    for (info, (id, _)) in changes.iter().zip(&want) {
        assert_eq!(Some(info), by_id.get(*id), "{what}: by-seq entry of {id:?}");
        assert_eq!(
            snap.doc_info_by_seq(info.db_seq).unwrap().as_ref(),
            Some(info),
            "{what}: doc_info_by_seq"
        );
    }
    let seqs: BTreeSet<u64> = model.docs.values().map(|d| d.seq).collect();
    for &seq in &probe.seqs {
        let got = snap.doc_info_by_seq(seq).unwrap();
        assert_eq!(got.is_some(), seqs.contains(&seq), "{what}: seq {seq}");
    }
    for filter in [
        ChangesFilter::All,
        ChangesFilter::NoDeletes,
        ChangesFilter::DeletesOnly,
    ] {
        let mut got = Vec::new();
        snap.changes_since(probe.since, filter, &mut |info| {
            got.push(info.db_seq);
            Ok(ControlFlow::Continue(()))
        })
        .unwrap();
        let want: Vec<u64> = want
            .iter()
            .filter(|(_, d)| d.seq >= probe.since)
            .filter(|(_, d)| match filter {
                ChangesFilter::All => true,
                ChangesFilter::NoDeletes => !d.deleted,
                ChangesFilter::DeletesOnly => d.deleted,
            })
            .map(|(_, d)| d.seq)
            .collect();
        assert_eq!(
            got, want,
            "{what}: changes since {} {filter:?}",
            probe.since
        );
    }
    for &(lo, hi) in &probe.count_ranges {
        let want = if lo > hi {
            0
        } else {
            seqs.range(lo..=hi).count() as u64
        };
        assert_eq!(
            snap.count_changes(lo, hi).unwrap(),
            want,
            "{what}: count {lo}..={hi}"
        );
    }

    // Id ranges.
    let (start, end) = (probe.id_range.0.resolve(ids), probe.id_range.1.resolve(ids));
    let mut got = Vec::new();
    snap.docs_by_id(as_ref(&start), as_ref(&end), &mut |info| {
        got.push(info.id);
        Ok(ControlFlow::Continue(()))
    })
    .unwrap();
    let want: Vec<Vec<u8>> = model
        .docs
        .keys()
        .filter(|k| in_bounds(&ById, k, as_ref(&start), as_ref(&end)))
        .cloned()
        .collect();
    assert_eq!(got, want, "{what}: docs_by_id");

    // Local documents.
    for id in local_ids {
        assert_eq!(
            snap.local_doc(id).unwrap().as_ref(),
            model.locals.get(id),
            "{what}: local {id:?}"
        );
    }
    let mut locals = BTreeMap::new();
    snap.local_docs(&mut |k, v| {
        locals.insert(k.to_vec(), v.to_vec());
        Ok(ControlFlow::Continue(()))
    })
    .unwrap();
    assert_eq!(locals, model.locals, "{what}: local docs");

    // The three trees' structure.
    let h = snap.header();
    let file = snap.file();
    assert_eq!(
        check_tree(file, &ById, h.by_id_root.as_ref()).entries.len(),
        model.docs.len()
    );
    assert_eq!(
        check_tree(file, &BySeq, h.by_seq_root.as_ref())
            .entries
            .len(),
        model.docs.len()
    );
    assert_eq!(
        check_tree(file, &Local, h.local_root.as_ref())
            .entries
            .len(),
        model.locals.len()
    );
}

fn open_db(path: &Path, options: &DbOptions) -> Db {
    let backend = FileBackend::open_or_create(path).unwrap();
    let file = CouchFile::new(Arc::new(backend), path).unwrap();
    Db::open(file, options).unwrap()
}

fn open_file(path: &Path) -> CouchFile {
    CouchFile::open_read_only(path).unwrap()
}

fn run_doc_case(
    nodes: NodeConfig,
    ids: Vec<Vec<u8>>,
    local_ids: Vec<Vec<u8>>,
    batches: Vec<DocBatch>,
) {
    let ids: Vec<Vec<u8>> = ids
        .into_iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let local_ids: Vec<Vec<u8>> = local_ids
        .into_iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("0.couch.1");
    let options = DbOptions {
        nodes,
        ..DbOptions::default()
    };
    let mut db = open_db(&path, &options);
    let mut model = DbModel::default();
    let mut history: Vec<(u64, DbModel)> = vec![(db.committed().offset, model.clone())];
    let mut timestamp = 1_700_000_000_000_000_000u64;

    for batch in &batches {
        if let Some(call) = &batch.abandoned {
            let (docs, locals, _) = prepare(call, &ids, &local_ids, &mut model, false);
            db.save(&docs, &locals).unwrap();
            db.rollback_pending();
        }
        for call in &batch.calls {
            let (docs, locals, seqs) = prepare(call, &ids, &local_ids, &mut model, true);
            assert_eq!(db.save(&docs, &locals).unwrap(), seqs, "assigned seqs");
        }
        timestamp += 1;
        let offset = db.commit(timestamp).unwrap();
        history.push((offset, model.clone()));
        check_snapshot(&db.snapshot(), &model, &ids, &local_ids, &batch.probe);

        // Reopen: the last header is found again and reads the same.
        drop(db);
        db = open_db(&path, &options);
        assert_eq!(db.committed().offset, offset);
        check_snapshot(&db.snapshot(), &model, &ids, &local_ids, &batch.probe);

        // An older header, or all of them.
        let file = open_file(&path);
        let chosen: Vec<&(u64, DbModel)> = if batch.check_all {
            history.iter().collect()
        } else {
            vec![&history[batch.check_old.index(history.len())]]
        };
        for (offset, old) in chosen {
            let snap = Snapshot::open_at(file.clone(), *offset).unwrap();
            check_snapshot(&snap, old, &ids, &local_ids, &batch.probe);
        }
    }

    drop(db);
    let file = open_file(&path);
    let latest = Snapshot::open_latest(file.clone(), couchfile::OpenMode::Normal).unwrap();
    assert_eq!(latest.offset(), history.last().unwrap().0);
    let probe = batches.last().map(|b| b.probe.clone()).unwrap_or(Probe {
        seqs: vec![],
        since: 0,
        count_ranges: vec![(0, u64::MAX)],
        id_range: (BoundSpec::Unbounded, BoundSpec::Unbounded),
    });
    for (offset, old) in &history {
        let snap = Snapshot::open_at(file.clone(), *offset).unwrap();
        check_snapshot(&snap, old, &ids, &local_ids, &probe);
    }
}

fn local_id() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"_local/vbstate".to_vec()),
        Just(b"_local/collections/manifest".to_vec()),
        prop::collection::vec(any::<u8>(), 1..40),
    ]
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn documents_match_model(
        small_nodes in any::<bool>(),
        threshold in 200usize..1279,
        ids in prop::collection::vec(doc_id(), 1..200),
        local_ids in prop::collection::vec(local_id(), 1..8),
        batches in prop::collection::vec(doc_batch(), 1..8),
    ) {
        let nodes = if small_nodes {
            NodeConfig { leaf_threshold: threshold, interior_threshold: threshold }
        } else {
            NodeConfig::default()
        };
        run_doc_case(nodes, ids, local_ids, batches);
    }
}

/// A fixed scenario sure to hold what the random one only likely holds: ids
/// of 1 and 4095 bytes, bodies of 0 bytes and of 300 to 400 KiB (plain,
/// compressed, pre-compressed), deletes with and without body, a
/// re-creation, an explicit sequence number, local docs set and removed.
#[test]
fn documents_extremes() {
    let long = rand_bytes(4095, 7);
    let ids: Vec<Vec<u8>> = [b"a".to_vec(), long.clone(), b"doc".to_vec(), b"z".to_vec()]
        .into_iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let local_ids: Vec<Vec<u8>> = vec![b"_local/other".to_vec(), b"_local/vbstate".to_vec()];
    let at = |list: &[Vec<u8>], id: &[u8]| Pick(list.iter().position(|x| x == id).unwrap());
    let body = |len, seed, fill| BodyGen { len, seed, fill };
    let op = |id: &[u8], kind, body, content_meta| DocOp {
        id: at(&ids, id),
        kind,
        body,
        stored: false,
        content_meta,
        rev_seq: 1,
        rev_meta: vec![1; 18],
        seq_gap: None,
    };
    let probe = Probe {
        seqs: (0..20).collect(),
        since: 2,
        count_ranges: vec![(0, 100), (3, 5)],
        id_range: (BoundSpec::Unbounded, BoundSpec::Unbounded),
    };
    let batch = |calls, check_all| DocBatch {
        abandoned: None,
        calls,
        check_old: Pick(0),
        check_all,
        probe: probe.clone(),
    };
    let local = |id: &[u8], value| LocalOp {
        id: at(&local_ids, id),
        value,
    };
    let batches = vec![
        batch(
            vec![SaveCall {
                docs: vec![
                    op(b"a", Kind::Upsert, body(0, 1, Fill::Zero), 0),
                    op(&long, Kind::Upsert, body(400 * 1024, 2, Fill::Random), 0x80),
                    op(b"doc", Kind::Upsert, body(400 * 1024, 3, Fill::Text), 0x80),
                    DocOp {
                        stored: true,
                        ..op(b"z", Kind::Upsert, body(300 * 1024, 4, Fill::Random), 0)
                    },
                ],
                locals: vec![local(b"_local/vbstate", Some(body(100, 5, Fill::Text)))],
            }],
            false,
        ),
        batch(
            vec![SaveCall {
                docs: vec![
                    op(&long, Kind::DeleteWithBody, body(10, 6, Fill::Text), 0x80),
                    op(b"doc", Kind::DeleteNoBody, body(0, 0, Fill::Zero), 0),
                    DocOp {
                        stored: true,
                        seq_gap: Some(9),
                        ..op(b"a", Kind::Upsert, body(350 * 1024, 9, Fill::Text), 0x80)
                    },
                ],
                locals: vec![local(b"_local/other", Some(body(3000, 7, Fill::Random)))],
            }],
            true,
        ),
        batch(
            vec![SaveCall {
                docs: vec![op(b"doc", Kind::Upsert, body(5, 8, Fill::Text), 0x83)],
                locals: vec![local(b"_local/vbstate", None)],
            }],
            true,
        ),
    ];
    run_doc_case(NodeConfig::default(), ids, local_ids, batches);
}

/// Invalid batches are errors and leave the tree, or the pending state of a
/// [`Db`], as they were; a header offset that is no header is an error.
#[test]
fn invalid_batches_are_errors() {
    let tree = BTree::new(CountOps, NodeConfig::default());
    let mut w = mem_writer();
    let v = b"v".to_vec();
    let insert = |key: &'static [u8]| Action {
        key,
        op: ActionOp::Insert(&v),
    };
    let root = tree
        .modify(&mut w, None, &[insert(b"a"), insert(b"c")], &mut |_, _| {
            Ok(())
        })
        .unwrap();
    w.flush().unwrap();
    let file = w.file().clone();
    for bad in [
        vec![insert(b"b"), insert(b"a")],
        vec![insert(b"b"), insert(b"b")],
    ] {
        let r = tree.modify(&mut w, root.as_ref(), &bad, &mut |_, _| Ok(()));
        assert!(
            matches!(r, Err(btree::Error::UnsortedOrDuplicate { .. })),
            "{r:?}"
        );
    }
    let r = tree.lookup(&file, root.as_ref(), &[b"c", b"a"]);
    assert!(
        matches!(r, Err(btree::Error::UnsortedOrDuplicate { .. })),
        "{r:?}"
    );
    let mut b = tree.builder();
    b.push(&mut w, b"b", b"1").unwrap();
    assert!(b.push(&mut w, b"b", b"2").is_err());
    assert!(b.push(&mut w, b"a", b"3").is_err());
    w.flush().unwrap();
    assert_eq!(
        fold_all(
            &tree,
            &file,
            root.as_ref(),
            Bound::Unbounded,
            Bound::Unbounded,
            None
        ),
        vec![(b"a".to_vec(), v.clone()), (b"c".to_vec(), v.clone())]
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("0.couch.1");
    let options = DbOptions::default();
    let mut db = open_db(&path, &options);
    let doc = |id: &[u8], seq: Option<u64>| DocUpdate {
        id: id.to_vec(),
        seq,
        rev_seq: 1,
        rev_seq_above_stored: false,
        rev_meta: vec![],
        deleted: false,
        content_meta: 0,
        body: Body::Plain(b"{}".to_vec()),
    };
    let local = |id: &[u8]| LocalUpdate {
        id: id.to_vec(),
        value: Some(b"{}".to_vec()),
    };
    assert_eq!(
        db.save(&[doc(b"x", None)], &[local(b"_local/a")]).unwrap(),
        vec![1]
    );
    let before = db.pending().clone();
    for (docs, locals) in [
        (vec![doc(b"y", None), doc(b"y", None)], vec![]),
        (vec![doc(b"y", Some(0))], vec![]),
        (vec![doc(b"y", Some(MAX_U48 + 1))], vec![]),
        (vec![doc(b"y", Some(7)), doc(b"z", Some(7))], vec![]),
        (
            vec![doc(b"y", None)],
            vec![local(b"_local/b"), local(b"_local/b")],
        ),
    ] {
        assert!(db.save(&docs, &locals).is_err(), "{docs:?} {locals:?}");
        assert_eq!(
            db.pending(),
            &before,
            "pending state changed by a failed save"
        );
    }
    // A repeated id is reported with the later one's index in the batch,
    // before anything is written; repeated seqs are an invalid argument.
    let written = db.writer_mut().position();
    let r = db.save(&[doc(b"y", None), doc(b"z", None), doc(b"y", None)], &[]);
    assert!(
        matches!(&r, Err(btree::Error::UnsortedOrDuplicate { key, index: 2 }) if key == "y"),
        "{r:?}"
    );
    let r = db.save(
        &[doc(b"y", None)],
        &[local(b"_local/b"), local(b"_local/b")],
    );
    assert!(
        matches!(&r, Err(btree::Error::UnsortedOrDuplicate { key, index: 1 }) if key == "_local/b"),
        "{r:?}"
    );
    assert_eq!(db.writer_mut().position(), written, "a refused batch wrote");
    let r = db.save(&[doc(b"y", Some(7)), doc(b"z", Some(7))], &[]);
    assert!(matches!(r, Err(btree::Error::InvalidArgument(_))), "{r:?}");
    assert_eq!(db.pending(), &before);
    let offset = db.commit(1).unwrap();
    let snap = db.snapshot();
    assert_eq!(snap.header().update_seq, 1);
    assert_eq!(snap.count_changes(0, 100).unwrap(), 1);
    assert!(snap.doc_info(b"y").unwrap().is_none());
    drop(db);
    let file = open_file(&path);
    assert!(Snapshot::open_at(file.clone(), offset).is_ok());
    assert!(Snapshot::open_at(file.clone(), offset + 1).is_err());
    assert!(Snapshot::open_at(file.clone(), 4096 * 1000).is_err());
}

/// Explicit sequence numbers: gaps, a document re-saved with its own seq,
/// and a seq below the update seq (which stays the maximum).
#[test]
fn explicit_sequence_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("0.couch.1");
    let mut db = open_db(&path, &DbOptions::default());
    let doc = |id: &[u8], seq: Option<u64>, rev_seq| DocUpdate {
        id: id.to_vec(),
        seq,
        rev_seq,
        rev_seq_above_stored: false,
        rev_meta: vec![],
        deleted: false,
        content_meta: 0,
        body: Body::Plain(id.repeat(rev_seq as usize)),
    };
    assert_eq!(
        db.save(&[doc(b"a", None, 1), doc(b"b", Some(10), 1)], &[])
            .unwrap(),
        vec![1, 10]
    );
    db.commit(1).unwrap();
    assert_eq!(
        db.save(&[doc(b"a", Some(1), 2), doc(b"c", Some(5), 1)], &[])
            .unwrap(),
        vec![1, 5]
    );
    assert_eq!(db.save(&[doc(b"d", None, 1)], &[]).unwrap(), vec![11]);
    db.commit(2).unwrap();
    drop(db);
    let db = open_db(&path, &DbOptions::default());
    let snap = db.snapshot();
    assert_eq!(snap.header().update_seq, 11);
    let mut changes = Vec::new();
    snap.changes_since(0, ChangesFilter::All, &mut |info| {
        changes.push((info.db_seq, info.id, info.rev_seq));
        Ok(ControlFlow::Continue(()))
    })
    .unwrap();
    assert_eq!(
        changes,
        vec![
            (1, b"a".to_vec(), 2),
            (5, b"c".to_vec(), 1),
            (10, b"b".to_vec(), 1),
            (11, b"d".to_vec(), 1)
        ]
    );
    let a = snap.doc_info_by_seq(1).unwrap().unwrap();
    assert_eq!(snap.read_body(&a).unwrap().unwrap(), b"aa");
    assert_eq!(snap.count_changes(0, 100).unwrap(), 4);
    assert_eq!(snap.count_changes(2, 10).unwrap(), 2);
}

#[test]
fn a_revision_above_the_stored_one_is_read_by_the_save() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("0.couch.1");
    let mut db = open_db(&path, &DbOptions::default());
    let doc = |id: Vec<u8>, rev_seq, above: bool| DocUpdate {
        id,
        seq: None,
        rev_seq,
        rev_seq_above_stored: above,
        rev_meta: vec![0; 16],
        deleted: false,
        content_meta: 0,
        body: Body::Plain(b"body".to_vec()),
    };
    let key = |i: usize| format!("key{i:05}").into_bytes();
    // Enough documents for the by-id modify to run on two threads.
    let n = btree::PARALLEL_MODIFY_MIN_ACTIONS * 4;
    let first: Vec<DocUpdate> = (0..n).map(|i| doc(key(i), i as u64 + 1, false)).collect();
    db.save(&first, &[]).unwrap();
    db.commit(1).unwrap();
    // Every other key of the first batch, above its stored revision; keys
    // the file does not hold start from 0; the sum stops at 2^48 - 1.
    let mut second: Vec<DocUpdate> = (0..n).step_by(2).map(|i| doc(key(i), 3, true)).collect();
    second.push(doc(b"new".to_vec(), 7, true));
    second.push(doc(key(1), MAX_U48, true));
    second.push(doc(key(3), 9, false));
    let saved = db.save_docs(&second, &[]).unwrap();
    for (d, s) in second.iter().zip(&saved) {
        let stored = if d.id == b"new" {
            None
        } else {
            let i: usize = std::str::from_utf8(&d.id[3..]).unwrap().parse().unwrap();
            Some(i as u64 + 1)
        };
        assert_eq!(s.stored_rev_seq, stored, "{:?}", d.id);
        let expected = if d.rev_seq_above_stored {
            stored.unwrap_or(0).saturating_add(d.rev_seq).min(MAX_U48)
        } else {
            d.rev_seq
        };
        assert_eq!(s.rev_seq, expected, "{:?}", d.id);
    }
    db.commit(2).unwrap();
    // Both trees hold the revisions returned.
    let snap = db.snapshot();
    for (d, s) in second.iter().zip(&saved) {
        let by_id = snap.doc_info(&d.id).unwrap().unwrap();
        assert_eq!((by_id.rev_seq, by_id.db_seq), (s.rev_seq, s.seq));
        let by_seq = snap.doc_info_by_seq(s.seq).unwrap().unwrap();
        assert_eq!(by_seq.rev_seq, s.rev_seq);
    }
}
