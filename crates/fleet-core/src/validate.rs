//! One set of rules for what a server may be registered with, shared by the API, `servers
//! import`, the stores and embedders, so that every path refuses the same input the same way.

use crate::model::{NewServer, ServerUpdate};

/// An input that breaks a rule; the message names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field} {message}")]
pub struct Invalid {
    /// The field at fault.
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
}

fn invalid(field: &'static str, message: impl Into<String>) -> Invalid {
    Invalid {
        field,
        message: message.into(),
    }
}

/// Characters that change how text reads without being seen: bidirectional overrides and
/// isolates, and zero-width characters.
fn is_hidden(c: char) -> bool {
    matches!(
        c,
        '\u{202A}'..='\u{202E}'
            | '\u{2066}'..='\u{2069}'
            | '\u{200B}'..='\u{200F}'
            | '\u{2060}'
            | '\u{FEFF}'
    )
}

/// Text shown to people: no control, bidi-override or zero-width characters, at most `max`.
pub fn text(field: &'static str, value: &str, max: usize) -> Result<(), Invalid> {
    let n = value.chars().count();
    if n > max {
        return Err(invalid(
            field,
            format!("must be at most {max} characters, got {n}"),
        ));
    }
    if let Some(c) = value.chars().find(|c| c.is_control() || is_hidden(*c)) {
        return Err(invalid(
            field,
            format!(
                "must not contain control, bidi-override or zero-width characters (found U+{:04X})",
                u32::from(c)
            ),
        ));
    }
    Ok(())
}

/// The longest server name.
pub const MAX_NAME: usize = 255;

/// A server's name, trimmed: 1 to 255 characters of visible text.
pub fn name(value: &str) -> Result<String, Invalid> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(invalid("name", "must not be empty"));
    }
    text("name", trimmed, MAX_NAME)?;
    Ok(trimmed.to_owned())
}

/// A server's base URL: absolute http or https, with a host and without credentials.
pub fn api_url(value: &str) -> Result<(), Invalid> {
    text("api_url", value, 2048)?;
    let url = url::Url::parse(value).map_err(|e| {
        invalid(
            "api_url",
            format!("must be an absolute http or https URL: {e}"),
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(
            "api_url",
            format!("must be an http or https URL, not {}:", url.scheme()),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("api_url", "must name a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            "api_url",
            "must not carry credentials; give the server an api_token instead",
        ));
    }
    Ok(())
}

/// A probe token: 1 to 1,024 printable characters.
pub fn token(value: &str) -> Result<(), Invalid> {
    if value.is_empty() || value.chars().count() > 1024 {
        return Err(invalid("api_token", "must be 1 to 1024 characters"));
    }
    if value.chars().any(|c| c.is_control() || is_hidden(c)) {
        return Err(invalid(
            "api_token",
            "must be printable (no control characters such as CR or LF)",
        ));
    }
    Ok(())
}

/// At most 50 tags of 1 to 100 visible characters.
pub fn tags(value: &[String]) -> Result<(), Invalid> {
    if value.len() > 50 {
        return Err(invalid("tags", "must be at most 50"));
    }
    for t in value {
        if t.trim().is_empty() {
            return Err(invalid("tags", "must not hold an empty tag"));
        }
        text("tags", t, 100)?;
    }
    Ok(())
}

/// A page path on the server: absolute, without a query, 1 to 255 characters.
pub fn metrics_path(value: &str) -> Result<(), Invalid> {
    text("metrics_path", value, 255)?;
    if !value.starts_with('/') || value.contains(['?', '#', ' ']) {
        return Err(invalid(
            "metrics_path",
            "must be an absolute path such as /metrics, without a query",
        ));
    }
    Ok(())
}

/// A CA certificate in PEM: at most 16 KiB, with a certificate block in it. Whether it parses
/// is for the adapter that uses it to say, as a recorded failure of that server.
pub fn ca_cert(value: &str) -> Result<(), Invalid> {
    if value.len() > 16 * 1024 {
        return Err(invalid("ca_cert", "must be at most 16 KiB"));
    }
    if !value.contains("-----BEGIN CERTIFICATE-----")
        || !value.contains("-----END CERTIFICATE-----")
    {
        return Err(invalid(
            "ca_cert",
            "must be a PEM certificate (-----BEGIN CERTIFICATE----- …)",
        ));
    }
    Ok(())
}

fn optional(field: &'static str, value: Option<&str>, max: usize) -> Result<(), Invalid> {
    value.map_or(Ok(()), |v| text(field, v, max))
}

impl NewServer {
    /// The server with its name trimmed, or the first rule it breaks.
    pub fn validated(mut self) -> Result<Self, Invalid> {
        self.name = name(&self.name)?;
        api_url(&self.api_url)?;
        if let Some(t) = &self.api_token {
            token(t.expose())?;
        }
        optional("description", self.description.as_deref(), 2000)?;
        optional("hostname", self.hostname.as_deref(), 255)?;
        optional("region", self.region.as_deref(), 200)?;
        optional("environment", self.environment.as_deref(), 200)?;
        tags(&self.tags)?;
        if let Some(p) = &self.metrics_path {
            metrics_path(p)?;
        }
        if let Some(c) = &self.ca_cert {
            ca_cert(c)?;
        }
        Ok(self)
    }
}

impl ServerUpdate {
    /// The change with a new name trimmed, or the first rule it breaks.
    pub fn validated(mut self) -> Result<Self, Invalid> {
        if let Some(n) = &self.name {
            self.name = Some(name(n)?);
        }
        if let Some(u) = &self.api_url {
            api_url(u)?;
        }
        if let Some(t) = &self.api_token {
            token(t.expose())?;
        }
        optional(
            "description",
            self.description.clone().flatten().as_deref(),
            2000,
        )?;
        optional("hostname", self.hostname.clone().flatten().as_deref(), 255)?;
        optional("region", self.region.clone().flatten().as_deref(), 200)?;
        optional(
            "environment",
            self.environment.clone().flatten().as_deref(),
            200,
        )?;
        if let Some(Some(p)) = &self.metrics_path {
            metrics_path(p)?;
        }
        if let Some(Some(c)) = &self.ca_cert {
            ca_cert(c)?;
        }
        if let Some(t) = &self.tags {
            tags(t)?;
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ApiToken;

    /// The bad inputs every path must refuse, and what the refusal says.
    pub(crate) fn bad() -> Vec<(NewServer, &'static str)> {
        let base = || NewServer::new("web-1", "http://10.0.0.1:8080");
        let with = |f: &dyn Fn(&mut NewServer)| {
            let mut n = base();
            f(&mut n);
            n
        };
        vec![
            (with(&|n| n.name = "".into()), "name must not be empty"),
            (with(&|n| n.name = "   ".into()), "name must not be empty"),
            (
                with(&|n| n.name = "x".repeat(5000)),
                "name must be at most 255 characters",
            ),
            (
                with(&|n| n.name = "web\u{1b}[31m".into()),
                "name must not contain control",
            ),
            (
                with(&|n| n.name = "bell\u{7}".into()),
                "name must not contain control",
            ),
            (
                with(&|n| n.name = "abc\u{202E}cba".into()),
                "name must not contain control, bidi-override",
            ),
            (
                with(&|n| n.name = "zero\u{200B}width".into()),
                "name must not contain control",
            ),
            (
                with(&|n| n.name = "nul\0".into()),
                "name must not contain control",
            ),
            (
                with(&|n| n.api_url = "http://admin:hunter2@host".into()),
                "api_url must not carry credentials",
            ),
            (
                with(&|n| n.api_url = "file:///etc/passwd".into()),
                "api_url must be an http or https URL",
            ),
            (
                with(&|n| n.api_url = "not a url".into()),
                "api_url must be an absolute http or https URL",
            ),
            (
                with(&|n| n.api_token = Some(ApiToken::new(""))),
                "api_token must be 1 to 1024",
            ),
            (
                with(&|n| n.api_token = Some(ApiToken::new("tok\r\nX-Evil: 1"))),
                "api_token must be printable",
            ),
        ]
    }

    #[test]
    fn bad_servers_are_refused_naming_the_field() {
        for (new, says) in bad() {
            let shown = format!("{:?}", new.name);
            let err = new.validated().unwrap_err().to_string();
            assert!(err.starts_with(says), "{shown}: {err}");
        }
    }

    #[test]
    fn names_are_trimmed_and_good_servers_pass() {
        let ok = NewServer::new("  web-1 ", "https://web-1.internal:8443/base")
            .with_token(ApiToken::new("fleet_abc-DEF_123"))
            .validated()
            .unwrap();
        assert_eq!(ok.name, "web-1");
        assert!(
            NewServer::new("ünïcødé ✓", "http://[::1]:9")
                .validated()
                .is_ok()
        );
    }
}
