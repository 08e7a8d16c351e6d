//! Wall-clock time in ms since the epoch: verdicts carry absolute expiry
//! times (`until_ms`) that every filter and scorer compares against its own
//! clock, so this is the one time source, and everything below the HTTP
//! handlers takes `now_ms` as an argument to stay testable.

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
