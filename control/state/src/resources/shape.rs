//! A replicated database's shape (`DbShape`): roles change only by compare-and-set on the
//! generation (the leader's failover controller), the primary's keeper renews its lease
//! and reports what its sync confirmed, and every keeper reports its server's position.

use serde::{Deserialize, Serialize};

use super::{DbMember, DbShape, SHAPES};
use crate::area::Cx;
use crate::{ApplyResult, ClusterState, Response, StateError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "shape_op", rename_all = "snake_case")]
pub enum ShapeCommand {
    /// New roles, if the shape is still at `expect_generation` (0: it has none yet).
    SetShape {
        app: String,
        expect_generation: u64,
        primary: u64,
        #[serde(default)]
        sync: u64,
        #[serde(default)]
        asyncs: Vec<u64>,
    },
    /// The primary on `host` renews its lease for `generation`, with the WAL position its
    /// sync confirmed and whether the sync has caught up (refused if it is not the primary
    /// of that generation: a deposed primary learns it here).
    Renew {
        app: String,
        generation: u64,
        host: u64,
        confirmed_lsn: u64,
        sync_ready: bool,
    },
    /// A keeper's report of its server.
    Report {
        app: String,
        host: u64,
        member: DbMember,
    },
}

pub(super) fn apply(s: &mut ClusterState, cmd: ShapeCommand, cx: &mut Cx) -> ApplyResult {
    match cmd {
        ShapeCommand::SetShape {
            app,
            expect_generation,
            primary,
            sync,
            asyncs,
        } => {
            let current = s.resources.shapes.get(&app).cloned().unwrap_or_default();
            if current.generation != expect_generation {
                return Err(StateError::Conflict(format!(
                    "the shape of {app} is at generation {}, not {expect_generation}",
                    current.generation
                )));
            }
            let mut all = vec![primary, sync];
            all.extend(&asyncs);
            all.retain(|h| *h != 0);
            let mut unique = all.clone();
            unique.sort_unstable();
            unique.dedup();
            if primary == 0 || unique.len() != all.len() {
                return Err(StateError::Invalid(
                    "a shape names a primary, and each server once".into(),
                ));
            }
            let same_sync = current.sync == sync && current.primary == primary;
            let shape = DbShape {
                app: app.clone(),
                generation: current.generation + 1,
                primary,
                sync,
                asyncs,
                sync_ready: same_sync && current.sync_ready,
                confirmed_lsn: current.confirmed_lsn,
                lease_renewals: current.lease_renewals,
                members: current.members,
            };
            s.resources.shapes.insert(app.clone(), shape.clone());
            cx.touch(SHAPES, &app);
            Ok(Response::Shape { shape })
        }
        ShapeCommand::Renew {
            app,
            generation,
            host,
            confirmed_lsn,
            sync_ready,
        } => {
            let shape = s
                .resources
                .shapes
                .get_mut(&app)
                .ok_or_else(|| StateError::NotFound(format!("the shape of {app}")))?;
            if shape.generation != generation || shape.primary != host {
                return Err(StateError::Conflict(format!(
                    "host {host} is not the primary of {app} at generation {generation} (the shape is at {}, primary {})",
                    shape.generation, shape.primary
                )));
            }
            shape.lease_renewals += 1;
            shape.confirmed_lsn = shape.confirmed_lsn.max(confirmed_lsn);
            shape.sync_ready |= sync_ready && shape.sync != 0;
            let shape = shape.clone();
            cx.touch(SHAPES, &app);
            Ok(Response::Shape { shape })
        }
        ShapeCommand::Report { app, host, member } => {
            let shape = s
                .resources
                .shapes
                .entry(app.clone())
                .or_insert_with(|| DbShape {
                    app: app.clone(),
                    ..DbShape::default()
                });
            shape.members.insert(host, member);
            let shape = shape.clone();
            cx.touch(SHAPES, &app);
            Ok(Response::Shape { shape })
        }
    }
}
