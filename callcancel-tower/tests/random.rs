//! Randomized cancels, resets and deadlines over 10^4 RPCs against two
//! servers (A relays to B): every server frees every call it started, no
//! call is left in flight, each cancel callback ran at most once per call.

mod common;

use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use common::*;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const RPCS: u64 = 10_000;
const TASKS: u64 = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_cancels_and_deadlines() {
    hard(async {
        let seed: u64 = std::env::var("SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed_cafe);
        let b = TestServer::start(Duration::from_secs(1), None).await;
        let a = TestServer::start(Duration::from_secs(1), Some(b.addr)).await;
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(a.client().await);
        }
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let mut c = clients[(t % 4) as usize].clone();
            let mut rng = Rng(seed ^ (t + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            tasks.push(tokio::spawn(async move {
                let mut ok = 0u64;
                for _ in 0..RPCS / TASKS {
                    let kind = rng.below(100);
                    let millis = rng.below(4);
                    let mut r = tonic::Request::new(WorkRequest { millis });
                    if rng.below(4) == 0 {
                        let d = 1 + rng.below(3);
                        r.metadata_mut()
                            .insert("grpc-timeout", format!("{d}m").parse().unwrap());
                    }
                    let drop_after =
                        (rng.below(5) == 0).then(|| Duration::from_micros(rng.below(3_000)));
                    let fut = async {
                        match kind {
                            0..=59 => c.work(r).await,
                            60..=79 => c.block(r).await,
                            _ => c.relay(r).await,
                        }
                    };
                    let res = match drop_after {
                        Some(d) => tokio::time::timeout(d, fut).await.ok(),
                        None => Some(fut.await),
                    };
                    if let Some(Ok(_)) = res {
                        ok += 1;
                    }
                }
                ok
            }));
        }
        let mut ok = 0;
        for t in tasks {
            ok += t.await.unwrap();
        }
        drop(clients);
        // A's connections are gone with its clients: no channel left on A
        // (B keeps A's downstream connection until A's demo is dropped).
        a.assert_drained().await;
        for s in [&a, &b] {
            s.assert_all_freed().await;
            wait_until(Duration::from_secs(5), || s.host.in_flight() == 0).await;
            let st = s.stats();
            let c = s.counters();
            let cancelled = st.cancelled_call
                + st.cancelled_deadline
                + st.cancelled_channel_faulted
                + st.cancelled_host_abort;
            assert_eq!(cancelled, c.callbacks.load(SeqCst), "{}", st.line());
            // A call may both reply OK and be cancelled afterwards (its
            // response dropped before it was sent): no sum bound.
            assert!(
                cancelled <= st.started && st.completed <= st.started,
                "{}",
                st.line()
            );
            assert_eq!(st.cancelled_host_abort, 0);
            eprintln!("{}", st.line());
        }
        let sa = a.stats();
        assert!(sa.started >= RPCS * 7 / 10, "{}", sa.line());
        assert!(ok >= RPCS / 2, "only {ok} RPCs succeeded");
        assert!(
            sa.cancelled_call > 0 && sa.cancelled_deadline > 0,
            "{}",
            sa.line()
        );
    })
    .await
}
