//! `Volume` over `RbdStore` under load, with librbd's synchronous calls: QD threads, each with
//! one request in flight (what the daemon's blocking path does), for a fixed time. Driven by
//! benches/rbd/bench.sh beside `fio --ioengine=rbd`; not a test.
//!
//!   rbd_volume --conf C --client ID --pool P --image I --rw read|write|randread|randwrite|fill
//!              --bs BYTES --qd N --seconds S [--ramp S] [--create SIZE]
//!
//! `fill` writes every block once and exits.
//!
//! `--create SIZE` makes the image's volume header first (an existing image of at least
//! 1 MiB + SIZE bytes). Prints one line: `job MiB/s IOPS`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cryptvol::volume::rbd::{Cluster, ClusterConfig, RbdStore};
use cryptvol::volume::{CipherBackend, Volume, VolumeHeader, XtsKey};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    let need = |n: &str| arg(&args, n).unwrap_or_else(|| panic!("{n} is required"));
    let cfg = ClusterConfig::new(need("--conf"), need("--client"));
    let cluster = Cluster::connect(&cfg).expect("connect");
    let io = cluster.ioctx(&need("--pool")).expect("pool");
    let image = io.open(&need("--image")).expect("open image");
    image.lock_exclusive("bench").expect("lock");
    let store = RbdStore::new(image);
    if let Some(size) = arg(&args, "--create") {
        let size: u64 = size.parse().expect("--create SIZE in bytes");
        let h = VolumeHeader::new(uuid::Uuid::new_v4(), size, 4096, "bench", 1, vec![1; 100])
            .expect("header");
        Volume::create_with_store(&store, &h).expect("create volume");
    }
    let key: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(7).wrapping_add(1))
        .collect();
    let v = Arc::new(
        Volume::open_with_store(
            Box::new(store),
            XtsKey::new(&key).unwrap(),
            false,
            CipherBackend::AwsLc,
        )
        .expect("open volume"),
    );
    let rw = need("--rw");
    let bs: u64 = need("--bs").parse().unwrap();
    let qd: usize = need("--qd").parse().unwrap();
    let secs: f64 = need("--seconds").parse().unwrap();
    let ramp: f64 = arg(&args, "--ramp").map_or(0.0, |s| s.parse().unwrap());
    let blocks = v.size() / bs;
    let next = Arc::new(AtomicU64::new(0)); // sequential jobs share one cursor, like fio's
    let counting = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..qd)
        .map(|t| {
            let (v, next, counting, stop, done, rw) = (
                v.clone(),
                next.clone(),
                counting.clone(),
                stop.clone(),
                done.clone(),
                rw.clone(),
            );
            std::thread::spawn(move || {
                let mut buf = vec![0x5au8; bs as usize];
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t as u64 + 1);
                while !stop.load(Ordering::Relaxed) {
                    let block = if rw.starts_with("rand") {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x % blocks
                    } else if rw == "fill" {
                        let b = next.fetch_add(1, Ordering::Relaxed);
                        if b >= blocks {
                            break;
                        }
                        b
                    } else {
                        next.fetch_add(1, Ordering::Relaxed) % blocks
                    };
                    if rw.ends_with("write") || rw == "fill" {
                        buf.fill(block as u8 | 1);
                        v.write_mut(block * bs, &mut buf).expect("write");
                    } else {
                        v.read(block * bs, &mut buf).expect("read");
                    }
                    if counting.load(Ordering::Relaxed) {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    if rw == "fill" {
        // Writes every block once (so reads hit stored objects, not the object map).
        let t0 = Instant::now();
        for t in threads {
            t.join().unwrap();
        }
        println!(
            "fill {:.1} MiB/s",
            v.size() as f64 / t0.elapsed().as_secs_f64() / (1 << 20) as f64
        );
        return;
    }
    std::thread::sleep(Duration::from_secs_f64(ramp));
    counting.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let n = done.load(Ordering::Relaxed);
    let took = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    println!(
        "{rw}-{bs}-qd{qd} {:.1} MiB/s {:.0} IOPS",
        (n * bs) as f64 / took / (1 << 20) as f64,
        n as f64 / took
    );
}
