//! A constant-rate HTTP/1.1 load generator for `make bench` (Debian has no
//! wrk2; wrk's paced mode waits for each answer before the next request, so
//! a slow answer hides the requests that should have gone out meanwhile).
//!
//! Request `i` is due at `start + i / rate`, whatever happened before; its
//! latency is measured from that due time, not from when it was sent (the
//! coordinated-omission correction of wrk2). Connection `k` of `C` sends
//! requests `k, k + C, k + 2C, ...`, one at a time, so a stalled answer
//! delays the connection's next requests and their waiting counts.
//!
//! Requests spread over 10,000 client addresses (`x-forwarded-for`
//! 10.1.x.y), as bench/run.py's wrk script does. Prints one JSON object.

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

#[derive(Parser, Debug, Clone)]
#[command(about = "Constant-rate HTTP/1.1 load, latency corrected for coordinated omission")]
struct Args {
    /// Target address, e.g. 127.0.0.1:10000.
    #[arg(long)]
    addr: SocketAddr,
    /// Requests per second asked.
    #[arg(long)]
    rate: f64,
    /// Seconds of load in all (warm-up included).
    #[arg(long, default_value_t = 8.0)]
    seconds: f64,
    /// Leading seconds not recorded.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    #[arg(long, default_value_t = 32)]
    connections: usize,
    #[arg(long, default_value = "/direct")]
    path: String,
}

/// At most this many requests per run (bounds the latency buffers).
const MAX_REQUESTS: f64 = 20_000_000.0;

#[derive(Default)]
struct Tally {
    /// Latencies of recorded requests, µs from their due time.
    latencies_us: Vec<u32>,
    non_2xx: u64,
    errors: u64,
    last_done: Option<Instant>,
    /// Answers received, warm-up included (for CPU per request).
    answered: u64,
}

/// Waits for `due` to 1 ms with the timer, then to the microsecond by
/// yielding (tokio's timer has a 1 ms grain: sleeping alone would send
/// requests in 1 ms bursts).
async fn wait_until(due: Instant) {
    loop {
        let now = Instant::now();
        if now >= due {
            return;
        }
        let left = due.saturating_duration_since(now);
        if left > Duration::from_millis(2) {
            tokio::time::sleep(left.saturating_sub(Duration::from_millis(1))).await;
        } else {
            tokio::task::yield_now().await;
        }
    }
}

async fn connect(addr: SocketAddr) -> Option<http1::SendRequest<Empty<Bytes>>> {
    let stream = TcpStream::connect(addr).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.ok()?;
    tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    Some(sender)
}

async fn connection(args: Args, k: usize, start: Instant, total: u64) -> Tally {
    let mut tally = Tally::default();
    let period = 1.0 / args.rate;
    let record_from = start + Duration::from_secs_f64(args.warmup);
    let mut sender = None;
    let mut i = k as u64;
    while i < total {
        let due = start + Duration::from_secs_f64(i as f64 * period);
        wait_until(due).await;
        if sender.is_none() {
            sender = connect(args.addr).await;
        }
        let c = i % 10_000;
        let ok = match sender.as_mut() {
            Some(s) => {
                let request = hyper::Request::get(args.path.as_str())
                    .header("host", "bench")
                    .header("x-forwarded-for", format!("10.1.{}.{}", c / 256, c % 256))
                    .body(Empty::<Bytes>::new());
                match request {
                    Ok(req) => match s.send_request(req).await {
                        Ok(resp) => {
                            let status = resp.status();
                            // The whole body, so the connection can be reused.
                            let body = resp.into_body().collect().await;
                            body.is_ok().then_some(status.is_success())
                        }
                        Err(_) => None,
                    },
                    Err(_) => None,
                }
            }
            None => None,
        };
        let done = Instant::now();
        if ok.is_some() {
            tally.answered += 1;
        }
        if due >= record_from {
            match ok {
                Some(success) => {
                    let us = done.saturating_duration_since(due).as_micros();
                    tally.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                    if !success {
                        tally.non_2xx += 1;
                    }
                    tally.last_done = Some(done);
                }
                None => tally.errors += 1,
            }
        }
        if ok.is_none() {
            sender = None;
        }
        i += args.connections as u64;
    }
    tally
}

fn percentile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted.get(rank - 1).copied().unwrap_or(0)
}

fn main() {
    let args = Args::parse();
    if !(args.rate > 0.0 && args.seconds > args.warmup && args.warmup >= 0.0 && args.connections > 0) {
        eprintln!("loadgen: need rate > 0, seconds > warmup >= 0, connections > 0");
        std::process::exit(2);
    }
    let total = (args.rate * args.seconds).min(MAX_REQUESTS) as u64;
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(1);
        }
    };
    let local = tokio::task::LocalSet::new();
    let tallies = local.block_on(&runtime, async {
        // Connections open before the clock starts.
        let start = Instant::now() + Duration::from_millis(200);
        let handles: Vec<_> = (0..args.connections)
            .map(|k| tokio::task::spawn_local(connection(args.clone(), k, start, total)))
            .collect();
        let mut tallies = Vec::new();
        for h in handles {
            if let Ok(t) = h.await {
                tallies.push(t);
            }
        }
        (start, tallies)
    });
    let (start, tallies) = tallies;
    let mut all: Vec<u32> = Vec::new();
    let (mut non_2xx, mut errors, mut last, mut answered) = (0u64, 0u64, None::<Instant>, 0u64);
    for t in tallies {
        answered += t.answered;
        all.extend_from_slice(&t.latencies_us);
        non_2xx += t.non_2xx;
        errors += t.errors;
        last = last.max(t.last_done);
    }
    all.sort_unstable();
    let measured_from = start + Duration::from_secs_f64(args.warmup);
    // Achieved: answers over the time they took to come (a server that
    // cannot keep up finishes late, and its rate shows it).
    let window = last
        .map(|l| l.saturating_duration_since(measured_from).as_secs_f64())
        .unwrap_or(0.0)
        .max(args.seconds - args.warmup);
    let achieved = if window > 0.0 { all.len() as f64 / window } else { 0.0 };
    println!(
        "{{\"asked_rps\": {:.1}, \"achieved_rps\": {:.1}, \"answers\": {}, \"answered_all\": {}, \"non_2xx\": {}, \"errors\": {}, \
         \"p50_us\": {}, \"p90_us\": {}, \"p99_us\": {}, \"p999_us\": {}, \"max_us\": {}}}",
        args.rate,
        achieved,
        all.len(),
        answered,
        non_2xx,
        errors,
        percentile(&all, 0.50),
        percentile(&all, 0.90),
        percentile(&all, 0.99),
        percentile(&all, 0.999),
        all.last().copied().unwrap_or(0),
    );
}
