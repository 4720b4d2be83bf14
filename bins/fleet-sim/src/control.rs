//! The control API: read counters and change behaviours while the fleet runs.

use std::sync::Arc;

use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::server::{read_request, respond};
use crate::{Behavior, SimFleet};

pub(crate) async fn serve(fleet: Arc<SimFleet>, listener: TcpListener, cancel: CancellationToken) {
    loop {
        let (mut stream, _) = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
        };
        let fleet = fleet.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            loop {
                let req = tokio::select! {
                    () = cancel.cancelled() => return,
                    r = read_request(&mut stream, &mut buf) => r,
                };
                let Some(req) = req else { return };
                let (code, body) = route(&fleet, &req.method, &req.path, &req.body);
                if !respond(
                    &mut stream,
                    code,
                    "application/json",
                    body.to_string().as_bytes(),
                    &[],
                )
                .await
                {
                    return;
                }
            }
        });
    }
}

fn route(fleet: &SimFleet, method: &str, path: &str, body: &[u8]) -> (u16, serde_json::Value) {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        ("GET", ["servers"]) => {
            let servers: Vec<_> = fleet
                .servers()
                .iter()
                .map(|s| json!({"name": s.name(), "behavior": s.behavior().as_str(), "stats": s.stats()}))
                .collect();
            (
                200,
                json!({"servers": servers, "resident_bytes": crate::resident_bytes()}),
            )
        }
        ("GET", ["manifest"]) => (
            200,
            serde_json::to_value(fleet.manifest()).unwrap_or_default(),
        ),
        ("PUT", ["servers", name, "behavior"]) => {
            let text = String::from_utf8_lossy(body);
            match text.trim().trim_matches('"').parse::<Behavior>() {
                Ok(b) if fleet.set_behavior(name, b) => {
                    (200, json!({"name": name, "behavior": b.as_str()}))
                }
                Ok(_) => (404, json!({"error": format!("no server named {name}")})),
                Err(e) => (400, json!({"error": e.to_string()})),
            }
        }
        _ => (404, json!({"error": "not found"})),
    }
}
