//! Cost of one `allow`/`deny` check, by list length: the lists are searched, not scanned, so
//! ten thousand networks should cost little more than ten.
//!
//! Run: `cargo bench --bench access`

use std::net::{IpAddr, Ipv4Addr};

use divan::{Bencher, black_box};
use ipnet::{IpNet, Ipv4Net};
use switchyard::access::AccessList;

fn main() {
    divan::main();
}

/// `n` disjoint /24 networks inside 10.0.0.0/8 (every other one, so none merge).
fn networks(n: u32) -> Vec<IpNet> {
    (0..n)
        .map(|i| {
            let base = Ipv4Addr::from(0x0a00_0000 | ((i * 2) << 8));
            IpNet::V4(Ipv4Net::new(base, 24).expect("prefix"))
        })
        .collect()
}

/// Client addresses spread over the denied and the free networks alike.
fn clients() -> Vec<IpAddr> {
    (0..1024u32)
        .map(|i| {
            IpAddr::V4(Ipv4Addr::from(
                0x0a00_0000 | (i.wrapping_mul(2_654_435_761) >> 8),
            ))
        })
        .collect()
}

#[divan::bench]
fn no_lists(bencher: Bencher) {
    let list = AccessList::new(&[], &[]);
    let clients = clients();
    let mut i = 0;
    bencher.bench_local(|| {
        i = (i + 1) & 1023;
        black_box(&list).permits(clients[i])
    });
}

#[divan::bench(args = [10, 1_000, 10_000])]
fn deny_list(bencher: Bencher, n: u32) {
    let list = AccessList::new(&[], &networks(n));
    let clients = clients();
    let mut i = 0;
    bencher.bench_local(|| {
        i = (i + 1) & 1023;
        black_box(&list).permits(clients[i])
    });
}
