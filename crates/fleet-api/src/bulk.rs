//! Group-wide actions: membership of many servers at once, and checks of a group's servers
//! queued ahead of the cycle.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fleet_core::{GroupId, ServerFilter, ServerId, ServerStatus};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{ApiError, ApiJson, ApiPath, AppState};

/// The most ids in one membership request.
pub const MAX_IDS: usize = 1000;

/// Checks of a bulk request running at once.
const BULK_CONCURRENCY: usize = 16;

/// Servers to add to or remove from a group.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemberIds {
    /// 1 to 1,000 server ids.
    pub server_ids: Vec<Uuid>,
}

/// What a membership request did.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MembershipChange {
    pub group_id: Uuid,
    /// Ids in the request.
    pub requested: u64,
    /// Servers that joined (or left): members already, and ids of no server, are not counted.
    pub changed: u64,
    /// Members now.
    pub members: u64,
}

/// What a group check queued.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkCheck {
    pub group_id: Uuid,
    /// Checks queued; their results arrive on the event stream and in the history.
    pub queued: u64,
    /// Members not queued: inactive, already queued, or past `FLEET_BULK_CHECK_MAX`.
    pub skipped: u64,
}

fn ids(body: &MemberIds) -> Result<Vec<ServerId>, ApiError> {
    if body.server_ids.is_empty() || body.server_ids.len() > MAX_IDS {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!("server_ids: give 1 to {MAX_IDS} ids"),
        ));
    }
    Ok(body.server_ids.iter().map(|id| ServerId(*id)).collect())
}

async fn change(
    app: &AppState,
    group: Uuid,
    body: MemberIds,
    add: bool,
) -> Result<Response, ApiError> {
    let servers = ids(&body)?;
    let changed = if add {
        app.store.add_members(GroupId(group), &servers).await?
    } else {
        app.store.remove_members(GroupId(group), &servers).await?
    };
    let Some(changed) = changed else {
        return Err(ApiError::not_found("group"));
    };
    let members = app
        .store
        .get_group(GroupId(group))
        .await?
        .map_or(0, |g| g.members.len() as u64);
    Ok(axum::Json(MembershipChange {
        group_id: group,
        requested: servers.len() as u64,
        changed,
        members,
    })
    .into_response())
}

pub(crate) async fn add_members(
    State(app): State<AppState>,
    ApiPath(group): ApiPath<Uuid>,
    ApiJson(body): ApiJson<MemberIds>,
) -> Result<Response, ApiError> {
    change(&app, group, body, true).await
}

pub(crate) async fn remove_members(
    State(app): State<AppState>,
    ApiPath(group): ApiPath<Uuid>,
    ApiJson(body): ApiJson<MemberIds>,
) -> Result<Response, ApiError> {
    change(&app, group, body, false).await
}

/// The queue of checks asked for outside the cycle: bounded by `FLEET_BULK_CHECK_MAX`, each
/// server at most once in it, drained by one task with a few checks at a time.
#[derive(Debug)]
pub(crate) struct BulkQueue {
    max: usize,
    queued: Arc<Mutex<HashSet<ServerId>>>,
    tx: Mutex<Option<mpsc::Sender<ServerId>>>,
}

impl BulkQueue {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max,
            queued: Arc::default(),
            tx: Mutex::new(None),
        }
    }

    /// The sender, starting the draining task on first use (on the caller's runtime).
    fn sender(&self, app: &AppState) -> mpsc::Sender<ServerId> {
        let mut tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = tx.as_ref().filter(|t| !t.is_closed()) {
            return tx.clone();
        }
        let (sender, mut rx) = mpsc::channel::<ServerId>(self.max.max(1));
        let (app, queued) = (app.clone(), self.queued.clone());
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(BULK_CONCURRENCY));
            while let Some(id) = rx.recv().await {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    break;
                };
                let (app, queued) = (app.clone(), queued.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    if let Ok(Some(target)) = app.store.probe_target(id).await {
                        let target = fleet_core::TargetRef::single(target);
                        // Recorded and published as check-now is: the results reach the
                        // history and the event stream.
                        if let Err(e) = fleet_core::check_now(
                            &app.health,
                            &target,
                            app.probe_timeout,
                            &*app.clock,
                            &app.events,
                        )
                        .await
                        {
                            tracing::warn!(target: "fleet::api", server = %target.name(), error = %e, "queued check failed");
                        }
                    }
                    queued.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                });
            }
        });
        *tx = Some(sender.clone());
        sender
    }
}

pub(crate) async fn check_group(
    State(app): State<AppState>,
    ApiPath(group): ApiPath<Uuid>,
) -> Result<Response, ApiError> {
    let Some(g) = app.store.get_group(GroupId(group)).await? else {
        return Err(ApiError::not_found("group"));
    };
    // One listing for every member's status, not a lookup each.
    let members = app
        .store
        .list_servers(&ServerFilter {
            group: Some(GroupId(group)),
            ..ServerFilter::default()
        })
        .await?;
    let tx = app.bulk.sender(&app);
    let (mut queued, mut skipped) = (0u64, 0u64);
    for server in members {
        let id = server.id;
        let fresh = server.status != ServerStatus::Inactive
            && app
                .bulk
                .queued
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id);
        if !fresh {
            skipped += 1;
            continue;
        }
        match tx.try_send(id) {
            Ok(()) => queued += 1,
            Err(_) => {
                app.bulk
                    .queued
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                skipped += 1;
            }
        }
    }
    tracing::info!(target: "fleet::api", group = %g.name, queued, skipped, "group check queued");
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(BulkCheck {
            group_id: group,
            queued,
            skipped,
        }),
    )
        .into_response())
}
