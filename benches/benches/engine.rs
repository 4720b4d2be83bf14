//! The engine alone: an instant fake probe and the in-memory store. Measures the cost of
//! scheduling, running, counting and writing one check.
//!
//! `cargo bench -p fleet-benches --bench engine`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fleet_core::testing::{ScriptedProbe, healthy};
use fleet_core::{
    CancellationToken, HealthWork, InMemoryStore, NewServer, Registry, SystemClock, WorkerConfig,
    WorkerKind,
};

const SERVERS: usize = 5_000;

async fn one_cycle(store: Arc<InMemoryStore>) -> Duration {
    let probe = Arc::new(ScriptedProbe::new(healthy()));
    let config = WorkerConfig::builder(WorkerKind::Health)
        .interval(Duration::from_secs(3600))
        .batch_size(SERVERS)
        .batch_delay(Duration::ZERO)
        .max_in_flight(1024)
        .flush_interval(Duration::from_millis(1))
        .build()
        .expect("valid config");
    let cancel = CancellationToken::new();
    let started = Instant::now();
    let handle = HealthWork::new(store, probe)
        .worker(config, Arc::new(SystemClock))
        .spawn(cancel.clone());
    let stats = handle.stats().clone();
    loop {
        let s = stats.snapshot();
        if s.cycles == 1 && s.written == SERVERS as u64 {
            break;
        }
        tokio::task::yield_now().await;
    }
    let elapsed = started.elapsed();
    cancel.cancel();
    handle.stopped().await;
    elapsed
}

fn engine(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let store = rt.block_on(async {
        let store = Arc::new(InMemoryStore::with_history_limit(4));
        for i in 0..SERVERS {
            store
                .create_server(NewServer::new(format!("s{i:05}"), "http://127.0.0.1:9"))
                .await
                .expect("create");
        }
        store
    });
    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(SERVERS as u64));
    group.sample_size(20);
    group.bench_function("health cycle of 5000 instant checks (one thread)", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += rt.block_on(one_cycle(store.clone()));
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, engine);
criterion_main!(benches);
