//! A linearizability checker for single registers (Wing & Gong's search with memoization, as
//! in Lowe's and Porcupine's checkers).
//!
//! Each operation carries the times its client invoked it and learned its outcome. An
//! operation that definitely failed is dropped. An unknown write may have taken effect at any
//! point after its invocation, or never. An unknown read tells nothing and is dropped.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    Write(String),
    /// The value read (`None`: the register was unset).
    Read(Option<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    Failed,
    Unknown,
}

#[derive(Debug, Clone, Serialize)]
pub struct Op {
    pub client: usize,
    pub key: String,
    pub kind: OpKind,
    /// Nanoseconds since the history began.
    pub invoke: u64,
    pub complete: u64,
    pub outcome: Outcome,
}

struct Prepared {
    invoke: u64,
    /// `u64::MAX` for an unknown write: it may take effect arbitrarily late.
    ret: u64,
    write: Option<u32>,
    read: Option<Option<u32>>,
    optional: bool,
}

/// Checks one register's history, starting from `initial`.
pub fn check_register(initial: Option<&str>, ops: &[Op]) -> Result<(), String> {
    let mut values: HashMap<String, u32> = HashMap::new();
    let mut intern = |v: &str| {
        let n = values.len() as u32;
        *values.entry(v.to_string()).or_insert(n)
    };
    let initial = initial.map(&mut intern);
    let mut prepared = Vec::new();
    for op in ops {
        match (&op.kind, op.outcome) {
            (_, Outcome::Failed) | (OpKind::Read(_), Outcome::Unknown) => {}
            (OpKind::Write(v), outcome) => prepared.push(Prepared {
                invoke: op.invoke,
                ret: if outcome == Outcome::Unknown {
                    u64::MAX
                } else {
                    op.complete
                },
                write: Some(intern(v)),
                read: None,
                optional: outcome == Outcome::Unknown,
            }),
            (OpKind::Read(v), Outcome::Ok) => prepared.push(Prepared {
                invoke: op.invoke,
                ret: op.complete,
                write: None,
                read: Some(v.as_deref().map(&mut intern)),
                optional: false,
            }),
        }
    }
    if prepared.len() > 128 {
        return Err(format!(
            "{} operations on one register: more than this checker takes (128)",
            prepared.len()
        ));
    }
    let required: u128 = prepared
        .iter()
        .enumerate()
        .filter(|(_, p)| !p.optional)
        .fold(0, |m, (i, _)| m | 1 << i);
    let mut seen = HashSet::new();
    if search(&prepared, 0, initial, required, &mut seen) {
        Ok(())
    } else {
        Err(format!(
            "no linearization of {} operations on key {:?}",
            prepared.len(),
            ops.first().map(|o| o.key.as_str()).unwrap_or("")
        ))
    }
}

fn search(
    ops: &[Prepared],
    done: u128,
    value: Option<u32>,
    required: u128,
    seen: &mut HashSet<(u128, Option<u32>)>,
) -> bool {
    if done & required == required {
        return true;
    }
    if !seen.insert((done, value)) {
        return false;
    }
    // An op can go next only if it was invoked before every pending op's return.
    let horizon = ops
        .iter()
        .enumerate()
        .filter(|(i, _)| done & (1 << i) == 0)
        .map(|(_, p)| p.ret)
        .min()
        .unwrap_or(u64::MAX);
    for (i, p) in ops.iter().enumerate() {
        if done & (1 << i) != 0 || p.invoke > horizon {
            continue;
        }
        let next = match (p.write, p.read) {
            (Some(w), _) => Some(w),
            (None, Some(r)) if r == value => value,
            _ => continue,
        };
        if search(ops, done | 1 << i, next, required, seen) {
            return true;
        }
    }
    false
}

/// Checks every key of a mixed history; returns the first violation.
pub fn check_history(ops: &[Op]) -> Result<(), String> {
    let mut by_key: HashMap<&str, Vec<Op>> = HashMap::new();
    for op in ops {
        by_key.entry(op.key.as_str()).or_default().push(op.clone());
    }
    for (_, key_ops) in by_key {
        check_register(None, &key_ops)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: OpKind, invoke: u64, complete: u64, outcome: Outcome) -> Op {
        Op {
            client: 0,
            key: "k".into(),
            kind,
            invoke,
            complete,
            outcome,
        }
    }
    fn w(v: &str, a: u64, b: u64) -> Op {
        op(OpKind::Write(v.into()), a, b, Outcome::Ok)
    }
    fn r(v: Option<&str>, a: u64, b: u64) -> Op {
        op(OpKind::Read(v.map(String::from)), a, b, Outcome::Ok)
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = [
            w("1", 0, 1),
            r(Some("1"), 2, 3),
            w("2", 4, 5),
            r(Some("2"), 6, 7),
        ];
        assert!(check_register(None, &h).is_ok());
    }

    #[test]
    fn stale_read_after_completed_write_is_caught() {
        let h = [w("1", 0, 1), w("2", 2, 3), r(Some("1"), 4, 5)];
        assert!(check_register(None, &h).is_err());
    }

    #[test]
    fn concurrent_ops_may_order_either_way() {
        let h = [w("1", 0, 10), r(Some("1"), 1, 2), r(None, 3, 4)];
        // The read of None after a read of "1" cannot both hold.
        assert!(check_register(None, &h).is_err());
        let h = [w("1", 0, 10), r(None, 1, 2), r(Some("1"), 3, 4)];
        assert!(check_register(None, &h).is_ok());
    }

    #[test]
    fn unknown_write_may_or_may_not_apply() {
        let lost = op(OpKind::Write("x".into()), 0, 1, Outcome::Unknown);
        assert!(check_register(None, &[lost.clone(), r(None, 5, 6)]).is_ok());
        assert!(check_register(None, &[lost.clone(), r(Some("x"), 5, 6)]).is_ok());
        // ... but once seen, it cannot un-apply.
        assert!(check_register(None, &[lost, r(Some("x"), 5, 6), r(None, 7, 8)]).is_err());
    }

    #[test]
    fn failed_write_must_not_be_seen() {
        let failed = op(OpKind::Write("x".into()), 0, 1, Outcome::Failed);
        // A definitely-failed write is dropped, so its value has no writer at all.
        assert!(check_register(None, &[failed, r(Some("x"), 5, 6)]).is_err());
    }
}
