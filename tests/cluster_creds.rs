//! Cluster mode with NATS credentials files (`.creds`: a user JWT and its nkey seed), end to
//! end against a real nats-server in operator mode (decentralized JWT authentication): the
//! test mints an operator, a system account, an account and its users with the `nkeys` crate,
//! as `nsc` would, and preloads the accounts into the server's memory resolver. A coordinator
//! given `--creds` and a worker whose `[worker]` table names its own creds file run a batch to
//! the end; a creds file the server does not trust (an unknown account's user, a seed that is
//! not the JWT's key, an expired JWT) is refused at start, exit 2, for both roles, and so is
//! no creds at all.
#![cfg(feature = "cluster")]

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use nkeys::KeyPair;
use serde_json::json;
use sha2::Digest;

use common::cluster::{assert_results, tree, xdg};
use common::nats::*;
use common::*;

fn s(x: &str) -> &OsStr {
    OsStr::new(x)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A JWT of `claims` (`sub`, `name`, `nats`, perhaps `exp`) issued and signed by `issuer`, in
/// the form nats-server decodes (jwt v2: header `ed25519-nkey`, base64url without padding).
fn jwt(issuer: &KeyPair, mut claims: serde_json::Value) -> String {
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    claims["iat"] = json!(now());
    claims["iss"] = json!(issuer.public_key());
    // The claims' hash, as nsc makes it (the server does not check it).
    let hash = sha2::Sha256::digest(claims.to_string().as_bytes());
    claims["jti"] = json!(hash.iter().map(|b| format!("{b:02X}")).collect::<String>());
    let header = b64(json!({"typ": "JWT", "alg": "ed25519-nkey"})
        .to_string()
        .as_bytes());
    let body = b64(claims.to_string().as_bytes());
    let signed = format!("{header}.{body}");
    let signature = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", b64(&signature))
}

/// An account's JWT, issued by `operator`, with JetStream allowed (`jetstream`) or not (the
/// system account).
fn account_jwt(operator: &KeyPair, account: &KeyPair, name: &str, jetstream: bool) -> String {
    let mut limits = json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
    });
    if jetstream {
        for key in ["mem_storage", "disk_storage", "streams", "consumer"] {
            limits[key] = json!(-1);
        }
    }
    jwt(
        operator,
        json!({
            "sub": account.public_key(), "name": name,
            "nats": {"limits": limits, "type": "account", "version": 2},
        }),
    )
}

/// A user's JWT issued by `account` for `user`'s public key, allowed everything, expiring at
/// `exp` (seconds since the epoch) if given.
fn user_jwt(account: &KeyPair, user: &KeyPair, exp: Option<u64>) -> String {
    let mut claims = json!({
        "sub": user.public_key(), "name": "filepipe",
        "nats": {"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
                 "type": "user", "version": 2},
    });
    if let Some(exp) = exp {
        claims["exp"] = json!(exp);
    }
    jwt(account, claims)
}

/// A `.creds` file at `path`, mode 0600, as `nsc generate creds` writes it.
fn write_creds(path: &Path, jwt: &str, seed: &str) {
    let text = format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    );
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

/// A server in operator mode trusting one operator, with a system account and one account
/// (`account`) whose users may use JetStream, both preloaded into its memory resolver.
fn operator_server(account: &KeyPair) -> Option<Nats> {
    let operator = KeyPair::new_operator();
    let system = KeyPair::new_account();
    let operator_jwt = jwt(
        &operator,
        json!({"sub": operator.public_key(), "name": "filepipe-test",
               "nats": {"type": "operator", "version": 2}}),
    );
    let config = format!(
        "operator: \"{operator_jwt}\"\nsystem_account: {sys}\nresolver: MEMORY\n\
         resolver_preload: {{\n  {sys}: \"{sys_jwt}\"\n  {acc}: \"{acc_jwt}\"\n}}\n\
         jetstream: {{ store_dir: \"STORE\" }}\n",
        sys = system.public_key(),
        sys_jwt = account_jwt(&operator, &system, "SYS", false),
        acc = account.public_key(),
        acc_jwt = account_jwt(&operator, account, "filepipe", true),
    );
    Nats::start_config(&config, "STORE")
}

/// A creds file `name` beside the tree for a new user of `account`.
fn creds_for(t: &TestTree, account: &KeyPair, name: &str, exp: Option<u64>) -> PathBuf {
    let user = KeyPair::new_user();
    let path = t.side(name);
    write_creds(&path, &user_jwt(account, &user, exp), &user.seed().unwrap());
    path
}

/// A config file with a `[worker]` table: `nats`'s URL, the creds file `creds`, and the root
/// `tree` mapped to the tree's root.
fn worker_config(t: &TestTree, nats: &Nats, creds: &Path) -> PathBuf {
    let path = t.side("worker.toml");
    fs::write(
        &path,
        format!(
            "[worker]\nqueue = \"{}\"\ncreds = \"{}\"\njobs = 2\n[worker.roots]\ntree = \"{}\"\n",
            nats.url,
            creds.display(),
            t.root().display()
        ),
    )
    .unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// `filepipe worker --config CONFIG`, once it says READY=1 (its log beside the tree).
fn start_worker(t: &TestTree, config: &Path) -> Worker {
    let cmd = filepipe(&[s("worker"), s("--config"), config.as_os_str()]);
    Worker::ready(cmd, t.root().parent().unwrap())
}

/// `filepipe batch ROOT --queue URL --root-name tree --op gzip,sha256 --manifest SUMS`, with
/// `--creds CREDS` if given.
fn coordinator(t: &TestTree, nats: &Nats, creds: Option<&Path>) -> Run {
    let mut cmd = filepipe(&[s("batch"), t.root().as_os_str(), s("--queue"), s(&nats.url)]);
    cmd.args(["--root-name", "tree", "--op", "gzip,sha256", "--json"])
        .arg("--manifest")
        .arg(t.side("SUMS"))
        .env("XDG_STATE_HOME", xdg(&t.root()));
    if let Some(creds) = creds {
        cmd.arg("--creds").arg(creds);
    }
    run(cmd)
}

/// A coordinator with its creds file on the command line and a worker with its own (another
/// user of the same account) in its `[worker]` table run a batch to the end: every output
/// passes `gzip -t` and restores its input, and the manifest passes `sha256sum -c`.
#[test]
fn a_coordinator_and_a_worker_with_creds_files_run_a_batch() {
    let account = KeyPair::new_account();
    let Some(nats) = operator_server(&account) else {
        return;
    };
    let t = tree(80, 0);
    let worker_creds = creds_for(&t, &account, "worker.creds", None);
    let coordinator_creds = creds_for(&t, &account, "coordinator.creds", None);
    let config = worker_config(&t, &nats, &worker_creds);
    let mut worker = start_worker(&t, &config);
    let sum = coordinator(&t, &nats, Some(&coordinator_creds))
        .success()
        .summary();
    assert_eq!(
        (sum["done"].as_u64(), sum["failed"].as_u64()),
        (Some(80), Some(0)),
        "{sum}"
    );
    assert_results(&t, 80);
    worker.kill();
    assert!(!worker.log().contains("authorization"), "{}", worker.log());
}

/// A worker given `config`, to its end (it must refuse to start): its exit status and log.
fn worker_refused(config: &Path) -> Run {
    let started = Instant::now();
    let r = run(filepipe(&[s("worker"), s("--config"), config.as_os_str()]));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the worker took {:?} to give up",
        started.elapsed()
    );
    r
}

/// Credentials the server does not accept are a clear error at start, exit 2, for the worker
/// and the coordinator alike, never a retry loop: a user of an account the server does not
/// trust, a creds file whose seed is not the key its JWT names, a JWT that has expired, and
/// (operator mode lets no one in anonymously) no creds at all. A good pair then runs the same
/// tree to the end.
#[test]
fn creds_the_server_does_not_accept_are_refused_at_start() {
    let account = KeyPair::new_account();
    let Some(nats) = operator_server(&account) else {
        return;
    };
    let t = tree(5, 0);
    let stranger = KeyPair::new_account();
    let mismatched = {
        let (user, other) = (KeyPair::new_user(), KeyPair::new_user());
        let path = t.side("mismatched.creds");
        write_creds(
            &path,
            &user_jwt(&account, &user, None),
            &other.seed().unwrap(),
        );
        path
    };
    let cases = [
        (
            "an unknown account's user",
            creds_for(&t, &stranger, "stranger.creds", None),
        ),
        ("a seed that is not the JWT's key", mismatched),
        (
            "an expired JWT",
            creds_for(&t, &account, "expired.creds", Some(now() - 60)),
        ),
    ];
    for (what, creds) in &cases {
        let config = worker_config(&t, &nats, creds);
        let err = worker_refused(&config).code(2).stderr();
        assert!(err.contains("authorization"), "{what}: worker: {err}");
        let err = coordinator(&t, &nats, Some(creds)).code(2).stderr();
        assert!(err.contains("authorization"), "{what}: coordinator: {err}");
    }
    let err = coordinator(&t, &nats, None).code(2).stderr();
    assert!(
        err.contains("authorization"),
        "no creds: coordinator: {err}"
    );
    let good = creds_for(&t, &account, "good.creds", None);
    let config = worker_config(&t, &nats, &good);
    let mut worker = start_worker(&t, &config);
    let sum = coordinator(&t, &nats, Some(&good)).success().summary();
    assert_eq!(
        (sum["done"].as_u64(), sum["failed"].as_u64()),
        (Some(5), Some(0)),
        "{sum}"
    );
    worker.kill();
}

/// A server whose users are named by their public nkeys (`nkey: U...` in its `authorization`,
/// as systemd/nats-server.conf suggests instead of passwords), with JetStream.
fn nkey_server(users: &[&KeyPair]) -> Option<Nats> {
    let users: Vec<String> = (users.iter())
        .map(|u| format!("{{ nkey: {} }}", u.public_key()))
        .collect();
    let config = format!(
        "authorization {{ users = [ {} ] }}\njetstream: {{ store_dir: \"STORE\" }}\n",
        users.join(", ")
    );
    Nats::start_config(&config, "STORE")
}

/// A user nkey seed alone in the `--creds` file (as `nk -gen user` prints it), for a server
/// that names its users by nkey: a `.creds` file (with a JWT) was all `--creds` took, and
/// such a user could not connect at all (found by a review). The coordinator's seed file as
/// printed, the worker's with the seed markers of a `.creds` file and no JWT; a seed the
/// server does not know, or an account's seed, is refused at start, exit 2.
#[test]
fn a_bare_user_nkey_seed_serves_as_creds() {
    let (coordinator_user, worker_user) = (KeyPair::new_user(), KeyPair::new_user());
    let Some(nats) = nkey_server(&[&coordinator_user, &worker_user]) else {
        return;
    };
    let t = tree(40, 0);
    let seed_file = |name: &str, text: String| {
        let path = t.side(name);
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        path
    };
    let coordinator_seed = seed_file(
        "coordinator.nk",
        format!("{}\n", coordinator_user.seed().unwrap()),
    );
    let worker_seed = seed_file(
        "worker.nk",
        format!(
            "-----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            worker_user.seed().unwrap()
        ),
    );
    // Refused first, so that no stream is there to be found.
    let stranger = seed_file("stranger.nk", KeyPair::new_user().seed().unwrap());
    let err = coordinator(&t, &nats, Some(&stranger)).code(2).stderr();
    assert!(err.contains("authorization"), "{err}");
    let account = seed_file("account.nk", KeyPair::new_account().seed().unwrap());
    let err = coordinator(&t, &nats, Some(&account)).code(2).stderr();
    assert!(err.contains("not a user's"), "{err}");
    let config = worker_config(&t, &nats, &worker_seed);
    let mut worker = start_worker(&t, &config);
    let sum = coordinator(&t, &nats, Some(&coordinator_seed))
        .success()
        .summary();
    assert_eq!(
        (sum["done"].as_u64(), sum["failed"].as_u64()),
        (Some(40), Some(0)),
        "{sum}"
    );
    assert_results(&t, 40);
    worker.kill();
    assert!(!worker.log().contains("authorization"), "{}", worker.log());
}
