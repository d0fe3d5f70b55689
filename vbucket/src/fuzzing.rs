//! Entry points for the fuzz targets (`fuzz/` at the repository root): each
//! feeds arbitrary bytes to one decoder and must never panic, whatever the
//! bytes. Also exercised by this crate's tests on random inputs.

use crate::{FlusherConfig, ItemMeta, Store, StoreConfig, VbState};
use couchfile::FaultyDirectory;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

/// Parses `data` as a `_local/vbstate` document; what parses must survive
/// a round trip through its JSON.
pub fn parse_vbstate(data: &[u8]) {
    if let Ok(state) = VbState::from_json(data) {
        assert_eq!(
            VbState::from_json(&state.to_json()).as_ref(),
            Ok(&state),
            "vbstate does not round-trip"
        );
    }
}

/// Opens a store whose only file, `0.couch.1`, holds `data`, and if that
/// works reads every change, a few keys, the vbstate, and writes one
/// mutation and flushes it.
pub fn open_vbucket(data: &[u8]) {
    let dir = Arc::new(FaultyDirectory::from_files([(
        "0.couch.1".to_string(),
        data.to_vec(),
    )]));
    // A commit that keeps failing on a mangled file gives up quickly.
    let config = StoreConfig {
        flusher: FlusherConfig {
            close_timeout: Duration::from_millis(50),
            retry_backoff_max: Duration::from_millis(10),
            ..FlusherConfig::default()
        },
        ..StoreConfig::default()
    };
    let Ok(store) = Store::open_in(dir, config) else {
        return;
    };
    if let Ok(vb) = store.vbucket(0) {
        let mut keys = Vec::new();
        let _ = vb.changes_since(0, &mut |doc| {
            keys.push(doc.key);
            ControlFlow::Continue(())
        });
        for key in keys.iter().take(16) {
            let _ = vb.get(key);
        }
        let _ = vb.snapshot().vbstate();
        let _ = vb.snapshot().previous();
        if let Ok(m) = vb.set(b"fuzz", b"value", ItemMeta::default()) {
            let _ = vb.wait_persisted(m.seqno, Duration::from_millis(200));
        }
    }
    let _ = store.close();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_garbage() {
        for data in [
            &b""[..],
            b"{",
            b"{\"state\":\"active\",\"failover_table\":[{\"id\":1}]}",
            &[0u8; 4097],
            &[1u8; 5000],
        ] {
            parse_vbstate(data);
            open_vbucket(data);
        }
    }

    #[test]
    fn open_vbucket_ends_on_forged_trees() {
        use btree::fuzzing::{base_image, forge, Forgery, TreeKind};
        let base = base_image().unwrap();
        for tree in TreeKind::ALL {
            for forgery in Forgery::ALL {
                open_vbucket(&forge(base.clone(), tree, forgery).unwrap().image);
            }
        }
    }
}
