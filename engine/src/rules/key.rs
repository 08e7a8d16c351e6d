//! What a rule groups by (`key`) and what it counts distinct values of
//! (`count: "distinct:<field>"`), and how each is read from a request.
//!
//! **A request missing any part of the key is not counted by the rule**
//! (AWS WAF's semantics): a rule keyed by API key never lumps every
//! anonymous request into one "no key" bucket an attacker could fill to
//! lock others out, and a client cannot dodge a rule keyed by a field it
//! must send (a phone number to text) by leaving it out — the request has
//! nothing to count then.

use crate::identity::ClientAddr;
use std::net::IpAddr;

/// Longest value taken from a header, a body field or a query parameter;
/// a longer one is cut (hashed anyway, only the first bytes tell).
pub const MAX_VALUE_BYTES: usize = 256;

/// One part of a rule's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySpec {
    /// The filter's client key (address, plus user agent when so configured).
    Client,
    Address,
    /// The address's /24 (IPv4) or /64 (IPv6).
    Prefix,
    /// `client.session_cookie`'s value.
    Session,
    /// `client.api_key_header`'s value.
    ApiKey,
    /// `client.jwt_claim` of the bearer token.
    JwtClaim,
    Field(FieldSpec),
    /// The endpoint as a whole: one key for every request the rule matches.
    Endpoint,
}

/// A request value: a header, a query parameter, the login username, a
/// JSON or form body field, or the path's last segment (`path_id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldSpec {
    Header(String),
    Query(String),
    Username,
    Json(String),
    Form(String),
    PathId,
}

fn field_name(name: &str) -> Result<String, String> {
    let ok = !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_graphic() && b != b'"');
    if ok { Ok(name.to_string()) } else { Err(format!("{name:?}: 1 to 64 printable characters")) }
}

impl FieldSpec {
    pub fn parse(text: &str) -> Result<FieldSpec, String> {
        match text {
            "username" => return Ok(FieldSpec::Username),
            "path_id" => return Ok(FieldSpec::PathId),
            _ => {}
        }
        let (kind, name) = text.split_once(':').ok_or_else(|| {
            format!("{text:?}: one of path_id, username, header:<name>, query:<name>, json:<field>, form:<field>")
        })?;
        match kind {
            "header" => super::config::header_name(name).map(FieldSpec::Header),
            "query" => field_name(name).map(FieldSpec::Query),
            "json" => field_name(name).map(FieldSpec::Json),
            "form" => field_name(name).map(FieldSpec::Form),
            _ => Err(format!("{kind:?}: a field is header:, query:, json: or form:")),
        }
    }

    /// Read from the request body (or the login body's username).
    pub fn needs_body(&self) -> bool {
        matches!(self, FieldSpec::Json(_) | FieldSpec::Form(_) | FieldSpec::Username)
    }
}

impl KeySpec {
    pub fn parse(text: &str) -> Result<KeySpec, String> {
        Ok(match text {
            "client" => KeySpec::Client,
            "address" => KeySpec::Address,
            "prefix" => KeySpec::Prefix,
            "session" => KeySpec::Session,
            "api_key" => KeySpec::ApiKey,
            "jwt_claim" => KeySpec::JwtClaim,
            "endpoint" => KeySpec::Endpoint,
            other => KeySpec::Field(FieldSpec::parse(other).map_err(|_| {
                format!(
                    "{other:?}: one of client, address, prefix, session, api_key, jwt_claim, endpoint, \
                     username, header:<name>, query:<name>, json:<field>, form:<field>"
                )
            })?),
        })
    }

    pub fn needs_body(&self) -> bool {
        matches!(self, KeySpec::Field(f) if f.needs_body())
    }
}

/// What the rules can read of one request.
#[derive(Debug, Clone, Copy, Default)]
pub struct RuleInput<'a> {
    pub path: &'a str,
    pub client_key: u64,
    pub addr: Option<ClientAddr>,
    pub session: Option<&'a str>,
    pub api_key: Option<&'a str>,
    pub jwt_claim: Option<&'a str>,
    /// The request headers the rules asked for (see `Rules::header_names`).
    pub headers: &'a [(&'a str, &'a [u8])],
    pub username: Option<&'a str>,
    /// The request body, in the body phase (bounded).
    pub body: Option<&'a [u8]>,
}

impl<'a> RuleInput<'a> {
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }
}

fn cut(bytes: &[u8]) -> &[u8] {
    bytes.get(..MAX_VALUE_BYTES).unwrap_or(bytes)
}

/// A field's value as bytes to hash (None: missing or empty).
pub fn field_value(spec: &FieldSpec, input: &RuleInput<'_>) -> Option<Vec<u8>> {
    let value: Vec<u8> = match spec {
        FieldSpec::Header(name) => cut(input.header(name)?).to_vec(),
        FieldSpec::Query(name) => {
            let query = input.path.split_once('?').map(|(_, q)| q.split('#').next().unwrap_or(""))?;
            let v = form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == name.as_str())?.1;
            cut(v.as_bytes()).to_vec()
        }
        FieldSpec::Username => cut(input.username?.as_bytes()).to_vec(),
        FieldSpec::Json(name) | FieldSpec::Form(name) => {
            let body = input.body?;
            let text = body_field(body, name, matches!(spec, FieldSpec::Json(_)))?;
            cut(text.trim().as_bytes()).to_vec()
        }
        FieldSpec::PathId => {
            let path = input.path.split(['?', '#']).next().unwrap_or("");
            cut(path.trim_end_matches('/').rsplit('/').next()?.as_bytes()).to_vec()
        }
    };
    (!value.is_empty()).then_some(value)
}

/// A top-level JSON string or number field, or a form field.
fn body_field(body: &[u8], name: &str, json: bool) -> Option<String> {
    if json {
        let value: serde_json::Value = serde_json::from_slice(body).ok()?;
        match value.get(name)? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    } else {
        form_urlencoded::parse(body).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
    }
}

/// A key part's bytes (None: missing, the request is not counted).
pub fn key_part(spec: &KeySpec, input: &RuleInput<'_>) -> Option<Vec<u8>> {
    let text = |s: Option<&str>| s.filter(|s| !s.is_empty()).map(|s| cut(s.as_bytes()).to_vec());
    match spec {
        KeySpec::Client => Some(input.client_key.to_le_bytes().to_vec()),
        KeySpec::Address => match input.addr? {
            ClientAddr::Ip(_) => input.addr.map(|a| a.key_bytes().to_vec()),
            ClientAddr::Unknown => None,
        },
        KeySpec::Prefix => match input.addr? {
            ClientAddr::Ip(IpAddr::V4(_)) => input.addr.map(|a| a.v4_prefix(24).key_bytes().to_vec()),
            ClientAddr::Ip(IpAddr::V6(v6)) => {
                let bits = u128::from(v6) & (u128::MAX << 64);
                Some(bits.to_be_bytes().to_vec())
            }
            ClientAddr::Unknown => None,
        },
        KeySpec::Session => text(input.session),
        KeySpec::ApiKey => text(input.api_key),
        KeySpec::JwtClaim => text(input.jwt_claim),
        KeySpec::Field(f) => field_value(f, input),
        KeySpec::Endpoint => Some(b"endpoint".to_vec()),
    }
}

/// The whole key's bytes: its parts, length-prefixed so that `("ab","c")`
/// and `("a","bc")` differ (None when a part is missing).
pub fn key_bytes(parts: &[KeySpec], input: &RuleInput<'_>) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(64);
    for part in parts {
        let bytes = key_part(part, input)?;
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(&bytes);
    }
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_part_and_refuses_the_rest() {
        for ok in ["client", "address", "prefix", "session", "api_key", "jwt_claim", "endpoint", "username",
            "header:x-partner", "query:q", "json:phone", "form:code"] {
            assert!(KeySpec::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "ip", "header:X-Up", "json:", "cookie:x", "query:a\"b"] {
            assert!(KeySpec::parse(bad).is_err(), "{bad}");
        }
        assert!(FieldSpec::parse("path_id").is_ok());
        assert!(KeySpec::parse("json:phone").unwrap().needs_body());
        assert!(!KeySpec::parse("header:x").unwrap().needs_body());
    }

    #[test]
    fn missing_parts_mean_no_key() {
        let headers: [(&str, &[u8]); 1] = [("x-partner", b"acme")];
        let input = RuleInput { path: "/s?q=shoes&x=1", headers: &headers, ..RuleInput::default() };
        let q = KeySpec::parse("query:q").unwrap();
        assert_eq!(key_part(&q, &input), Some(b"shoes".to_vec()));
        assert_eq!(key_part(&KeySpec::parse("query:nope").unwrap(), &input), None);
        assert_eq!(key_part(&KeySpec::ApiKey, &input), None);
        assert_eq!(key_part(&KeySpec::Address, &input), None);
        let both = [KeySpec::parse("header:x-partner").unwrap(), q];
        assert!(key_bytes(&both, &input).is_some());
        assert!(key_bytes(&[KeySpec::ApiKey, KeySpec::Endpoint], &input).is_none());
    }

    #[test]
    fn body_fields_and_path_ids() {
        let input = RuleInput { path: "/api/items/42/?a=1", body: Some(br#"{"phone":"+15550001","n":7,"o":{}}"#), ..RuleInput::default() };
        assert_eq!(field_value(&FieldSpec::Json("phone".into()), &input), Some(b"+15550001".to_vec()));
        assert_eq!(field_value(&FieldSpec::Json("n".into()), &input), Some(b"7".to_vec()));
        assert_eq!(field_value(&FieldSpec::Json("o".into()), &input), None);
        assert_eq!(field_value(&FieldSpec::PathId, &input), Some(b"42".to_vec()));
        let form = RuleInput { body: Some(b"code=WELCOME10&x=1"), ..RuleInput::default() };
        assert_eq!(field_value(&FieldSpec::Form("code".into()), &form), Some(b"WELCOME10".to_vec()));
        let broken = RuleInput { body: Some(b"{not json"), ..RuleInput::default() };
        assert_eq!(field_value(&FieldSpec::Json("phone".into()), &broken), None);
    }

    #[test]
    fn prefixes_group_neighbours() {
        let a = RuleInput { addr: Some(ClientAddr::Ip("198.51.100.7".parse().unwrap())), ..RuleInput::default() };
        let b = RuleInput { addr: Some(ClientAddr::Ip("198.51.100.200".parse().unwrap())), ..RuleInput::default() };
        assert_eq!(key_part(&KeySpec::Prefix, &a), key_part(&KeySpec::Prefix, &b));
        assert_ne!(key_part(&KeySpec::Address, &a), key_part(&KeySpec::Address, &b));
        let c = RuleInput { addr: Some(ClientAddr::Ip("2001:db8::1".parse().unwrap())), ..RuleInput::default() };
        let d = RuleInput { addr: Some(ClientAddr::Ip("2001:db8::ffff:1".parse().unwrap())), ..RuleInput::default() };
        assert_eq!(key_part(&KeySpec::Prefix, &c), key_part(&KeySpec::Prefix, &d));
    }
}
