//! The real program, verified and run by the kernel (BPF_PROG_TEST_RUN) over crafted frames.
//! Needs root (CAP_BPF); every case loads its own instance, so maps are not shared.

mod packets;

use flynn_xdp::{Firewall, Policy, XDP_DROP, XDP_PASS};
use packets::*;

const TCP: u8 = 6;
const UDP: u8 = 17;

fn fw() -> Firewall {
    Firewall::load().expect("load firewall (needs root and a BPF-capable kernel)")
}

fn verdict(fw: &Firewall, frame: &[u8]) -> u32 {
    fw.test_run("flynn_firewall", frame, 1).expect("test run").0
}

fn syn4(src: [u8; 4], port: u16) -> Vec<u8> {
    eth4(&V4::from(src).packet(TCP, &tcp(40000, port, SYN)))
}

fn counter(fw: &Firewall, reason: &str, verdict: &str) -> u64 {
    fw.counters()
        .unwrap()
        .iter()
        .filter(|r| r.reason == reason && r.verdict == verdict)
        .map(|r| r.packets)
        .sum()
}

#[test]
fn t10_default_policy_opens_80_443_and_tcp_route_range_only() {
    let fw = fw();
    for port in [80, 443, 3000, 3250, 3500] {
        assert_eq!(verdict(&fw, &syn4(OUTSIDE, port)), XDP_PASS, "port {port}");
    }
    for port in [22, 5432, 8080, 2999, 3501, 1] {
        assert_eq!(verdict(&fw, &syn4(OUTSIDE, port)), XDP_DROP, "port {port}");
    }
    // IPv6 alike.
    let syn6 = |port| eth6(&v6(OUTSIDE6, &[], TCP, &tcp(40000, port, SYN)));
    assert_eq!(verdict(&fw, &syn6(443)), XDP_PASS);
    assert_eq!(verdict(&fw, &syn6(22)), XDP_DROP);
}

#[test]
fn t11_established_flows_and_replies_pass() {
    let fw = fw();
    let seg = |flags| eth4(&V4::from(OUTSIDE).packet(TCP, &tcp(22, 41000, flags)));
    assert_eq!(
        verdict(&fw, &seg(ACK)),
        XDP_PASS,
        "ACK of an established flow"
    );
    assert_eq!(
        verdict(&fw, &seg(SYN | ACK)),
        XDP_PASS,
        "SYN-ACK answering our connect"
    );
    assert_eq!(verdict(&fw, &seg(SYN)), XDP_DROP, "new connection to 41000");
}

#[test]
fn t12_internal_sources_reach_everything() {
    let mut fw = fw();
    fw.set_policy(&Policy {
        internal_prefixes: Policy::parse_prefixes("10.9.0.0/16,fd00:1::/32").unwrap(),
        ..Policy::default()
    })
    .unwrap();
    assert_eq!(verdict(&fw, &syn4([10, 9, 3, 4], 22)), XDP_PASS);
    assert_eq!(
        verdict(&fw, &syn4([10, 8, 3, 4], 22)),
        XDP_DROP,
        "outside the /16"
    );
    let inside6 = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
    let udp6 = eth6(&v6(inside6, &[], UDP, &udp(5000, 5432, b"x")));
    assert_eq!(verdict(&fw, &udp6), XDP_PASS);
    // Removing the prefix takes effect without reattaching.
    fw.set_policy(&Policy::default()).unwrap();
    assert_eq!(verdict(&fw, &syn4([10, 9, 3, 4], 22)), XDP_DROP);
}

#[test]
fn t13_udp_is_closed_except_replies_to_our_own_traffic() {
    let fw = fw();
    let reply = |sport| eth4(&V4::from(OUTSIDE).packet(UDP, &udp(sport, 53124, b"answer")));
    assert_eq!(verdict(&fw, &reply(53)), XDP_DROP, "no query was sent yet");
    // The host sends a DNS-style query from 53124 to OUTSIDE:53 (seen by the egress program).
    let mut query = V4::from([10, 9, 9, 1]);
    query.dst = OUTSIDE;
    fw.test_egress(&eth4(&query.packet(UDP, &udp(53124, 53, b"question"))))
        .unwrap();
    assert_eq!(verdict(&fw, &reply(53)), XDP_PASS, "the reply");
    assert_eq!(verdict(&fw, &reply(54)), XDP_DROP, "same host, other port");
    let other = eth4(&V4::from([198, 51, 100, 1]).packet(UDP, &udp(53, 53124, b"spoof")));
    assert_eq!(verdict(&fw, &other), XDP_DROP, "other host");
    assert_eq!(counter(&fw, "udp_reply", "pass"), 1);
    assert_eq!(counter(&fw, "udp_port", "drop"), 3);
}

#[test]
fn t14_icmp_errors_pass_echo_is_a_switch() {
    let mut fw = fw();
    let icmp4 = |ty| eth4(&V4::from(OUTSIDE).packet(1, &icmp(ty)));
    let icmp6 = |ty| eth6(&v6(OUTSIDE6, &[], 58, &icmp(ty)));
    for ty in [0, 3, 11, 12] {
        assert_eq!(verdict(&fw, &icmp4(ty)), XDP_PASS, "icmp type {ty}");
    }
    assert_eq!(verdict(&fw, &icmp4(13)), XDP_DROP, "timestamp request");
    for ty in [1, 2, 3, 4, 129, 133, 134, 135, 136, 143] {
        assert_eq!(verdict(&fw, &icmp6(ty)), XDP_PASS, "icmpv6 type {ty}");
    }
    assert_eq!(verdict(&fw, &icmp4(8)), XDP_PASS, "echo allowed by default");
    assert_eq!(verdict(&fw, &icmp6(128)), XDP_PASS);
    fw.set_policy(&Policy {
        allow_echo: false,
        ..Policy::default()
    })
    .unwrap();
    assert_eq!(verdict(&fw, &icmp4(8)), XDP_DROP);
    assert_eq!(verdict(&fw, &icmp6(128)), XDP_DROP);
    assert_eq!(verdict(&fw, &icmp4(3)), XDP_PASS, "PMTUD still works");
    // ICMPv4 inside IPv6 (and the reverse) is not ICMP: dropped as an unknown protocol.
    assert_eq!(
        verdict(&fw, &eth6(&v6(OUTSIDE6, &[], 1, &icmp(0)))),
        XDP_DROP
    );
}

#[test]
fn t15_vlan_and_qinq_are_parsed() {
    let fw = fw();
    let ip = |port| V4::from(OUTSIDE).packet(TCP, &tcp(40000, port, SYN));
    for tags in [&[0x8100u16][..], &[0x88a8, 0x8100]] {
        assert_eq!(
            verdict(&fw, &eth(0x0800, tags, &ip(80))),
            XDP_PASS,
            "{tags:x?}"
        );
        assert_eq!(
            verdict(&fw, &eth(0x0800, tags, &ip(22))),
            XDP_DROP,
            "{tags:x?}"
        );
    }
    // ARP passes, tagged or not.
    assert_eq!(verdict(&fw, &eth(0x0806, &[0x8100], &[0u8; 28])), XDP_PASS);
}

#[test]
fn t16_ipv4_options_are_skipped() {
    let fw = fw();
    for words in 1..=10 {
        let mut h = V4::from(OUTSIDE);
        h.options = vec![1; words * 4]; // NOPs
        assert_eq!(
            verdict(&fw, &eth4(&h.packet(TCP, &tcp(1, 443, SYN)))),
            XDP_PASS,
            "{words}"
        );
        assert_eq!(
            verdict(&fw, &eth4(&h.packet(TCP, &tcp(1, 22, SYN)))),
            XDP_DROP,
            "{words}"
        );
    }
    // IHL below 5 is malformed.
    let mut bad = V4::from(OUTSIDE).packet(TCP, &tcp(1, 443, SYN));
    bad[0] = 0x44;
    assert_eq!(verdict(&fw, &eth4(&bad)), XDP_DROP);
    assert!(counter(&fw, "malformed", "drop") >= 1);
}

#[test]
fn t17_ipv6_extension_headers_are_walked_and_bounded() {
    let fw = fw();
    let hop = (0u8, vec![0u8; 6]);
    let dst = (60u8, vec![0u8; 14]);
    let routing = (43u8, vec![0u8; 6]);
    let ah = (51u8, vec![0u8; 10]);
    let chain = [hop.clone(), dst.clone(), routing.clone(), ah.clone()];
    let pkt = |ext: &[(u8, Vec<u8>)], port| eth6(&v6(OUTSIDE6, ext, TCP, &tcp(1, port, SYN)));
    assert_eq!(verdict(&fw, &pkt(&chain, 80)), XDP_PASS);
    assert_eq!(verdict(&fw, &pkt(&chain, 22)), XDP_DROP);
    // Six extension headers are walked; a seventh is refused as malformed.
    let six: Vec<_> = (0..6).map(|_| dst.clone()).collect();
    assert_eq!(verdict(&fw, &pkt(&six, 80)), XDP_PASS);
    let seven: Vec<_> = (0..7).map(|_| dst.clone()).collect();
    let before = counter(&fw, "malformed", "drop");
    assert_eq!(verdict(&fw, &pkt(&seven, 80)), XDP_DROP);
    assert_eq!(counter(&fw, "malformed", "drop"), before + 1);
}

#[test]
fn t18_fragments_follow_the_documented_policy() {
    let mut fw = fw();
    // First fragment (offset 0, more-fragments): carries the ports, filtered like any packet.
    let mut first = V4::from(OUTSIDE);
    first.more_fragments = true;
    assert_eq!(
        verdict(&fw, &eth4(&first.packet(TCP, &tcp(1, 22, SYN)))),
        XDP_DROP
    );
    assert_eq!(
        verdict(&fw, &eth4(&first.packet(TCP, &tcp(1, 80, SYN)))),
        XDP_PASS
    );
    // Later fragments carry no ports: passed by default (useless without the first).
    let mut later = V4::from(OUTSIDE);
    later.frag_offset = 185;
    let later = eth4(&later.packet(UDP, &[0u8; 64]));
    let frag6 = |offset: u16| {
        let mut body = vec![0u8; 6];
        body[0..2].copy_from_slice(&(offset << 3).to_be_bytes());
        eth6(&v6(OUTSIDE6, &[(44, body)], UDP, &[0u8; 64]))
    };
    assert_eq!(verdict(&fw, &later), XDP_PASS);
    assert_eq!(verdict(&fw, &frag6(100)), XDP_PASS);
    // An IPv6 first fragment (offset 0) is filtered by its ports.
    assert_eq!(verdict(&fw, &frag6(0)), XDP_DROP, "UDP 0 closed");
    fw.set_policy(&Policy {
        pass_fragments: false,
        ..Policy::default()
    })
    .unwrap();
    assert_eq!(verdict(&fw, &later), XDP_DROP);
    assert_eq!(verdict(&fw, &frag6(100)), XDP_DROP);
    assert_eq!(counter(&fw, "fragment", "drop"), 2);
}

#[test]
fn t19_truncated_at_every_offset_is_dropped_never_misread() {
    let fw = fw();
    let hop = (0u8, vec![0u8; 6]);
    let mut opts = V4::from(OUTSIDE);
    opts.options = vec![1; 8];
    let frames = [
        syn4(OUTSIDE, 80),
        eth4(&opts.packet(TCP, &tcp(1, 443, SYN))),
        eth(
            0x0800,
            &[0x8100, 0x8100],
            &V4::from(OUTSIDE).packet(TCP, &tcp(1, 80, SYN)),
        ),
        eth6(&v6(OUTSIDE6, &[hop], TCP, &tcp(1, 443, SYN))),
        eth4(&V4::from(OUTSIDE).packet(1, &icmp(0))),
    ];
    for frame in &frames {
        assert_eq!(verdict(&fw, frame), XDP_PASS, "the whole frame passes");
        // The kernel hands XDP at least an Ethernet header. A cut at or before the last
        // byte the verdict reads must drop; any later cut reads the same verdict.
        let last = last_needed(frame);
        for cut in 14..frame.len() {
            let v = fw
                .test_run("flynn_firewall", &frame[..cut], 1)
                .unwrap_or_else(|e| panic!("cut at {cut}: {e}"))
                .0;
            let want = if cut <= last { XDP_DROP } else { XDP_PASS };
            assert_eq!(
                v,
                want,
                "cut at {cut} of {} (last needed byte {last})",
                frame.len()
            );
        }
    }
}

/// The offset of the last byte the verdict reads: the TCP flags byte (13 into TCP) or the
/// ICMP checksum's last byte (type, code and checksum are read together).
fn last_needed(frame: &[u8]) -> usize {
    let mut off = 12;
    let mut ethertype = u16::from_be_bytes([frame[off], frame[off + 1]]);
    off = 14;
    while ethertype == 0x8100 || ethertype == 0x88a8 {
        ethertype = u16::from_be_bytes([frame[off + 2], frame[off + 3]]);
        off += 4;
    }
    let (proto, l4) = if ethertype == 0x0800 {
        (frame[off + 9], off + (frame[off] as usize & 0xf) * 4)
    } else {
        // one hop-by-hop header in these frames when next header is 0
        let next = frame[off + 6];
        if next == 0 {
            (
                frame[off + 40],
                off + 40 + (frame[off + 41] as usize + 1) * 8,
            )
        } else {
            (next, off + 40)
        }
    };
    match proto {
        6 => l4 + 13,
        _ => l4 + 3,
    }
}

#[test]
fn t20_syn_flood_from_one_source_is_cut_others_still_connect() {
    let mut fw = fw();
    fw.set_policy(&Policy {
        syn_rate: 5,
        syn_burst: 20,
        ..Policy::default()
    })
    .unwrap();
    let flood = syn4(OUTSIDE, 443);
    let passed = (0..200)
        .filter(|_| verdict(&fw, &flood) == XDP_PASS)
        .count();
    // The burst, plus at most a few tokens refilled while the loop ran.
    assert!((20..=30).contains(&passed), "{passed} of 200 SYNs passed");
    assert!(counter(&fw, "syn_flood", "drop") >= 170);
    assert_eq!(
        verdict(&fw, &syn4([198, 51, 100, 9], 443)),
        XDP_PASS,
        "another source"
    );
    // ACKs of the flooder's established flows are not rate limited.
    let ack = eth4(&V4::from(OUTSIDE).packet(TCP, &tcp(40000, 443, ACK)));
    assert_eq!(verdict(&fw, &ack), XDP_PASS);
}

/// Sources that share the flooder's bucket set come and go (more than the set holds), and
/// the flooder stays cut off: a newcomer takes the fullest bucket, never an emptied one, so
/// rotating sources through a set cannot hand the flooder a fresh burst.
#[test]
fn t20b_new_sources_never_take_a_flooders_empty_bucket() {
    let mut fw = fw();
    fw.set_policy(&Policy {
        syn_rate: 1,
        syn_burst: 10,
        ..Policy::default()
    })
    .unwrap();
    let neighbours = same_set(OUTSIDE, 198, 3 * flynn_xdp_common::SYN_WAYS, |a| {
        flynn_xdp_common::source_set(&flynn_xdp_common::addr_words(&v4_mapped(a)), fw.syn_seed())
    });
    let passed = (0..50)
        .filter(|_| verdict(&fw, &syn4(OUTSIDE, 443)) == XDP_PASS)
        .count();
    assert!((10..=12).contains(&passed), "{passed} of 50 SYNs passed");
    for &n in &neighbours {
        assert_eq!(verdict(&fw, &syn4(n, 443)), XDP_PASS, "a new source {n:?}");
    }
    assert_eq!(
        verdict(&fw, &syn4(OUTSIDE, 443)),
        XDP_DROP,
        "the flooder is still out of tokens"
    );
}

#[test]
fn t21_counters_match_the_traffic_by_reason_class_and_bytes() {
    let fw = fw();
    let a = syn4(OUTSIDE, 80);
    let b = syn4(OUTSIDE, 22);
    for _ in 0..3 {
        verdict(&fw, &a);
    }
    for _ in 0..2 {
        verdict(&fw, &b);
    }
    let rows = fw.counters().unwrap();
    let http = rows
        .iter()
        .find(|r| r.reason == "tcp_allowed" && r.port_class == "http")
        .expect("http row");
    assert_eq!((http.packets, http.bytes), (3, 3 * a.len() as u64));
    let other = rows
        .iter()
        .find(|r| r.reason == "tcp_port" && r.port_class == "other")
        .expect("other row");
    assert_eq!((other.packets, other.verdict), (2, "drop"));
    let text = fw.prometheus().unwrap();
    assert!(text.contains(
        "flynn_firewall_packets_total{verdict=\"pass\",reason=\"tcp_allowed\",port_class=\"http\"} 3"
    ));
}

#[test]
fn t22_policy_changes_apply_without_reattach() {
    let mut fw = fw();
    fw.set_policy(&Policy {
        tcp_ports: Policy::parse_ports("8080").unwrap(),
        ..Policy::default()
    })
    .unwrap();
    assert_eq!(verdict(&fw, &syn4(OUTSIDE, 80)), XDP_DROP);
    assert_eq!(verdict(&fw, &syn4(OUTSIDE, 8080)), XDP_PASS);
}

#[test]
fn t23_many_internal_prefixes_use_the_lpm_tries() {
    let mut fw = fw();
    // More than fit inline (16 IPv4): the program switches to the LPM tries.
    let many: Vec<String> = (0..40).map(|i| format!("10.{i}.0.0/16")).collect();
    fw.set_policy(&Policy {
        internal_prefixes: Policy::parse_prefixes(&many.join(",")).unwrap(),
        ..Policy::default()
    })
    .unwrap();
    assert_eq!(
        verdict(&fw, &syn4([10, 39, 1, 1], 22)),
        XDP_PASS,
        "last prefix"
    );
    assert_eq!(
        verdict(&fw, &syn4([10, 40, 1, 1], 22)),
        XDP_DROP,
        "just outside"
    );
    // Back to a few: inline again, and the removed ones are gone from the tries too.
    fw.set_policy(&Policy {
        internal_prefixes: Policy::parse_prefixes("10.39.0.0/16").unwrap(),
        ..Policy::default()
    })
    .unwrap();
    assert_eq!(verdict(&fw, &syn4([10, 39, 1, 1], 22)), XDP_PASS);
    assert_eq!(verdict(&fw, &syn4([10, 3, 1, 1], 22)), XDP_DROP);
}

/// A throwaway interface for attach tests, removed on drop: a bridge device, which has no
/// native XDP support (the dummy driver is not always built).
struct Dummy(String);

impl Dummy {
    fn new() -> Self {
        let name = format!("flxbr{}", std::process::id() % 100_000);
        let ip = |args: &[&str]| {
            std::process::Command::new("ip")
                .args(args)
                .status()
                .unwrap()
        };
        let _ = ip(&["link", "del", &name]);
        assert!(ip(&["link", "add", &name, "type", "bridge"]).success());
        assert!(ip(&["link", "set", &name, "up"]).success());
        Dummy(name)
    }
}

impl Drop for Dummy {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.0])
            .status();
    }
}

#[test]
fn t24_no_driver_support_falls_back_to_generic_mode_and_detaches() {
    // A bridge has no native XDP: attaching must fall back to generic (skb) mode.
    let dummy = Dummy::new();
    let mut fw = fw();
    let mode = fw.attach(&dummy.0).expect("attach");
    assert_eq!(mode, flynn_xdp::Mode::Generic);
    assert_eq!(
        fw.interfaces(),
        vec![(dummy.0.clone(), flynn_xdp::Mode::Generic)]
    );
    let shown = std::process::Command::new("ip")
        .args(["link", "show", &dummy.0])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&shown.stdout).contains("xdpgeneric"));
    fw.detach_all();
    let shown = std::process::Command::new("ip")
        .args(["link", "show", &dummy.0])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&shown.stdout).contains("xdp"),
        "still attached"
    );
    // An interface that does not exist is a clear error, not a panic.
    let err = fw.attach("no-such-if0").unwrap_err().to_string();
    assert!(err.contains("no-such-if0"), "{err}");
}

/// Replies pass from the reply-flow table, which counts the window in jiffies: they stop
/// when the window closes, and a new query opens it again.
#[test]
fn t25_reply_flows_expire_with_the_window() {
    let mut fw = fw();
    assert!(
        [100, 250, 300, 1000].contains(&fw.hz()),
        "measured HZ {}",
        fw.hz()
    );
    fw.set_policy(&Policy {
        udp_reply_secs: 2,
        ..Policy::default()
    })
    .unwrap();
    let reply = |sport| eth4(&V4::from(OUTSIDE).packet(UDP, &udp(sport, 53125, b"answer")));
    let mut query = V4::from([10, 9, 9, 1]);
    query.dst = OUTSIDE;
    let send_query = || {
        fw.test_egress(&eth4(&query.packet(UDP, &udp(53125, 53, b"question"))))
            .unwrap()
    };
    send_query();
    assert_eq!(verdict(&fw, &reply(53)), XDP_PASS);
    // Only the flow itself: same host, other ports stay closed.
    assert_eq!(verdict(&fw, &reply(54)), XDP_DROP);
    std::thread::sleep(std::time::Duration::from_millis(1_000));
    assert_eq!(verdict(&fw, &reply(53)), XDP_PASS, "inside the window");
    std::thread::sleep(std::time::Duration::from_millis(1_500));
    assert_eq!(verdict(&fw, &reply(53)), XDP_DROP, "the window closed");
    assert_eq!(
        fw.test_run("flynn_firewall", &reply(53), 1_000).unwrap().0,
        XDP_DROP
    );
    send_query();
    assert_eq!(
        verdict(&fw, &reply(53)),
        XDP_PASS,
        "a new query opens it again"
    );
}

/// More live flows than a table set holds: the oldest loses its way, and its replies are
/// still let in by the flow map; a flow the host never opened is not, even in that set.
#[test]
fn t26_a_flow_pushed_out_of_the_table_still_gets_its_replies() {
    let fw = fw();
    let others = colliding_remotes(OUTSIDE, 53, 41001, flynn_xdp_common::FLOW_WAYS + 1);
    let query = |to: [u8; 4]| {
        let mut q = V4::from([10, 9, 9, 1]);
        q.dst = to;
        fw.test_egress(&eth4(&q.packet(UDP, &udp(41001, 53, b"q"))))
            .unwrap();
    };
    let reply = |from: [u8; 4]| eth4(&V4::from(from).packet(UDP, &udp(53, 41001, b"a")));
    query(OUTSIDE);
    for &o in &others[..flynn_xdp_common::FLOW_WAYS] {
        query(o);
    }
    for &from in std::iter::once(&OUTSIDE).chain(&others[..flynn_xdp_common::FLOW_WAYS]) {
        assert_eq!(verdict(&fw, &reply(from)), XDP_PASS, "reply from {from:?}");
    }
    let stranger = others[flynn_xdp_common::FLOW_WAYS];
    assert_eq!(verdict(&fw, &reply(stranger)), XDP_DROP, "never queried");
    assert_eq!(counter(&fw, "udp_reply", "pass"), 5);
}
