//! Cost per packet of the firewall on each verdict path, beside a program that only returns
//! XDP_PASS (the floor), measured in the same run through BPF_PROG_TEST_RUN with a large
//! repeat count. Rounds interleave the programs; medians are reported as JSON lines and a
//! table. Run as root: `bench/xdp` (or `cargo run --release -p flynn-xdp --example xdp_bench`).

#[path = "../tests/packets/mod.rs"]
mod packets;

use flynn_xdp::{Firewall, Policy};
use packets::*;

const REPEAT: u32 = 1_000_000;
const ROUNDS: usize = 7;

fn main() {
    let mut fw = Firewall::load().expect("load the firewall (root and a BPF-capable kernel)");
    fw.set_policy(&Policy {
        internal_prefixes: Policy::parse_prefixes("10.0.0.0/8,fd00::/8").unwrap(),
        // No SYN limit here: a bucket that empties would turn the allowed path into the
        // flood-drop path half-way through the repeats.
        syn_rate: 0,
        udp_reply_secs: 3600,
        ..Policy::default()
    })
    .expect("policy");
    let mut query = V4::from([10, 9, 9, 1]);
    query.dst = OUTSIDE;
    fw.test_egress(&eth4(&query.packet(17, &udp(41000, 53, b"q"))))
        .expect("egress");
    let tcp4 = |src, port, flags| eth4(&V4::from(src).packet(6, &tcp(40000, port, flags)));
    let hop = (0u8, vec![0u8; 6]);
    let mut later = V4::from(OUTSIDE);
    later.frag_offset = 100;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("internal_source_pass", tcp4([10, 1, 2, 3], 22, SYN)),
        ("tcp_syn_allowed_pass", tcp4(OUTSIDE, 443, SYN)),
        ("tcp_established_pass", tcp4(OUTSIDE, 443, ACK)),
        ("tcp_syn_closed_drop", tcp4(OUTSIDE, 22, SYN)),
        (
            "udp_closed_drop",
            eth4(&V4::from(OUTSIDE).packet(17, &udp(53, 5353, b"x"))),
        ),
        // A reply to the host's own query: the reply-flow table (a set of 4 ways).
        (
            "udp_reply_pass",
            eth4(&V4::from(OUTSIDE).packet(17, &udp(53, 41000, b"x"))),
        ),
        (
            "icmp_error_pass",
            eth4(&V4::from(OUTSIDE).packet(1, &icmp(3))),
        ),
        (
            "ipv6_ext_tcp_pass",
            eth6(&v6(OUTSIDE6, &[hop], 6, &tcp(1, 80, SYN))),
        ),
        (
            "vlan_tcp_drop",
            eth(
                0x0800,
                &[0x8100],
                &V4::from(OUTSIDE).packet(6, &tcp(1, 22, SYN)),
            ),
        ),
        ("fragment_pass", eth4(&later.packet(17, &[0u8; 64]))),
        ("truncated_drop", tcp4(OUTSIDE, 443, SYN)[..40].to_vec()),
    ];
    let mut rows = Vec::new();
    for (name, frame) in &cases {
        rows.push(run_case(&fw, name, frame));
    }
    // New connections under the per-source SYN limit, with a rate no run can exhaust.
    fw.set_policy(&Policy {
        internal_prefixes: Policy::parse_prefixes("10.0.0.0/8,fd00::/8").unwrap(),
        syn_rate: 1_000_000_000,
        syn_burst: 1_000_000,
        udp_reply_secs: 3600,
        ..Policy::default()
    })
    .expect("policy");
    rows.push(run_case(
        &fw,
        "tcp_syn_limited_pass",
        &tcp4(OUTSIDE, 443, SYN),
    ));
    // A flow pushed out of its reply-table set by newer flows: its replies are answered by
    // the flow map (hash of the 20-byte key, coarse clock). Rare by design, priced here.
    for other in colliding_remotes(OUTSIDE, 53, 41000, flynn_xdp_common::FLOW_WAYS) {
        let mut q = V4::from([10, 9, 9, 1]);
        q.dst = other;
        fw.test_egress(&eth4(&q.packet(17, &udp(41000, 53, b"q"))))
            .expect("egress");
    }
    let reply = eth4(&V4::from(OUTSIDE).packet(17, &udp(53, 41000, b"x")));
    rows.push(run_case(&fw, "udp_reply_evicted_pass", &reply));
    println!();
    println!("| path | firewall ns/pkt | XDP_PASS floor ns/pkt | ratio |");
    println!("|---|---|---|---|");
    for (name, f, p) in rows {
        println!("| {name} | {f:.1} | {p:.1} | {:.2} |", f / p);
    }
}

/// The firewall and the floor on one frame, interleaved over [`ROUNDS`]: medians in ns.
fn run_case(fw: &Firewall, name: &str, frame: &[u8]) -> (String, f64, f64) {
    let ns = |prog: &str| {
        fw.test_run(prog, frame, REPEAT)
            .expect("test run")
            .1
            .as_nanos() as f64
    };
    let (mut fwv, mut floor) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        floor.push(ns("flynn_pass"));
        fwv.push(ns("flynn_firewall"));
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (f, p) = (med(fwv), med(floor));
    println!(
        "{{\"case\":\"{name}\",\"repeat\":{REPEAT},\"rounds\":{ROUNDS},\"firewall_ns\":{f:.1},\"floor_ns\":{p:.1},\"ratio\":{:.2}}}",
        f / p
    );
    (name.to_string(), f, p)
}
