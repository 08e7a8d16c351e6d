//! Headers inconsistent with the browser a user agent claims.
//!
//! Every desktop and mobile browser sends `Accept` and `Accept-Language` on
//! every request, `fetch()` included, over HTTP and HTTPS alike. A script
//! that copies a browser's `User-Agent` but not its headers is caught here;
//! one that copies them all is not (the other login signals still see it).
//! Headers that browsers send only over TLS (`Sec-Fetch-*`, client hints)
//! are deliberately not required: a plaintext hop would make real users
//! look like tools.

/// Whether the user agent claims to be a desktop or mobile browser.
pub fn claims_browser(user_agent: &str) -> bool {
    user_agent.starts_with("Mozilla/5.0")
        && ["Chrome/", "Firefox/", "Safari/", "Edg/"].iter().any(|b| user_agent.contains(b))
}

/// A claimed browser without the headers every browser sends.
/// `header_names`: the request's header names, comma-joined, lowercase.
pub fn inconsistent(user_agent: Option<&str>, header_names: &str) -> bool {
    let Some(ua) = user_agent else {
        return false;
    };
    if !claims_browser(ua) {
        return false;
    }
    let has = |name: &str| header_names.split(',').any(|n| n.eq_ignore_ascii_case(name));
    !has("accept") || !has("accept-language")
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHROME: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36";

    #[test]
    fn a_browser_with_its_headers_is_consistent() {
        let names = ":authority,:path,:method,:scheme,content-type,accept,accept-language,accept-encoding,user-agent";
        assert!(!inconsistent(Some(CHROME), names));
        let iphone = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1";
        assert!(!inconsistent(Some(iphone), names));
    }

    #[test]
    fn a_copied_user_agent_without_browser_headers_is_not() {
        assert!(inconsistent(Some(CHROME), ":authority,:path,:method,user-agent,accept-encoding,accept"));
        assert!(inconsistent(Some(CHROME), ":path,accept-language,user-agent"));
    }

    #[test]
    fn apps_and_tools_that_say_what_they_are_are_not_judged_here() {
        assert!(!inconsistent(Some("okhttp/4.12.0"), ":path"));
        assert!(!inconsistent(Some("python-requests/2.31.0"), ":path"));
        assert!(!inconsistent(Some("ShopApp/5.2 (iPhone; iOS 17.5)"), ":path"));
        assert!(!inconsistent(None, ":path"));
    }
}
