use std::path::Path;

use super::*;

const POLICY: &str = r#"
[applications.inventory]
servers = ["server-a", "server-b", "server-c"]

[[applications.inventory.allow]]
from = "server-a"
to = "server-b"
services = ["orders", "stock"]

[[applications.inventory.allow]]
from = "*"
to = "server-c"
services = ["health"]
"#;

fn policy() -> Policy {
    Policy::parse(Path::new("policy.toml"), POLICY).expect("valid policy")
}

#[test]
fn scope_lists_grants_of_server() {
    let grants = policy().scope("inventory", "server-a").expect("authorized");
    assert_eq!(grants.len(), 2);
    assert_eq!(grants[0].peer, "server-b");
    assert_eq!(grants[0].services, vec!["orders", "stock"]);
    assert_eq!(grants[1].peer, "server-c");
}

#[test]
fn unlisted_server_is_denied() {
    let err = policy().scope("inventory", "server-x").unwrap_err();
    assert!(
        matches!(err, PolicyDenial::ServerNotAuthorized { .. }),
        "{err}"
    );
    let err = policy().scope("billing", "server-a").unwrap_err();
    assert!(matches!(err, PolicyDenial::UnknownApplication(_)), "{err}");
}

#[test]
fn decide_names_first_matching_rule() {
    let policy = policy();
    let rules = &policy.applications["inventory"].rules;
    assert_eq!(
        rules.decide("server-a", "server-b", "orders"),
        Decision::Allow { rule: 0 }
    );
    assert_eq!(
        rules.decide("server-b", "server-c", "health"),
        Decision::Allow { rule: 1 }
    );
    assert!(matches!(
        rules.decide("server-b", "server-a", "orders"),
        Decision::Deny { .. }
    ));
    assert!(matches!(
        rules.decide("server-a", "server-b", "admin"),
        Decision::Deny { .. }
    ));
    assert_eq!(rules.rules()[1].origin, "policy.toml:11");
}

#[test]
fn rule_with_unknown_server_points_at_it() {
    let text = "[applications.app]\nservers = [\"a\"]\n[[applications.app.allow]]\nfrom = \"b\"\nto = \"a\"\nservices = [\"x\"]\n";
    let err = Policy::parse(Path::new("p.toml"), text).unwrap_err();
    assert_eq!((err.line, err.column), (4, 8), "{err}");
    assert!(err.message.contains("\"b\" is not listed"), "{err}");
}

#[test]
fn invalid_name_is_rejected() {
    let text = "[applications.app]\nservers = [\"bad name\"]\n";
    let err = Policy::parse(Path::new("p.toml"), text).unwrap_err();
    assert_eq!(err.line, 2, "{err}");
    assert!(err.message.contains("invalid name"), "{err}");
}

#[test]
fn local_rules_default_to_local_server() {
    let text = "[[allow]]\nfrom = \"server-a\"\nservices = [\"orders\"]\n";
    let rules = parse_local_rules(Path::new("local.toml"), text, "server-b").expect("valid");
    assert_eq!(
        rules.decide("server-a", "server-b", "orders"),
        Decision::Allow { rule: 0 }
    );
    assert!(matches!(
        rules.decide("server-c", "server-b", "orders"),
        Decision::Deny { .. }
    ));
}

#[test]
fn large_rule_set_decides_by_index() {
    let rules = (0..10_000)
        .map(|i| Rule {
            from: format!("s{i}"),
            to: format!("t{i}"),
            services: vec!["svc".to_owned()],
            origin: String::new(),
        })
        .collect();
    let set = RuleSet::new(rules);
    assert_eq!(
        set.decide("s9999", "t9999", "svc"),
        Decision::Allow { rule: 9999 }
    );
    assert!(matches!(
        set.decide("s1", "t2", "svc"),
        Decision::Deny { .. }
    ));
}
