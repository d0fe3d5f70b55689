//! `flusher`: the persistence pipeline between front-end writes and storage,
//! generic over a flush target. It is meant to own the per-vbucket dirty queues
//! (fed through crossbeam channels), dedup a key's mutations within a batch, cut
//! batches by count and bytes, call the target's commit, wake whoever waits for
//! a seqno to be persisted, and apply backpressure when a queue is over its
//! memory bound. It is not a storage format and knows nothing about files,
//! B-trees or compaction: the `vbucket` crate supplies the flush target. This
//! crate is a placeholder: it is filled in by later work and exports nothing
//! yet.
