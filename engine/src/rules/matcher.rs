//! A rule's `match`: route groups, methods, a path template and request
//! header conditions, checked on the request; answer statuses, checked on
//! the answer (a rule with statuses counts at the answer, e.g. only failures).

use super::config::{HeaderCondition, RuleMatch};
use crate::routes::{RouteMatch, RouteTable};

/// Segments a path template may have (longer paths never match it).
const MAX_SEGMENTS: usize = 32;

/// `/api/users/*/orders`, `/api/**`: `*` is one non-empty segment, a final
/// `**` any rest (none included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    segments: Vec<Segment>,
    rest: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Any,
}

impl PathTemplate {
    pub fn parse(text: &str) -> Result<PathTemplate, String> {
        let Some(body) = text.strip_prefix('/') else {
            return Err(format!("{text:?} must start with '/'"));
        };
        if text.contains(['?', '#']) {
            return Err(format!("{text:?}: a path template has no query"));
        }
        let parts: Vec<&str> = if body.is_empty() { Vec::new() } else { body.split('/').collect() };
        if parts.len() > MAX_SEGMENTS {
            return Err(format!("at most {MAX_SEGMENTS} segments"));
        }
        let mut segments = Vec::new();
        let mut rest = false;
        for (i, part) in parts.iter().enumerate() {
            match *part {
                "**" if i + 1 == parts.len() => rest = true,
                "**" => return Err("`**` only as the last segment".to_string()),
                "*" => segments.push(Segment::Any),
                p if p.contains('*') => return Err(format!("{p:?}: `*` stands alone in a segment")),
                p => segments.push(Segment::Literal(p.to_string())),
            }
        }
        Ok(PathTemplate { segments, rest })
    }

    /// Whether `path` (its query ignored) fits the template.
    pub fn matches(&self, path: &str) -> bool {
        let path = path.split(['?', '#']).next().unwrap_or("");
        let Some(body) = path.strip_prefix('/') else {
            return false;
        };
        // "/" has no segment (not one empty segment).
        let mut parts = body.split('/').filter(|_| !body.is_empty());
        for segment in &self.segments {
            match (segment, parts.next()) {
                (Segment::Literal(l), Some(p)) if l == p => {}
                (Segment::Any, Some(p)) if !p.is_empty() => {}
                _ => return false,
            }
        }
        self.rest || parts.next().is_none()
    }
}

/// `"401"` or a class `"4xx"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusSpec {
    Exact(u32),
    Class(u32),
}

impl StatusSpec {
    pub fn parse(text: &str) -> Result<StatusSpec, String> {
        let bytes = text.as_bytes();
        let class = bytes.first().filter(|c| (b'1'..=b'5').contains(c)).map(|c| u32::from(c - b'0'));
        match (class, bytes.get(1..)) {
            (Some(c), Some(b"xx")) if bytes.len() == 3 => Ok(StatusSpec::Class(c)),
            _ => match text.parse::<u32>() {
                Ok(s) if (100..=599).contains(&s) => Ok(StatusSpec::Exact(s)),
                _ => Err(format!("{text:?} is not a status (\"401\") or class (\"4xx\")")),
            },
        }
    }

    pub fn matches(self, status: u32) -> bool {
        match self {
            StatusSpec::Exact(s) => s == status,
            StatusSpec::Class(c) => status / 100 == c,
        }
    }
}

/// A compiled `match`.
#[derive(Debug, Clone)]
pub struct Matcher {
    /// Route group indices (empty: any request).
    groups: Vec<usize>,
    methods: Vec<String>,
    path: Option<PathTemplate>,
    headers: Vec<HeaderCondition>,
    statuses: Vec<StatusSpec>,
}

impl Matcher {
    /// From a validated `match` (unknown groups and bad parts are dropped:
    /// validation refused them already).
    pub fn new(m: &RuleMatch, routes: &RouteTable) -> Matcher {
        Matcher {
            groups: m.route_groups.iter().filter_map(|g| routes.index_of(g)).collect(),
            methods: m.methods.clone(),
            path: m.path.as_deref().and_then(|p| PathTemplate::parse(p).ok()),
            headers: m.headers.clone(),
            statuses: m.statuses.iter().filter_map(|s| StatusSpec::parse(s).ok()).collect(),
        }
    }

    /// Header names the conditions read.
    pub fn header_names(&self) -> impl Iterator<Item = &str> {
        self.headers.iter().map(|h| h.name.as_str())
    }

    /// The request-side conditions; `header` looks a request header up.
    pub fn request_matches<'a>(
        &self,
        method: &str,
        path: &str,
        routes: RouteMatch,
        header: &dyn Fn(&str) -> Option<&'a [u8]>,
    ) -> bool {
        if !self.groups.is_empty() && !self.groups.iter().any(|g| routes.contains(*g)) {
            return false;
        }
        if !self.methods.is_empty() && !self.methods.iter().any(|m| m == method) {
            return false;
        }
        if self.path.as_ref().is_some_and(|t| !t.matches(path)) {
            return false;
        }
        self.headers.iter().all(|c| {
            let value = header(&c.name);
            match (c.present, &c.equals, &c.prefix) {
                (Some(present), _, _) => value.is_some() == present,
                (_, Some(eq), _) => value.is_some_and(|v| v == eq.as_bytes()),
                (_, _, Some(prefix)) => value.is_some_and(|v| v.starts_with(prefix.as_bytes())),
                _ => true,
            }
        })
    }

    /// Whether the rule counts at the answer (it names statuses).
    pub fn on_answer(&self) -> bool {
        !self.statuses.is_empty()
    }

    /// The answer-side condition (no statuses: every answer).
    pub fn status_matches(&self, status: u32) -> bool {
        self.statuses.is_empty() || self.statuses.iter().any(|s| s.matches(status))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn templates() {
        let t = PathTemplate::parse("/api/users/*/orders").unwrap();
        assert!(t.matches("/api/users/42/orders"));
        assert!(t.matches("/api/users/42/orders?page=2"));
        assert!(!t.matches("/api/users//orders"));
        assert!(!t.matches("/api/users/42/orders/1"));
        assert!(!t.matches("/api/users/42"));
        let t = PathTemplate::parse("/api/**").unwrap();
        assert!(t.matches("/api/") && t.matches("/api/a/b") && t.matches("/api"));
        assert!(!t.matches("/other"));
        let exact = PathTemplate::parse("/api/otp/verify").unwrap();
        assert!(exact.matches("/api/otp/verify") && !exact.matches("/api/otp/verify/x") && !exact.matches("/api/otp"));
        assert!(PathTemplate::parse("/").unwrap().matches("/"));
        assert!(PathTemplate::parse("api").is_err());
        assert!(PathTemplate::parse("/a/**/b").is_err());
        assert!(PathTemplate::parse("/a*").is_err());
        assert!(PathTemplate::parse("/a?b=1").is_err());
    }

    #[test]
    fn statuses() {
        assert_eq!(StatusSpec::parse("401"), Ok(StatusSpec::Exact(401)));
        assert!(StatusSpec::parse("4xx").unwrap().matches(404));
        assert!(!StatusSpec::parse("4xx").unwrap().matches(500));
        for bad in ["", "99", "600", "6xx", "4x", "4xxx", "abc"] {
            assert!(StatusSpec::parse(bad).is_err(), "{bad}");
        }
    }
}
