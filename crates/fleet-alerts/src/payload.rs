//! What receivers get: an Alertmanager version 4 webhook payload (plus Fleet's `incident`
//! object), and the forms Slack, PagerDuty and email get, rendered from it.
//!
//! The notice is built once, when its outbox row is written, so every attempt sends the same
//! thing. Secrets (a routing key) are added only when sending.

use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::incidents::{Context, Snapshot};
use crate::model::{AlertKey, IncidentState, Member, NoticeKind};

/// The most alerts one notice lists; `truncatedAlerts` counts the rest.
pub const MAX_ALERTS: usize = 100;
/// Slack: characters in one block's text.
pub const SLACK_BLOCK_CHARS: usize = 2_900;
/// Slack: blocks in one message.
pub const SLACK_MAX_BLOCKS: usize = 50;

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// Alertmanager's "not ended" time.
const NOT_ENDED: &str = "0001-01-01T00:00:00Z";

/// Builds the notice for an incident's transition, for one channel.
pub(crate) fn notice(
    snap: &Snapshot,
    members: &[&Member],
    kind: NoticeKind,
    receiver: &str,
    ctx: &Context<'_>,
) -> Value {
    let inc = &snap.incident;
    let base = ctx.cfg.public_url.trim_end_matches('/');
    let status = if kind == NoticeKind::Resolved {
        "resolved"
    } else {
        "firing"
    };
    let mut labels_common = serde_json::Map::new();
    labels_common.insert("alertname".into(), json!(inc.rule.alertname()));
    labels_common.insert("severity".into(), json!(inc.severity.as_str()));
    if let Some(r) = &inc.region {
        labels_common.insert("region".into(), json!(r));
    }
    let mut group_labels = serde_json::Map::new();
    group_labels.insert("alertname".into(), json!(inc.rule.alertname()));
    if let Some(r) = &inc.region {
        group_labels.insert("region".into(), json!(r));
    }
    // Firing members first, then the recovered, at most MAX_ALERTS.
    let mut ordered: Vec<&&Member> = members.iter().collect();
    ordered.sort_by_key(|m| (m.resolved_at.is_some(), m.server_name.clone()));
    let mut alerts = Vec::new();
    for m in ordered.iter().take(MAX_ALERTS) {
        let info = ctx.servers.get(&m.server_id);
        let mut labels = labels_common.clone();
        labels.insert("server".into(), json!(m.server_name));
        labels.insert("server_id".into(), json!(m.server_id));
        if let Some(r) = &m.region {
            labels.insert("region".into(), json!(r));
        }
        if let Some((_, g)) = info.and_then(|i| i.groups.first()) {
            labels.insert("group".into(), json!(g));
        }
        if !m.detail.is_empty() {
            labels.insert("resource".into(), json!(m.detail));
        }
        let ended = match (m.resolved_at, status) {
            (Some(t), _) => rfc3339(t),
            (None, "resolved") => rfc3339(ctx.now),
            (None, _) => NOT_ENDED.into(),
        };
        let member_rule = if inc.rule == crate::model::Rule::RegionUnreachable {
            crate::model::Rule::ServerUnreachable
        } else {
            inc.rule
        };
        let key = AlertKey {
            rule: member_rule,
            server: Some(m.server_id),
            detail: m.detail.clone(),
        };
        alerts.push(json!({
            "status": if m.resolved_at.is_some() { "resolved" } else { status },
            "labels": labels,
            "annotations": {"summary": format!("{}: {}", m.server_name, inc.summary)},
            "startsAt": rfc3339(m.joined_at),
            "endsAt": ended,
            "generatorURL": format!("{base}/dashboard/servers/{}", m.server_id),
            "fingerprint": key.fingerprint(),
        }));
    }
    if members.is_empty() {
        alerts.push(json!({
            "status": status,
            "labels": labels_common,
            "annotations": {"summary": inc.summary},
            "startsAt": rfc3339(inc.opened_at),
            "endsAt": if status == "resolved" { rfc3339(ctx.now) } else { NOT_ENDED.into() },
            "generatorURL": format!("{base}/dashboard/incidents/{}", inc.id),
            "fingerprint": AlertKey { rule: inc.rule, server: None, detail: inc.group_key.clone() }.fingerprint(),
        }));
    }
    let truncated = members.len().saturating_sub(MAX_ALERTS);
    let state = match kind {
        NoticeKind::Resolved => IncidentState::Resolved,
        _ => inc.state,
    };
    json!({
        "version": "4",
        "groupKey": format!("{}:{}", inc.group_key, inc.id),
        "truncatedAlerts": truncated,
        "status": status,
        "receiver": receiver,
        "groupLabels": group_labels,
        "commonLabels": labels_common,
        "commonAnnotations": {"summary": inc.summary},
        "externalURL": base,
        "alerts": alerts,
        "incident": {
            "id": inc.id,
            "state": state.as_str(),
            "notice": kind.as_str(),
            "servers": inc.servers.max(inc.covers),
            "covers": inc.covers,
            "url": format!("{base}/dashboard/incidents/{}", inc.id),
            "acknowledged_by": inc.acknowledged_by,
            "ack_reason": inc.ack_reason,
        },
    })
}

fn text(v: &Value, path: &[&str]) -> String {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_str().map(str::to_owned).unwrap_or_default()
}

fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// A one-line headline: `[FIRING] ServerUnreachable in region eu (20 servers)`.
pub fn headline(notice: &Value) -> String {
    let kind = text(notice, &["incident", "notice"]).to_uppercase();
    let summary = text(notice, &["commonAnnotations", "summary"]);
    let servers = notice["incident"]["servers"].as_u64().unwrap_or(0);
    if servers > 0 {
        format!("[{kind}] {summary} ({servers} server(s))")
    } else {
        format!("[{kind}] {summary}")
    }
}

/// The lines listing each alert, at most [`MAX_ALERTS`].
fn alert_lines(notice: &Value) -> Vec<String> {
    notice["alerts"]
        .as_array()
        .map(|alerts| {
            alerts
                .iter()
                .map(|a| {
                    format!(
                        "{} {} — {}",
                        if a["status"] == "resolved" {
                            "✅"
                        } else {
                            "🔥"
                        },
                        Some(text(a, &["labels", "server"]))
                            .filter(|s| !s.is_empty())
                            .unwrap_or_else(|| text(a, &["labels", "alertname"])),
                        text(a, &["annotations", "summary"]),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Slack's message: a headline section, sections of alert lines each under Slack's block
/// text limit, at most [`SLACK_MAX_BLOCKS`] blocks.
pub fn slack(notice: &Value) -> Value {
    let headline = headline(notice);
    let url = text(notice, &["incident", "url"]);
    let mut blocks = vec![json!({
        "type": "section",
        "text": {"type": "mrkdwn", "text": clip(&format!("*{headline}*\n<{url}|Open the incident>"), SLACK_BLOCK_CHARS)},
    })];
    let mut chunk = String::new();
    let lines = alert_lines(notice);
    let total = lines.len();
    let mut shown = 0;
    for line in lines {
        let line = clip(&line, 300);
        if chunk.len() + line.len() + 1 > SLACK_BLOCK_CHARS {
            if blocks.len() + 2 > SLACK_MAX_BLOCKS {
                break;
            }
            blocks.push(json!({"type": "section", "text": {"type": "mrkdwn", "text": chunk}}));
            chunk = String::new();
        }
        chunk.push_str(&line);
        chunk.push('\n');
        shown += 1;
    }
    if !chunk.is_empty() && blocks.len() < SLACK_MAX_BLOCKS - 1 {
        blocks.push(json!({"type": "section", "text": {"type": "mrkdwn", "text": chunk}}));
    }
    let more = total - shown.min(total) + notice["truncatedAlerts"].as_u64().unwrap_or(0) as usize;
    if more > 0 {
        blocks.push(json!({"type": "context", "elements": [{"type": "mrkdwn", "text": format!("and {more} more")}]}));
    }
    json!({"text": clip(&headline, SLACK_BLOCK_CHARS), "blocks": blocks})
}

/// PagerDuty Events v2: `dedup_key` is the incident's id; trigger, acknowledge or resolve.
pub fn pagerduty(notice: &Value, routing_key: &str) -> Value {
    let action = match text(notice, &["incident", "notice"]).as_str() {
        "resolved" => "resolve",
        "acknowledged" => "acknowledge",
        _ => "trigger",
    };
    let severity = match text(notice, &["commonLabels", "severity"]).as_str() {
        "critical" => "critical",
        _ => "warning",
    };
    json!({
        "routing_key": routing_key,
        "event_action": action,
        "dedup_key": text(notice, &["incident", "id"]),
        "payload": {
            "summary": clip(&headline(notice), 1024),
            "source": "fleet",
            "severity": severity,
            "component": text(notice, &["commonLabels", "region"]),
            "group": text(notice, &["groupLabels", "alertname"]),
            "custom_details": {"servers": notice["incident"]["servers"], "alerts": alert_lines(notice).into_iter().take(20).collect::<Vec<_>>()},
        },
        "links": [{"href": text(notice, &["incident", "url"]), "text": "Fleet incident"}],
    })
}

/// An email's subject and plain-text body.
pub fn email(notice: &Value) -> (String, String) {
    let subject = clip(&headline(notice), 200);
    let mut body = format!(
        "{subject}\n\nIncident: {}\n\n",
        text(notice, &["incident", "url"])
    );
    for line in alert_lines(notice) {
        body.push_str(&line);
        body.push('\n');
    }
    let more = notice["truncatedAlerts"].as_u64().unwrap_or(0);
    if more > 0 {
        body.push_str(&format!("… and {more} more\n"));
    }
    (subject, body)
}

/// The notice `POST …/channels/{id}/test` sends.
pub fn test_notice(channel: &str, public_url: &str, now: OffsetDateTime) -> Value {
    let base = public_url.trim_end_matches('/');
    json!({
        "version": "4", "groupKey": "fleet-test", "truncatedAlerts": 0, "status": "firing",
        "receiver": channel, "groupLabels": {"alertname": "FleetTest"},
        "commonLabels": {"alertname": "FleetTest", "severity": "warning"},
        "commonAnnotations": {"summary": "a test notice from Fleet; nothing is wrong"},
        "externalURL": base,
        "alerts": [{"status": "firing", "labels": {"alertname": "FleetTest", "severity": "warning"},
                    "annotations": {"summary": "a test notice from Fleet; nothing is wrong"},
                    "startsAt": rfc3339(now), "endsAt": NOT_ENDED, "generatorURL": base, "fingerprint": "0000000000000000"}],
        "incident": {"id": "00000000-0000-0000-0000-000000000000", "state": "firing", "notice": "test", "servers": 0, "covers": 0, "url": base},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn many(n: usize) -> Value {
        let alerts: Vec<Value> = (0..n)
            .map(|i| json!({"status": "firing", "labels": {"server": format!("web-{i}-{}", "x".repeat(200))}, "annotations": {"summary": "ServerUnreachable in region eu"}}))
            .collect();
        json!({"incident": {"notice": "firing", "servers": n, "url": "http://x", "id": "abc"},
               "commonAnnotations": {"summary": "ServerUnreachable in region eu"},
               "commonLabels": {"severity": "critical"}, "groupLabels": {"alertname": "ServerUnreachable"},
               "alerts": alerts, "truncatedAlerts": 900})
    }

    #[test]
    fn slack_messages_keep_within_slacks_limits() {
        let m = slack(&many(100));
        let blocks = m["blocks"].as_array().unwrap();
        assert!(blocks.len() <= SLACK_MAX_BLOCKS);
        for b in blocks {
            let t = b["text"]["text"].as_str().unwrap_or("");
            assert!(t.chars().count() < 3000, "{}", t.len());
        }
        let last = blocks.last().unwrap()["elements"][0]["text"]
            .as_str()
            .unwrap();
        assert!(
            last.starts_with("and ") && last.ends_with(" more"),
            "{last}"
        );
    }

    #[test]
    fn pagerduty_events_dedup_on_the_incident() {
        let mut n = many(1);
        let e = pagerduty(&n, "key");
        assert_eq!(e["event_action"], "trigger");
        assert_eq!(e["dedup_key"], "abc");
        n["incident"]["notice"] = json!("acknowledged");
        assert_eq!(pagerduty(&n, "key")["event_action"], "acknowledge");
        n["incident"]["notice"] = json!("resolved");
        assert_eq!(pagerduty(&n, "key")["event_action"], "resolve");
    }
}
