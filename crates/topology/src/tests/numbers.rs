//! YAML reads `.nan` and `.inf` as floats; no setting takes them.

use super::*;

#[test]
fn not_a_number_and_infinity_are_refused_in_words() {
    let factor = |key: &str, value: &str| {
        VALID.replace(
            "override_ttl: 1h",
            &format!("override_ttl: 1h\n  {key}: {value}"),
        )
    };
    let price = |value: &str| {
        VALID.replace(
            "output_per_mtok: 1.50",
            &format!("output_per_mtok: {value}"),
        )
    };
    for (yaml, key) in [
        (
            VALID.replace("balance_factor: 1.25", "balance_factor: {}"),
            "affinity.balance_factor",
        ),
        (factor("shed_factor", "{}"), "affinity.shed_factor"),
        (price("{}"), "pricing.default.output_per_mtok"),
        (
            price("1.50, cache_write_per_mtok: {}"),
            "pricing.default.cache_write_per_mtok",
        ),
    ] {
        for (value, words) in [
            (".nan", ".nan is not a number"),
            (".NaN", ".nan is not a number"),
            (".inf", ".inf is not a finite number"),
            ("+.inf", ".inf is not a finite number"),
            ("-.Inf", "-.inf is not a finite number"),
        ] {
            let p = problem(&yaml.replace("{}", value));
            assert_eq!(p.key, key, "{value}");
            assert!(
                p.message.starts_with(words),
                "{key}: {value}: {}",
                p.message
            );
        }
    }
}

#[test]
fn finite_numbers_out_of_range_keep_their_own_message() {
    let p = problem(&VALID.replace("balance_factor: 1.25", "balance_factor: 0.5"));
    assert!(p.message.starts_with("0.5 is below 1"), "{}", p.message);
    let p = problem(&VALID.replace("output_per_mtok: 1.50", "output_per_mtok: 2000000"));
    assert!(
        p.message.starts_with("2000000 is not a price"),
        "{}",
        p.message
    );
}

#[test]
fn request_body_bounds_are_checked_and_the_tenant_share_is_a_fraction_of_the_total() {
    let with = |section: &str| format!("{VALID}\nrequest_bodies: {section}\n");
    for (section, key) in [
        ("{ memory_mib: 0 }", "request_bodies.memory_mib"),
        ("{ tenant_share: 0 }", "request_bodies.tenant_share"),
        ("{ tenant_share: 1.5 }", "request_bodies.tenant_share"),
        ("{ deadline: 10ms }", "request_bodies.deadline"),
    ] {
        assert_eq!(problem(&with(section)).key, key, "{section}");
    }
    let t = Topology::from_yaml(
        &with("{ memory_mib: 64, tenant_share: 0.25, deadline: 5s }"),
        "t",
    )
    .expect("valid");
    assert_eq!(t.request_bodies.memory_limit, 64 << 20);
    assert_eq!(t.request_bodies.tenant_limit, 16 << 20);
    assert_eq!(t.request_bodies.deadline, Duration::from_secs(5));
}
