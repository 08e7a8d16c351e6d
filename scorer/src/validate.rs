//! What a score request must look like beyond its JSON shape. Everything in
//! it is chosen by whoever reaches the scorer, and ends up in store keys,
//! metric labels and the dashboard, so each string is bounded here.

use abuse_engine::wire::{ScoreRequest, WIRE_VERSION};

pub const MAX_REASONS: usize = 16;
const MAX_REASON_LEN: usize = 64;
const MAX_CLIENT_LEN: usize = 64;
const MAX_SESSION_LEN: usize = 128;
const MAX_USERNAME_LEN: usize = 256;

/// A short, quoted excerpt of caller input for an error message.
fn excerpt(s: &str) -> String {
    format!("{:?}", s.chars().take(40).collect::<String>())
}

fn token(name: &str, value: &str, max: usize) -> Result<(), String> {
    if value.is_empty() || value.len() > max || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "`{name}` must be 1 to {max} printable ASCII characters without spaces, got {}",
            excerpt(value)
        ));
    }
    Ok(())
}

pub fn check(req: &ScoreRequest) -> Result<(), String> {
    if req.version != WIRE_VERSION {
        return Err(format!(
            "unsupported wire version {} (this scorer speaks version {WIRE_VERSION})",
            req.version
        ));
    }
    token("client", &req.client, MAX_CLIENT_LEN)?;
    if req.reasons.len() > MAX_REASONS {
        return Err(format!(
            "too many `reasons`: {} (at most {MAX_REASONS})",
            req.reasons.len()
        ));
    }
    for r in &req.reasons {
        let snake = r
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if r.is_empty() || r.len() > MAX_REASON_LEN || !snake {
            return Err(format!(
                "`reasons`: {} is not a snake_case name of at most {MAX_REASON_LEN} characters",
                excerpt(r)
            ));
        }
    }
    if req
        .username
        .as_ref()
        .is_some_and(|u| u.len() > MAX_USERNAME_LEN)
    {
        return Err(format!(
            "`username` is longer than {MAX_USERNAME_LEN} bytes"
        ));
    }
    if let Some(s) = &req.session {
        token("session", s, MAX_SESSION_LEN)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> ScoreRequest {
        ScoreRequest {
            version: WIRE_VERSION,
            client: "2001:db8::/64".into(),
            ..ScoreRequest::default()
        }
    }

    #[test]
    fn names_the_problem() {
        assert_eq!(check(&ok()), Ok(()));
        let e = |r: ScoreRequest| check(&r).err().unwrap_or_default();
        assert!(e(ScoreRequest { version: 2, ..ok() }).contains("wire version 2"));
        assert!(e(ScoreRequest {
            client: String::new(),
            ..ok()
        })
        .contains("`client`"));
        assert!(e(ScoreRequest {
            client: "a b".into(),
            ..ok()
        })
        .contains("`client`"));
        assert!(e(ScoreRequest {
            reasons: vec!["<script>".into()],
            ..ok()
        })
        .contains("`reasons`"));
        assert!(e(ScoreRequest {
            reasons: vec!["x".into(); 17],
            ..ok()
        })
        .contains("too many"));
        assert!(e(ScoreRequest {
            username: Some("u".repeat(300)),
            ..ok()
        })
        .contains("`username`"));
        assert!(e(ScoreRequest {
            session: Some("s\n".into()),
            ..ok()
        })
        .contains("`session`"));
    }
}
