//! `tether check` and `tether run` on good and bad configs.

use std::path::PathBuf;
use std::process::Command;

use tether_e2e::{binary, TempDir};

fn conf_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../conf")
}

#[test]
fn every_shipped_config_passes_check() {
    let mut configs: Vec<PathBuf> = std::fs::read_dir(conf_dir())
        .expect("conf/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    configs.sort();
    assert!(!configs.is_empty());
    for config in configs {
        let out = Command::new(binary("tether"))
            .args(["check", "-c"])
            .arg(&config)
            .output()
            .expect("tether runs");
        assert!(
            out.status.success(),
            "{}: {}",
            config.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Runs `tether check` on `yaml`; returns whether it passed and its stderr.
fn check(yaml: &str) -> (bool, String) {
    let dir = TempDir::new("tether-cli").unwrap();
    let path = dir.path().join("tether.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(binary("tether"))
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_of_an_invalid_config_exits_non_zero_naming_every_problem() {
    let (ok, stderr) = check(
        "listen: 127.0.0.1:8080\nlocal_region: nowhere\naffinity:\n  balance_factor: 0.5\nregions:\n  - name: eu\n    replicas:\n      - { id: a, address: \"127.0.0.1:1\" }\n      - { id: a, address: \"not-an-address\" }\n",
    );
    assert!(!ok);
    for needle in [
        "4 problems",
        "affinity.balance_factor",
        "regions[0].replicas[1].id: duplicate replica id \"a\"",
        "regions[0].replicas[1].address",
        "local_region: \"nowhere\" is not a region",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
}

#[test]
fn check_reports_the_line_of_a_schema_error() {
    let (ok, stderr) = check(
        "listen: 127.0.0.1:8080\nlocal_region: eu\nregions:\n  - name: eu\n    replicas:\n      - { id: a, adress: \"127.0.0.1:1\" }\n",
    );
    assert!(!ok);
    assert!(stderr.contains("unknown field `adress`"), "{stderr}");
    assert!(stderr.contains("line 6"), "{stderr}");
}

#[test]
fn run_refuses_an_invalid_config_and_a_taken_port_with_a_clear_error() {
    let dir = TempDir::new("tether-cli").unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "listen: nope\n").unwrap();
    let out = Command::new(binary("tether"))
        .args(["run", "-c"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.yaml"));

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let busy = dir.path().join("busy.yaml");
    std::fs::write(
        &busy,
        format!("listen: {addr}\nlocal_region: eu\nregions:\n  - name: eu\n    replicas:\n      - {{ id: a, address: \"127.0.0.1:1\" }}\n"),
    )
    .unwrap();
    let out = Command::new(binary("tether"))
        .args(["run", "-c"])
        .arg(&busy)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("listen {addr}: cannot listen")),
        "{stderr}"
    );
}

#[test]
fn loadgen_reports_json_through_tether() {
    use tether_e2e::{regions_yaml, SimFleet, Tether, TetherConfig};
    let fleet = SimFleet::start(&["a-1", "a-2"]).unwrap();
    let replicas = fleet
        .replicas
        .iter()
        .map(|(id, addr)| (id.clone(), *addr, ""))
        .collect();
    let tether = Tether::start(&TetherConfig {
        body: format!("local_region: a\n{}", regions_yaml(&[("a", replicas)])),
    })
    .unwrap();
    let out = Command::new(binary("loadgen"))
        .args(["--target", &format!("http://{}", tether.addr)])
        .args([
            "--sessions",
            "4",
            "--turns",
            "3",
            "--think-ms",
            "0",
            "--arrival-rate",
            "0",
        ])
        .args([
            "--system-tokens",
            "64",
            "--user-tokens",
            "16",
            "--max-tokens",
            "8",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["overall"]["requests"], 12);
    assert_eq!(report["overall"]["errors"], 0);
    assert!(report["overall"]["hit_ratio"].as_f64().unwrap() > 0.3);
    assert_eq!(report["by_turn"].as_array().unwrap().len(), 3);
}
