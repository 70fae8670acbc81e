//! CPU cost of active health checks: 1,000 HTTP backends probed every second, measured as the
//! CPU time of the one thread that runs the checks (the backends run on other threads). The goal
//! is under 5% of one core.
//!
//! Run: `cargo bench --bench health` (about 12 seconds; `HEALTH_BACKENDS` and `HEALTH_SECONDS`
//! change the size and the length, `HEALTH_KIND=tcp` measures TCP connect checks).

use std::time::Duration;

use switchyard::backend::Registry;
use switchyard::config::{BackendConfig, HealthConfig, HealthKind, PoolConfig};
use switchyard::pool::Snapshot;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a pointer to a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn main() {
    let backends = env("HEALTH_BACKENDS", 1000);
    let seconds = env("HEALTH_SECONDS", 10) as u64;
    // Backends: a runtime of their own, answering every probe with 200.
    let servers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let addrs: Vec<_> = servers.block_on(async {
        let mut addrs = Vec::new();
        for _ in 0..backends {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            addrs.push(listener.local_addr().expect("addr"));
            tokio::spawn(async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        // Keep-alive, as most servers are: one answer per probe request.
                        let mut buf = [0u8; 512];
                        while let Ok(1..) = stream.read(&mut buf).await {
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if stream.write_all(answer).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            });
        }
        addrs
    });
    let mut config = PoolConfig::with_defaults(
        "bench",
        addrs
            .iter()
            .map(|&addr| BackendConfig {
                addr,
                weight: 1,
                backup: false,
                drain: false,
                max_connections: None,
            })
            .collect(),
    );
    let tcp = std::env::var("HEALTH_KIND").is_ok_and(|k| k == "tcp");
    config.health = Some(HealthConfig {
        kind: if tcp {
            HealthKind::Tcp
        } else {
            HealthKind::Http {
                path: "/healthz".into(),
                host: None,
                expect: vec![(200, 399)],
            }
        },
        interval: Duration::from_secs(1),
        timeout: Duration::from_millis(500),
        rise: 2,
        fall: 3,
    });
    let checks = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (cpu, wall, down) = checks.block_on(async {
        let registry = Registry::default();
        let mut pools = std::collections::BTreeMap::new();
        pools.insert("bench".to_owned(), config);
        let snapshot =
            Snapshot::from_pools(&pools, &registry, &switchyard::tls::TlsStore::default());
        let stop = CancellationToken::new();
        snapshot.activate(&stop);
        // One interval to get every prober going, then the measurement.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (cpu, wall) = (thread_cpu(), std::time::Instant::now());
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let result = (thread_cpu() - cpu, wall.elapsed());
        stop.cancel();
        let down = snapshot
            .pools
            .values()
            .flat_map(|p| p.candidates.iter())
            .filter(|c| !c.state.is_usable())
            .count();
        (result.0, result.1, down)
    });
    println!(
        "{backends} backends, {} checks every 1s, {seconds}s: {:.2}% of one core ({:?} CPU), {down} marked down",
        if tcp { "tcp" } else { "http" },
        cpu.as_secs_f64() / wall.as_secs_f64() * 100.0,
        cpu
    );
}
