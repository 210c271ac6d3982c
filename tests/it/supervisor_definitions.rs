//! The shipped process table and the client-command validator (pure; no processes).

use std::path::Path;
use std::time::Duration;

use procman::supervisor::{validate_cgse_cmd, DeviceSpec, Launchers, PingTarget, ProcessTable, RestartPolicy};

fn table() -> ProcessTable {
    ProcessTable::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("settings/procman.yaml")).unwrap()
}

#[test]
fn shipped_table_parses_and_resolves_the_dummy_device() {
    let t = table();
    assert_eq!(t.allowed_programs(), ["cgse"]);
    let dummy = DeviceSpec {
        device_id: "DUMMY_01".into(),
        device_name: "Dummy Device".into(),
        device_class: "class//egse.dummy.DummyProxy".into(),
        device_args: vec![],
        simulator: true,
    };
    let d = t.resolve_device(&dummy).unwrap();
    assert_eq!(d.id, "DUMMY_01");
    assert_eq!(
        d.effective_argv(),
        ["python3", "-m", "egse.dummy.dummy_cs", "start", "--sim"]
    );
    assert_eq!(d.env.get("CGSE_DEVICE_ID").map(String::as_str), Some("DUMMY_01"));
    assert_eq!(d.restart, RestartPolicy::OnFailure);
    assert_eq!(d.stop_timeout, Duration::from_secs(5));
    assert_eq!(d.effective_env().get("PYTHONUNBUFFERED").map(String::as_str), Some("1"));
    let ping = d.readiness.unwrap().ping;
    assert_eq!(
        ping,
        PingTarget::Registry {
            service_type: "DUMMY_01".into()
        }
    );

    // Another device of the same class gets the class entry only.
    let other = DeviceSpec {
        device_id: "dummy_02".into(),
        device_class: "egse.dummy.DummyProxy".into(),
        ..dummy.clone()
    };
    let d2 = t.resolve_device(&other).unwrap();
    assert!(!d2.env.contains_key("CGSE_DEVICE_ID"));
    assert_eq!(
        d2.readiness.unwrap().ping,
        PingTarget::Registry {
            service_type: "DUMMY_02".into()
        }
    );

    // A class nobody configured.
    let puna = DeviceSpec {
        device_id: "PUNA_01".into(),
        device_class: "class//egse.hexapod.symetrie.puna.PunaProxy".into(),
        ..dummy
    };
    let e = t.resolve_device(&puna).unwrap_err().to_string();
    assert!(e.contains("no definition for device PUNA_01"), "{e}");
}

#[test]
fn shipped_table_lists_core_services_in_order() {
    let t = table();
    let names: Vec<String> = t.core_service_types().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "Logger",
            "Notification Hub",
            "Metrics Hub",
            "Storage Manager",
            "Configuration Manager"
        ]
    );
    let defs = t.core_definitions().unwrap();
    let sm = defs.iter().find(|d| d.id == "Storage Manager").unwrap();
    assert_eq!(sm.argv, ["python3", "-m", "egse.storage.storage_cs", "start"]);
    assert_eq!(sm.service_type.as_deref(), Some("SM_CS"));
    // Core services are defined but not started by default: `cgse core start` may already run them.
    assert!(!sm.autostart);
    assert_eq!(
        sm.readiness.as_ref().unwrap().ping,
        PingTarget::Registry {
            service_type: "SM_CS".into()
        }
    );
}

#[test]
fn client_commands_are_validated_never_shelled() {
    let allowed = vec!["cgse".to_owned()];
    for refused in [
        "sh -c 'touch /tmp/x'",
        "cgse dummy; touch /tmp/x",
        "cgse $(touch /tmp/x)",
        "cgse `touch /tmp/x`",
        "cgse dummy | tee /tmp/x",
        "cgse dummy && touch /tmp/x",
        "cgse dummy & touch /tmp/x",
        "cgse dummy > /tmp/x",
        "cgse dummy\ntouch /tmp/x",
        "bash",
        "",
    ] {
        assert!(validate_cgse_cmd(refused, &allowed).is_err(), "accepted {refused:?}");
    }
    let e = validate_cgse_cmd("sh -c true", &allowed).unwrap_err().to_string();
    assert!(e.contains("not allowed") && e.contains("allowed programs: cgse"), "{e}");
    assert_eq!(validate_cgse_cmd("cgse dummy", &allowed).unwrap(), ["cgse", "dummy"]);

    // A legacy StartCommand becomes a forking definition with a literal argv, its program resolved to an
    // absolute path (here from a directory holding a stand-in `cgse`), its launcher a permitted one.
    let dir = std::env::temp_dir().join(format!("procman-defs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cgse = dir.join("cgse");
    std::fs::write(&cgse, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&cgse, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut launchers = Launchers::new(&[], &["puna".into()], &[], "test".into());
    launchers.search_path = Some(dir.display().to_string());
    let d = table()
        .legacy_definition("PUNA_01", "cgse puna", &["PUNA_01".into()], true, &launchers)
        .unwrap();
    assert!(d.forking);
    let program = cgse.display().to_string();
    assert_eq!(
        d.effective_argv(),
        [program.as_str(), "puna", "start", "PUNA_01", "--sim"]
    );
    assert!(table()
        .legacy_definition("X", "cgse puna; reboot", &[], false, &launchers)
        .is_err());
    assert!(
        table()
            .legacy_definition("X", "cgse tcu", &[], false, &launchers)
            .is_err(),
        "not a launcher"
    );
    std::fs::remove_dir_all(&dir).ok();
}
