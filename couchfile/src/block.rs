//! The block layer: every 4096-byte block starts with a block-type byte that
//! the logical byte stream above does not see.

/// Size of a block (`COUCH_BLOCK_SIZE`).
pub const BLOCK_SIZE: u64 = 4096;

/// The block-type byte at the start of every block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BlockType {
    /// Data chunks (also a header before its commit completes).
    Data = 0x00,
    /// A committed header starts in this block.
    Header = 0x01,
    /// The metadata header of an encrypted file.
    Meta = 0x02,
}

/// Physical bytes occupied by `logical_len` logical bytes written starting at
/// physical position `pos` (a prefix byte is inserted at every block start).
pub fn physical_len(pos: u64, logical_len: u64) -> u64 {
    if logical_len == 0 {
        return 0;
    }
    // Prefix bytes are inserted at each block boundary in [pos, end), where
    // `end` grows with them; count them block by block arithmetically.
    let in_block = pos % BLOCK_SIZE;
    if in_block == 0 {
        // Starts on a boundary: 1 prefix, then 4095 logical bytes per block.
        let blocks = logical_len.div_ceil(BLOCK_SIZE - 1);
        return logical_len + blocks;
    }
    let room = BLOCK_SIZE - in_block;
    if logical_len <= room {
        return logical_len;
    }
    let rest = logical_len - room;
    logical_len + rest.div_ceil(BLOCK_SIZE - 1)
}

/// Appends to `out` the logical bytes of `physical`, which was read starting
/// at physical position `pos`, dropping the prefix bytes.
pub fn strip_prefixes(pos: u64, physical: &[u8], out: &mut Vec<u8>) {
    let mut p = pos;
    let mut rest = physical;
    while !rest.is_empty() {
        if p.is_multiple_of(BLOCK_SIZE) {
            rest = &rest[1..];
            p += 1;
            continue;
        }
        let room = (BLOCK_SIZE - p % BLOCK_SIZE) as usize;
        let take = room.min(rest.len());
        out.extend_from_slice(&rest[..take]);
        rest = &rest[take..];
        p += take as u64;
    }
}

/// The first `N` logical bytes of `physical`, which was read starting at
/// physical position `pos`; `None` when it holds fewer.
pub fn logical_head<const N: usize>(pos: u64, physical: &[u8]) -> Option<[u8; N]> {
    let in_block = pos % BLOCK_SIZE;
    if in_block != 0 && in_block + N as u64 <= BLOCK_SIZE {
        // Within one block, after its prefix byte: the bytes as they are.
        return physical.first_chunk::<N>().copied();
    }
    let mut out = [0u8; N];
    let mut n = 0;
    for (p, &byte) in (pos..).zip(physical) {
        if n == N {
            break;
        }
        if p % BLOCK_SIZE != 0 {
            out[n] = byte;
            n += 1;
        }
    }
    (n == N).then_some(out)
}

/// Appends to `out` the physical bytes for writing the logical bytes `data`
/// at physical position `pos`, inserting `block_type` at every block start.
/// Returns the position after them.
pub fn add_prefixes(pos: u64, data: &[u8], block_type: BlockType, out: &mut Vec<u8>) -> u64 {
    let mut p = pos;
    let mut rest = data;
    while !rest.is_empty() {
        if p.is_multiple_of(BLOCK_SIZE) {
            out.push(block_type as u8);
            p += 1;
        }
        let room = (BLOCK_SIZE - p % BLOCK_SIZE) as usize;
        let take = room.min(rest.len());
        out.extend_from_slice(&rest[..take]);
        rest = &rest[take..];
        p += take as u64;
    }
    p
}

/// The first block boundary at or after `pos`.
pub fn align_up(pos: u64) -> u64 {
    pos.div_ceil(BLOCK_SIZE) * BLOCK_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prefixes_at_boundaries() {
        let mut out = Vec::new();
        let end = add_prefixes(0, &[7u8; 4095], BlockType::Header, &mut out);
        assert_eq!(end, 4096);
        assert_eq!(out[0], 1);
        assert_eq!(out.len(), 4096);
        out.clear();
        let end = add_prefixes(4094, &[9u8; 4], BlockType::Data, &mut out);
        assert_eq!(out, vec![9, 9, 0, 9, 9]);
        assert_eq!(end, 4099);
        assert_eq!(physical_len(4094, 4), 5);
        assert_eq!(physical_len(4096, 1), 2);
        assert_eq!(physical_len(4096, 0), 0);
        assert_eq!(align_up(0), 0);
        assert_eq!(align_up(1), 4096);
        assert_eq!(align_up(4096), 4096);
    }

    #[test]
    fn logical_head_around_block_boundaries() {
        for pos in (0..3 * BLOCK_SIZE).filter(|p| p % BLOCK_SIZE < 12 || p % BLOCK_SIZE > 4084) {
            for len in 0..20usize {
                let data: Vec<u8> = (1..=len as u8).collect();
                let mut phys = Vec::new();
                add_prefixes(pos, &data, BlockType::Data, &mut phys);
                let head = logical_head::<8>(pos, &phys);
                assert_eq!(
                    head.map(|h| h.to_vec()),
                    (len >= 8).then(|| data[..8].to_vec())
                );
            }
        }
    }

    proptest! {
        #[test]
        fn prefix_roundtrip(pos in 0u64..20_000, len in 0usize..20_000) {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
            let mut phys = Vec::new();
            let end = add_prefixes(pos, &data, BlockType::Data, &mut phys);
            prop_assert_eq!(end - pos, phys.len() as u64);
            prop_assert_eq!(physical_len(pos, len as u64), phys.len() as u64);
            let mut back = Vec::new();
            strip_prefixes(pos, &phys, &mut back);
            prop_assert_eq!(&back, &data);
            let head = logical_head::<8>(pos, &phys);
            prop_assert_eq!(head.is_some(), len >= 8);
            if let Some(head) = head {
                prop_assert_eq!(&head[..], &data[..8]);
            }
        }
    }
}
