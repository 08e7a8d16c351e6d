//! `abuse-scorer ctl`: the operator's API from a shell, in the habits of
//! `cscli` — `decisions list`, `explain ID`, `unblock ADDR`, `allow
//! add|list|remove`, `audit`. It talks HTTP to a running scorer
//! (`--url`, `ABUSE_SCORER_URL`, default http://127.0.0.1:8081) with the
//! operator token (`ABUSE_OPERATOR_TOKEN`, or `--operator-token` before
//! `ctl`), which it never prints. Who makes a change is `--as` (default
//! `$USER`). A raw credential given as `-` is read from stdin, so that it
//! appears on no command line.
//!
//! Plain `http://` only (the scorer is an internal service on a private
//! network; put a TLS-terminating sidecar in front if yours crosses one).

use clap::{Args, Subcommand};
use serde_json::Value;
use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Clone, Args)]
pub struct Ctl {
    /// The scorer's base URL.
    #[arg(long, env = "ABUSE_SCORER_URL", default_value = "http://127.0.0.1:8081")]
    pub url: String,
    /// Who makes changes (recorded in the audit log).
    #[arg(long = "as", env = "USER", default_value = "operator")]
    pub author: String,
    /// Print the scorer's JSON answer instead of a summary.
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum CtlCommand {
    /// Decision records.
    Decisions {
        #[command(subcommand)]
        command: DecisionsCommand,
    },
    /// One decision with its reasons and figures (the id from a refusal's
    /// body or its `x-abuse-decision` header).
    Explain { id: String },
    /// Lift a client everywhere (its address, pool and every user-agent tag).
    Unblock {
        /// An address, or one label (`addr#tag`, `addr#pool`).
        client: String,
        /// Seconds during which the same detectors cannot box it again.
        #[arg(long, default_value_t = 0)]
        quiet_s: u64,
        /// Reasons the quiet period holds off (repeat; none: any).
        #[arg(long)]
        reason: Vec<String>,
        /// Why (recorded in the audit log).
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Allow entries.
    Allow {
        #[command(subcommand)]
        command: AllowCommand,
    },
    /// Every change: who, when, why; `--at MS` shows the allow list as it
    /// stood then.
    Audit {
        #[arg(long)]
        at: Option<u64>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum DecisionsCommand {
    /// Newest first; one of the filters, or the fleet's newest.
    List {
        #[arg(long)]
        client: Option<String>,
        #[arg(long)]
        id: Option<String>,
        /// A session cookie's value (`-`: read from stdin) or its hash.
        #[arg(long)]
        session: Option<String>,
        /// An API key (`-`: read from stdin) or its hash.
        #[arg(long)]
        api_key: Option<String>,
        /// A username (`-`: read from stdin) or its hash.
        #[arg(long)]
        username: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum AllowCommand {
    /// Add an entry: `--kind cidr|api_key|agent --value V`.
    Add {
        #[arg(long)]
        kind: String,
        /// An address or prefix, an API key (`-`: read from stdin) or its
        /// hash, a user-agent tag.
        #[arg(long)]
        value: String,
        /// How long it lasts (1 s to 90 days).
        #[arg(long, default_value_t = 86_400)]
        ttl_s: u64,
        #[arg(long, default_value = "")]
        note: String,
    },
    List,
    Remove {
        id: String,
        #[arg(long, default_value = "")]
        note: String,
    },
}

/// `s` for a URL's query: everything but the unreserved characters
/// percent-encoded (a label's `#` would start the fragment).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A value given as `-` is read from stdin (first line).
fn from_stdin(v: &str) -> Result<String, String> {
    if v != "-" {
        return Ok(v.to_string());
    }
    let mut s = String::new();
    std::io::stdin()
        .take(8192)
        .read_to_string(&mut s)
        .map_err(|e| format!("reading stdin: {e}"))?;
    Ok(s.lines().next().unwrap_or("").to_string())
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS` UTC (Howard
/// Hinnant's civil-from-days).
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

struct Client {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
    author: String,
}

impl Client {
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.base.trim_end_matches('/'));
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let result = match (method, body) {
            ("POST", Some(b)) => {
                let mut req = self.agent.post(&url).header("x-abuse-operator", &self.author).content_type("application/json");
                if let Some(a) = &auth {
                    req = req.header("authorization", a);
                }
                req.send(b.to_string())
            }
            ("DELETE", _) => {
                let mut req = self.agent.delete(&url).header("x-abuse-operator", &self.author);
                if let Some(a) = &auth {
                    req = req.header("authorization", a);
                }
                req.call()
            }
            _ => {
                let mut req = self.agent.get(&url);
                if let Some(a) = &auth {
                    req = req.header("authorization", a);
                }
                req.call()
            }
        };
        // The URL may carry a searched value: errors name the scorer, not it.
        let mut resp = result.map_err(|e| format!("{}: {e}", self.base))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| format!("reading the answer: {e}"))?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if (200..300).contains(&status) {
            Ok(value)
        } else {
            let why = value.get("error").and_then(Value::as_str).map_or_else(|| value.to_string(), str::to_string);
            let hint = if status == 401 { " (set ABUSE_OPERATOR_TOKEN)" } else { "" };
            Err(format!("{status}: {why}{hint}"))
        }
    }
}

/// `v[k]` (Null when absent), without the lint's indexing.
fn field<'a>(v: &'a Value, k: &str) -> &'a Value {
    v.get(k).unwrap_or(&Value::Null)
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

fn n(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

fn reasons_line(d: &Value) -> String {
    d.get("reasons")
        .and_then(Value::as_array)
        .map(|rs| {
            rs.iter()
                .map(|r| if s(r, "text").is_empty() { s(r, "reason").to_string() } else { format!("{}: {}", s(r, "reason"), s(r, "text")) })
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default()
}

fn print_record(r: &Value) {
    let d = r;
    println!(
        "{}  {}  {}  {}  {}/{}  {}  {} {}  {}{}",
        s(d, "id"),
        utc(n(d, "time_ms")),
        s(d, "instance"),
        s(d, "client"),
        s(d, "action"),
        s(d, "mode"),
        n(d, "status"),
        s(d, "method"),
        s(d, "path"),
        reasons_line(d),
        if n(r, "penalty_hits") > 0 { format!("  (+{} penalty refusals)", n(r, "penalty_hits")) } else { String::new() },
    );
}

fn explain(r: &Value) {
    let d = r;
    let line = |k: &str, v: String| {
        if !v.is_empty() {
            println!("{k:<16}{v}");
        }
    };
    line("decision", s(d, "id").into());
    line("time", format!("{} UTC", utc(n(d, "time_ms"))));
    line("envoy", s(d, "instance").into());
    line("client", s(d, "client").into());
    line("address", s(d, "address").into());
    line("user agent tag", s(d, "agent").into());
    if !s(d, "session").is_empty() {
        line("credential", format!("{} hash {}", s(d, "credential"), s(d, "session")));
    }
    line("username hash", s(d, "username").into());
    line("endpoint", format!("{} {} (route group {})", s(d, "method"), s(d, "path"), d["route_group"].as_str().unwrap_or("-")));
    line("action", format!("{} ({} mode), status {}, risk {}", s(d, "action"), s(d, "mode"), n(d, "status"), d["risk"]));
    if n(d, "until_ms") > 0 {
        line("penalty until", format!("{} UTC", utc(n(d, "until_ms"))));
    }
    if n(r, "penalty_hits") > 0 {
        line("refused since", format!("{} requests by the penalty box, last {} UTC", n(r, "penalty_hits"), utc(n(r, "last_hit_ms"))));
    }
    println!("reasons");
    for reason in d["reasons"].as_array().into_iter().flatten() {
        let figure = if s(reason, "text").is_empty() {
            if s(reason, "what").is_empty() {
                "(no figure)".to_string()
            } else {
                format!("{} {} (limit {})", reason["value"], s(reason, "what"), reason["limit"])
            }
        } else {
            s(reason, "text").to_string()
        };
        println!("  - {}: {figure}", s(reason, "reason"));
    }
}

fn run_command(c: &Client, cmd: &CtlCommand, json: bool) -> Result<(), String> {
    let (value, print): (Value, fn(&Value)) = match cmd {
        CtlCommand::Decisions { command: DecisionsCommand::List { client, id, session, api_key, username, limit } } => {
            let mut q = vec![format!("limit={limit}")];
            for (k, v) in [("client", client), ("id", id), ("session", session), ("api_key", api_key), ("username", username)] {
                if let Some(v) = v {
                    q.push(format!("{k}={}", encode(&from_stdin(v)?)));
                }
            }
            let v = c.call("GET", &format!("/v1/decisions?{}", q.join("&")), None)?;
            (v, |v| {
                if let Some(st) = v.get("state").filter(|s| !s.is_null()) {
                    let until = n(st, "penalty_until_ms");
                    println!(
                        "{}: {}; risk {}; fleet block {}; lifted {}; allowed by {}",
                        s(st, "client"),
                        if until > 0 { format!("in the penalty box until {} UTC", utc(until)) } else { "not boxed".into() },
                        st["risk"],
                        if n(st, "fleet_block_until_ms") > 0 { utc(n(st, "fleet_block_until_ms")) } else { "none".into() },
                        st["lifted_at_ms"].as_u64().map_or_else(|| "never".into(), utc),
                        st["allowed_by"],
                    );
                }
                let records = v["decisions"].as_array().cloned().unwrap_or_default();
                if records.is_empty() {
                    println!("no decisions");
                }
                records.iter().for_each(print_record);
            })
        }
        CtlCommand::Explain { id } => (c.call("GET", &format!("/v1/decisions/{}", encode(id)), None)?, explain),
        CtlCommand::Unblock { client, quiet_s, reason, note } => {
            let path = format!(
                "/v1/decisions?client={}&quiet_s={quiet_s}&reason={}&note={}",
                encode(client),
                encode(&reason.join(",")),
                encode(note)
            );
            (c.call("DELETE", &path, None)?, |v| {
                let q = n(v, "quiet_until_ms");
                println!(
                    "lifted {} (every Envoy applies it at its next poll, cursor {}){}",
                    v["lifted"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")).unwrap_or_default(),
                    n(v, "cursor"),
                    if q > 0 { format!("; quiet until {} UTC", utc(q)) } else { String::new() }
                );
            })
        }
        CtlCommand::Allow { command: AllowCommand::Add { kind, value, ttl_s, note } } => {
            let body = serde_json::json!({ "kind": kind, "value": from_stdin(value)?, "ttl_s": ttl_s, "note": note });
            (c.call("POST", "/v1/allow", Some(&body))?, |v| {
                let e = &v["entry"];
                println!("added {}: {} {} until {} UTC", s(e, "id"), s(e, "kind"), s(e, "value"), utc(n(e, "until_ms")));
                if let Some(l) = v["lifted"].as_array().filter(|l| !l.is_empty()) {
                    println!("lifted {}", l.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "));
                }
            })
        }
        CtlCommand::Allow { command: AllowCommand::List } => (c.call("GET", "/v1/allow", None)?, |v| {
            let list = v["allows"].as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("no allow entries");
            }
            for e in list {
                println!("{}  {:<7} {:<40} until {}  by {}  {}", s(&e, "id"), s(&e, "kind"), s(&e, "value"), utc(n(&e, "until_ms")), s(&e, "author"), s(&e, "note"));
            }
        }),
        CtlCommand::Allow { command: AllowCommand::Remove { id, note } } => (
            c.call("DELETE", &format!("/v1/allow/{}?note={}", encode(id), encode(note)), None)?,
            |v| println!("removed {}", s(&v["removed"], "id")),
        ),
        CtlCommand::Audit { at, limit } => {
            let path = match at {
                Some(at) => format!("/v1/audit?at={at}"),
                None => format!("/v1/audit?limit={limit}"),
            };
            (c.call("GET", &path, None)?, |v| {
                if let Some(list) = v.get("allows").and_then(Value::as_array) {
                    println!("allow list at {} UTC{}:", utc(n(v, "at_ms")), if v["complete"] == true { "" } else { " (the audit log was trimmed: may be incomplete)" });
                    for e in list {
                        println!("  {}  {} {}  by {}  {}", s(e, "id"), s(e, "kind"), s(e, "value"), s(e, "author"), s(e, "note"));
                    }
                    return;
                }
                for r in v["records"].as_array().into_iter().flatten() {
                    let (what, detail) = r["change"]
                        .as_object()
                        .and_then(|o| o.iter().next())
                        .map(|(k, d)| (k.clone(), d.clone()))
                        .unwrap_or_default();
                    let detail = match what.as_str() {
                        "unblock" => format!("lifted {}", field(&detail, "labels")),
                        "allow_add" => {
                            let e = field(&detail, "entry");
                            format!("{} {} until {}", s(e, "kind"), s(e, "value"), utc(n(e, "until_ms")))
                        }
                        _ => String::new(),
                    };
                    println!("{} UTC  {:<12} {:<24} by {} from {}  {}  {}", utc(n(r, "at_ms")), what, s(r, "target"), s(r, "author"), s(r, "peer"), detail, s(r, "note"));
                }
            })
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
    } else {
        print(&value);
    }
    Ok(())
}

/// Runs one `ctl` command; the exit code says whether it worked.
pub fn run(ctl: &Ctl, token: Option<&str>) -> ExitCode {
    let client = Client {
        agent: ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(15)))
            .build()
            .into(),
        base: ctl.url.clone(),
        token: token.map(str::to_string),
        author: ctl.author.clone(),
    };
    match run_command(&client, &ctl.command, ctl.json) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("abuse-scorer ctl: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_encoded_and_times_readable() {
        assert_eq!(encode("203.0.113.7#1a2b3c4d"), "203.0.113.7%231a2b3c4d");
        assert_eq!(encode("a b&c=d"), "a%20b%26c%3Dd");
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_700_000_000_000), "2023-11-14 22:13:20");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00");
    }
}
