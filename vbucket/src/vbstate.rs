//! The `_local/vbstate` document: the vbucket's state as kv-engine keeps it.

use serde_json::{json, Map, Value};

/// Id of the local document holding the vbucket state.
pub const VBSTATE_ID: &[u8] = b"_local/vbstate";

/// The vbucket's role in the cluster (kv-engine's `vbucket_state_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VbucketState {
    /// Serves reads and writes.
    #[default]
    Active,
    /// Receives a copy from an active vbucket.
    Replica,
    /// Being taken over.
    Pending,
    /// Not in use.
    Dead,
}

impl VbucketState {
    /// kv-engine's name for the state.
    pub fn name(self) -> &'static str {
        match self {
            VbucketState::Active => "active",
            VbucketState::Replica => "replica",
            VbucketState::Pending => "pending",
            VbucketState::Dead => "dead",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "active" => VbucketState::Active,
            "replica" => VbucketState::Replica,
            "pending" => VbucketState::Pending,
            "dead" => VbucketState::Dead,
            _ => return None,
        })
    }
}

/// One failover-table entry: a vbucket uuid and the seqno it started at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailoverEntry {
    /// The vbucket uuid of this history branch.
    pub id: u64,
    /// The seqno the branch started at.
    pub seq: u64,
}

/// The content of `_local/vbstate` (kv-engine's vbstate version 4, without
/// the collections and durability fields this store does not implement).
/// Numbers are written as JSON strings, as kv-engine does; both strings and
/// numbers are accepted when reading, and missing fields default, so the
/// three-field documents of old files read fine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VbState {
    /// The vbucket's state.
    pub state: VbucketState,
    /// Checkpoint id of the last flush.
    pub checkpoint_id: u64,
    /// Highest seqno of a deletion persisted.
    pub max_deleted_seqno: u64,
    /// Highest seqno persisted (kv-engine's `snap_end` and
    /// `max_visible_seqno`, also written as `persisted_seqno`).
    pub persisted_seqno: u64,
    /// Highest CAS persisted.
    pub max_cas: u64,
    /// The failover log, newest first.
    pub failover_table: Vec<FailoverEntry>,
}

impl VbState {
    /// The state of a new vbucket: active, with a fresh random uuid.
    pub fn new_vbucket() -> Self {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded from the OS: a good enough uuid source.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        Self {
            state: VbucketState::Active,
            checkpoint_id: 0,
            max_deleted_seqno: 0,
            persisted_seqno: 0,
            max_cas: 0,
            // kv-engine keeps uuids within 48 bits for JSON consumers.
            failover_table: vec![FailoverEntry {
                id: h.finish() & 0xffff_ffff_ffff,
                seq: 0,
            }],
        }
    }

    /// The JSON document.
    pub fn to_json(&self) -> Vec<u8> {
        let s = |v: u64| Value::String(v.to_string());
        let failover: Vec<Value> = self
            .failover_table
            .iter()
            .map(|e| json!({"id": e.id, "seq": e.seq}))
            .collect();
        let doc = json!({
            "state": self.state.name(),
            "checkpoint_id": s(self.checkpoint_id),
            "max_deleted_seqno": s(self.max_deleted_seqno),
            "failover_table": failover,
            "snap_start": s(self.persisted_seqno),
            "snap_end": s(self.persisted_seqno),
            "max_cas": s(self.max_cas),
            "hlc_epoch": s(0),
            "might_contain_xattrs": false,
            "namespaces_supported": false,
            "high_completed_seqno": s(0),
            "high_prepared_seqno": s(0),
            "max_visible_seqno": s(self.persisted_seqno),
            "persisted_seqno": s(self.persisted_seqno),
            "version": 4,
        });
        doc.to_string().into_bytes()
    }

    /// Parses the JSON document.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let Value::Object(map) = value else {
            return Err("not a JSON object".into());
        };
        let number = |name: &str| -> Result<u64, String> { number_field(&map, name) };
        let state = match map.get("state") {
            None => VbucketState::Active,
            Some(Value::String(s)) => {
                VbucketState::from_name(s).ok_or_else(|| format!("unknown state {s:?}"))?
            }
            Some(other) => return Err(format!("state is {other}, not a string")),
        };
        let mut failover_table = Vec::new();
        match map.get("failover_table") {
            None => {}
            Some(Value::Array(entries)) => {
                for entry in entries {
                    let Value::Object(e) = entry else {
                        return Err("a failover entry is not an object".into());
                    };
                    failover_table.push(FailoverEntry {
                        id: number_field(e, "id")?,
                        seq: number_field(e, "seq")?,
                    });
                }
            }
            Some(_) => return Err("failover_table is not an array".into()),
        }
        let persisted_seqno = number("persisted_seqno")?.max(number("snap_end")?);
        Ok(Self {
            state,
            checkpoint_id: number("checkpoint_id")?,
            max_deleted_seqno: number("max_deleted_seqno")?,
            persisted_seqno,
            max_cas: number("max_cas")?,
            failover_table,
        })
    }
}

/// A number written as a JSON number or a decimal string; 0 when missing.
fn number_field(map: &Map<String, Value>, name: &str) -> Result<u64, String> {
    match map.get(name) {
        None => Ok(0),
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| format!("{name} is not an unsigned integer")),
        Some(Value::String(s)) => s
            .parse()
            .map_err(|_| format!("{name} is {s:?}, not an unsigned integer")),
        Some(other) => Err(format!("{name} is {other}, not a number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let mut s = VbState::new_vbucket();
        s.state = VbucketState::Replica;
        s.checkpoint_id = 3;
        s.max_deleted_seqno = 12;
        s.persisted_seqno = 99;
        s.max_cas = 1 << 60;
        assert_eq!(VbState::from_json(&s.to_json()), Ok(s));
    }

    #[test]
    fn reads_the_old_three_field_document() {
        let s = VbState::from_json(
            br#"{"state": "active","checkpoint_id": "3","max_deleted_seqno": "1200"}"#,
        )
        .unwrap();
        assert_eq!(s.state, VbucketState::Active);
        assert_eq!((s.checkpoint_id, s.max_deleted_seqno), (3, 1200));
        assert!(s.failover_table.is_empty());
    }

    #[test]
    fn rejects_garbage() {
        assert!(VbState::from_json(b"[1]").is_err());
        assert!(VbState::from_json(br#"{"state":"sleepy"}"#).is_err());
        assert!(VbState::from_json(br#"{"max_cas":"-1"}"#).is_err());
        assert!(VbState::from_json(b"\xff").is_err());
    }
}
