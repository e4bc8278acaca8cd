//! The job network steps against the real kernel (root, `ip`, `nft`, `nsenter` and
//! python3 needed, as for the daemon's job tests): two namespaces made by this crate, one
//! standing in for the host, joined by a veth, with addresses and routes, and a real TCP
//! connection across; and set elements in a real nftables table.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flynn_netlink::{concat_key, delete_netns, Ipv4Route, Netns, Nftables, VethEnd, NFPROTO_INET};

/// Namespaces and tables this test made, removed however it ends.
struct Cleanup {
    netns: Vec<PathBuf>,
    table: Option<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.netns {
            let _ = delete_netns(p);
        }
        if let Some(t) = &self.table {
            let _ = Command::new("nft")
                .args(["delete", "table", "inet", t])
                .status();
        }
    }
}

fn run_in(netns: &Path, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(args)
        .output()
        .expect("nsenter");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

const JOB_MAC: [u8; 6] = [0x0a, 0x58, 100, 100, 7, 2];
const HOST_MAC: [u8; 6] = [0x0a, 0x59, 100, 100, 7, 2];

#[test]
fn a_job_namespace_joined_to_its_host_by_a_veth_carries_tcp() {
    let pid = std::process::id();
    let host_path = PathBuf::from(format!("/run/netns/flynn-nltest-{pid}-host"));
    let job_path = PathBuf::from(format!("/run/netns/flynn-nltest-{pid}-job"));
    let mut cleanup = Cleanup {
        netns: vec![],
        table: None,
    };
    let mut host = Netns::create(&host_path).expect("host namespace");
    cleanup.netns.push(host_path.clone());
    let mut job = Netns::create(&job_path).expect("job namespace");
    cleanup.netns.push(job_path.clone());
    assert!(
        Netns::create(&job_path).is_err(),
        "a second namespace at one path is refused"
    );
    // The one already there still works.
    assert!(run_in(&job_path, &["ip", "-o", "link"]).contains("lo"));

    let (gw, ip) = (Ipv4Addr::new(100, 100, 7, 1), Ipv4Addr::new(100, 100, 7, 2));
    let here = VethEnd {
        name: "fjtest0",
        mac: Some(HOST_MAC),
        mtu: 1450,
    };
    let peer = VethEnd {
        name: "eth0",
        mac: Some(JOB_MAC),
        mtu: 1450,
    };
    host.rtnl().add_veth(&here, &peer, job.fd()).expect("veth");
    let again = host.rtnl().add_veth(&here, &peer, job.fd()).unwrap_err();
    assert!(again.is_exists(), "{again}");
    let veth = host.rtnl().link_index("fjtest0").expect("veth index");
    host.rtnl().add_address(veth, gw, 32).expect("host address");
    host.rtnl()
        .set_neighbour(veth, ip, JOB_MAC)
        .expect("the job as a neighbour");
    host.rtnl().set_link(veth, true, None).expect("veth up");
    host.rtnl()
        .replace_route(&Ipv4Route {
            dst: ip,
            prefix: 32,
            gateway: None,
            dev: veth,
        })
        .expect("route to the job");

    let lo = job.rtnl().link_index("lo").expect("lo");
    job.rtnl().set_link(lo, true, None).expect("lo up");
    let eth0 = job.rtnl().link_index("eth0").expect("eth0");
    job.rtnl().add_address(eth0, ip, 32).expect("job address");
    job.rtnl()
        .set_neighbour(eth0, gw, HOST_MAC)
        .expect("the gateway as a neighbour");
    job.rtnl().set_link(eth0, true, None).expect("eth0 up");
    job.rtnl()
        .replace_route(&Ipv4Route {
            dst: gw,
            prefix: 32,
            gateway: None,
            dev: eth0,
        })
        .expect("route to the gateway");
    job.rtnl()
        .replace_route(&Ipv4Route {
            dst: Ipv4Addr::UNSPECIFIED,
            prefix: 0,
            gateway: Some(gw),
            dev: eth0,
        })
        .expect("default route");
    let missing = job.rtnl().link_index("eth9").unwrap_err();
    assert!(missing.is_not_found(), "{missing}");
    assert!(missing.to_string().contains("eth9"), "{missing}");

    // What `ip` reads back is what a job sees.
    let links = run_in(&job_path, &["ip", "-o", "link", "show", "eth0"]);
    assert!(links.contains("mtu 1450"), "{links}");
    assert!(links.contains(",UP"), "{links}");
    let addrs = run_in(&job_path, &["ip", "-o", "-4", "addr", "show", "eth0"]);
    assert!(addrs.contains("inet 100.100.7.2/32"), "{addrs}");
    let routes = run_in(&job_path, &["ip", "route"]);
    assert!(
        routes.contains("default via 100.100.7.1 dev eth0"),
        "{routes}"
    );
    assert!(
        routes.contains("100.100.7.1 dev eth0 scope link"),
        "{routes}"
    );
    let routes = run_in(&host_path, &["ip", "route"]);
    assert!(
        routes.contains("100.100.7.2 dev fjtest0 scope link"),
        "{routes}"
    );
    let links = run_in(&host_path, &["ip", "-o", "link", "show", "fjtest0"]);
    assert!(links.contains("link/ether 0a:59:64:64:07:02"), "{links}");
    assert!(links.contains("mtu 1450"), "both ends' MTU: {links}");
    // Each side knows the other for good: no ARP, no entry the kernel may evict.
    let neigh = run_in(&job_path, &["ip", "neigh", "show", "dev", "eth0"]);
    assert!(
        neigh.contains("100.100.7.1 lladdr 0a:59:64:64:07:02 PERMANENT"),
        "{neigh}"
    );
    let neigh = run_in(&host_path, &["ip", "neigh", "show", "dev", "fjtest0"]);
    assert!(
        neigh.contains("100.100.7.2 lladdr 0a:58:64:64:07:02 PERMANENT"),
        "{neigh}"
    );

    // A real connection from the job to a server on the host side of the veth.
    let mut server = Command::new("nsenter")
        .arg(format!("--net={}", host_path.display()))
        .args(["python3", "-c"])
        .arg(
            "import socket\n\
             s = socket.socket(); s.bind(('100.100.7.1', 9000)); s.listen(1)\n\
             print('ready', flush=True)\n\
             c, a = s.accept(); c.sendall(('from ' + a[0]).encode()); c.close()\n",
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("server");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("server ready");
    assert_eq!(line.trim(), "ready");
    let said = run_in(
        &job_path,
        &[
            "python3",
            "-c",
            "import socket; s = socket.create_connection(('100.100.7.1', 9000), timeout=10); print(s.recv(100).decode())",
        ],
    );
    let _ = server.wait();
    assert_eq!(said.trim(), "from 100.100.7.2", "the job's own address");

    // Deleting the host side takes the job's side with it.
    host.rtnl().delete_link("fjtest0").expect("delete veth");
    let gone = host.rtnl().delete_link("fjtest0").unwrap_err();
    assert!(gone.is_not_found(), "{gone}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while run_in(&job_path, &["ip", "-o", "link"]).contains("eth0") {
        assert!(Instant::now() < deadline, "eth0 outlived its peer");
        std::thread::sleep(Duration::from_millis(20));
    }

    drop(job);
    delete_netns(&job_path).expect("delete the job namespace");
    assert!(!job_path.exists());
    let twice = delete_netns(&job_path).unwrap_err();
    assert!(twice.is_not_found(), "{twice}");
    drop(cleanup);
    assert!(!host_path.exists());
}

#[test]
fn set_elements_go_in_and_out_of_a_real_nftables_set() {
    let table = format!("flynn_nltest_{}", std::process::id());
    let cleanup = Cleanup {
        netns: vec![],
        table: Some(table.clone()),
    };
    let mut nft = Nftables::open().expect("nfnetlink");
    let key = |ip: [u8; 4], port: u16| concat_key(&[&ip, &port.to_be_bytes()]);
    let first = key([100, 100, 7, 2], 8080);
    let second = key([100, 100, 7, 3], 8080);

    let none = nft
        .add_elements(NFPROTO_INET, &table, "published", &[&first])
        .unwrap_err();
    assert!(none.is_not_found(), "no such table yet: {none}");
    assert!(none.to_string().contains(&table), "{none}");

    let status = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("stdin").write_all(
                format!(
                    "table inet {table} {{ set published {{ type ipv4_addr . inet_service; }}; }}\n"
                )
                .as_bytes(),
            )?;
            c.wait()
        })
        .expect("nft");
    assert!(status.success());
    let list = || {
        let out = Command::new("nft")
            .args(["list", "set", "inet", &table, "published"])
            .output()
            .expect("nft list");
        String::from_utf8_lossy(&out.stdout).to_string()
    };

    nft.add_elements(NFPROTO_INET, &table, "published", &[&first, &second])
        .expect("add");
    let listed = list();
    assert!(listed.contains("100.100.7.2 . 8080"), "{listed}");
    assert!(listed.contains("100.100.7.3 . 8080"), "{listed}");
    // Adding one that is there is not an error, as with `nft add element`.
    nft.add_elements(NFPROTO_INET, &table, "published", &[&first])
        .expect("add again");

    nft.delete_elements(NFPROTO_INET, &table, "published", &[&first])
        .expect("delete");
    let listed = list();
    assert!(!listed.contains("100.100.7.2 . 8080"), "{listed}");
    assert!(listed.contains("100.100.7.3 . 8080"), "{listed}");
    // One missing fails the whole batch: the other stays.
    let missing = nft
        .delete_elements(NFPROTO_INET, &table, "published", &[&second, &first])
        .unwrap_err();
    assert!(missing.is_not_found(), "{missing}");
    assert!(list().contains("100.100.7.3 . 8080"), "nothing half-done");
    // A key of the wrong length is the kernel's to refuse, not a panic.
    assert!(nft
        .add_elements(NFPROTO_INET, &table, "published", &[&[1, 2, 3]])
        .is_err());
    drop(cleanup);
}
