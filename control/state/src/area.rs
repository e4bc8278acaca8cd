//! What every area of the state machine shares: the apply context, and record tables.
//!
//! The state is stored as one record per key (`<table prefix><key>` → JSON). An area names
//! its tables and the maps that hold them; loading, storing and enumerating records is
//! written once here, over those tables.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{ApplyResult, ClusterState, Event, EventKind};

/// One kind of stored record: its key prefix in storage (`"app/"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Table(pub &'static str);

/// An area of the state: its records, its commands and how it applies them.
///
/// Adding an area: a module with a struct implementing this trait (its records), a command
/// enum, then one line in the `areas!` list in `lib.rs`.
pub trait Area {
    type Command;

    /// Applies one command of this area. It sees the whole state (an area may check
    /// another's records, e.g. a route's app) but changes only what it marks in `cx`.
    /// On error nothing may have been changed.
    fn apply(state: &mut ClusterState, cmd: Self::Command, cx: &mut Cx) -> ApplyResult;

    /// This area's record tables, each with the map that holds it.
    fn tables(&self) -> Vec<(Table, &dyn Records)>;
    fn tables_mut(&mut self) -> Vec<(Table, &mut dyn Records)>;

    /// The events that describe this area's current data-plane state to a new watcher.
    fn data_plane_snapshot(&self, _out: &mut Vec<EventKind>) {}
}

/// What applying one command produces besides its result: the revision it would take, the
/// events it emits and the records it changed.
#[derive(Debug)]
pub struct Cx {
    pub revision: u64,
    pub(crate) events: Vec<Event>,
    pub(crate) dirty: Vec<(Table, String)>,
}

impl Cx {
    pub(crate) fn new(revision: u64) -> Self {
        Cx {
            revision,
            events: Vec::new(),
            dirty: Vec::new(),
        }
    }

    /// Marks a record as changed (written or deleted): storage rewrites exactly these.
    pub fn touch(&mut self, table: Table, key: &str) {
        self.dirty.push((table, key.to_string()));
    }

    pub fn emit(&mut self, kind: EventKind) {
        self.events.push(Event {
            revision: self.revision,
            kind,
        });
    }
}

/// A table's records as storage sees them: keys and JSON bytes.
pub trait Records {
    fn keys(&self) -> Vec<String>;
    fn encode(&self, key: &str) -> Option<Vec<u8>>;
    fn decode(&mut self, key: &str, bytes: &[u8]) -> Result<(), String>;
}

impl<T: Serialize + DeserializeOwned> Records for BTreeMap<String, T> {
    fn keys(&self) -> Vec<String> {
        BTreeMap::keys(self).cloned().collect()
    }

    fn encode(&self, key: &str) -> Option<Vec<u8>> {
        self.get(key).map(to_json)
    }

    fn decode(&mut self, key: &str, bytes: &[u8]) -> Result<(), String> {
        let value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        self.insert(key.to_string(), value);
        Ok(())
    }
}

pub(crate) fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("state records always serialize")
}
