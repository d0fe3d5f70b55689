//! What the compactor's integration tests share.

use btree::{Body, DocUpdate};

/// Round `round` of the tests' source files: the same 2,000 ids (in a
/// scattered order) written again, revision `round + 1`, with compressed
/// bodies of 300 to 399 bytes.
pub fn overwrite_round(round: u64) -> Vec<DocUpdate> {
    (0..2_000u64)
        .map(|k| DocUpdate {
            id: format!("key{:08}", (k * 7919) % 2_000).into_bytes(),
            seq: None,
            rev_seq: round + 1,
            rev_seq_above_stored: false,
            rev_meta: vec![0; 16],
            deleted: false,
            content_meta: 0x80,
            body: Body::Plain(vec![(k % 251) as u8; 300 + (k % 100) as usize]),
        })
        .collect()
}
