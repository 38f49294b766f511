//! Tenant credentials created through the broker reach the embedded server (rendered runtime
//! config + reload) and allow exactly the tenant's own generate subject.

use std::time::Duration;

use faasmoe_broker::server::free_port;
use faasmoe_broker::{
    EmbeddedServer, Quota, ServerOptions, TenantAdmin, TenantCredentials, TenantStore,
};
use faasmoe_e2e::{dev_users, echo_responder_fenced_by};
use futures::StreamExt;
use tokio::sync::mpsc;

const T: Duration = Duration::from_secs(10);

fn start_server() -> EmbeddedServer {
    // The project's nats.conf (default config), on free ports: tests run in parallel.
    EmbeddedServer::start(ServerOptions {
        port: Some(free_port().unwrap()),
        monitor_port: Some(free_port().unwrap()),
        ..Default::default()
    })
    .expect("embedded nats-server with the project config")
}

async fn connect_as(server: &EmbeddedServer, (user, pass): (&str, &str)) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password(user.into(), pass.into())
        .custom_inbox_prefix(format!("_INBOX.{user}"))
        .connect(server.url())
        .await
        .unwrap()
}

async fn admin(server: &EmbeddedServer) -> TenantAdmin {
    let store = TenantStore::open_default(connect_as(server, dev_users::BROKER).await)
        .await
        .unwrap();
    server.tenant_admin(store)
}

/// Connects as the tenant; every client event (server errors included) goes to the channel.
async fn connect_tenant(
    server: &EmbeddedServer,
    creds: &TenantCredentials,
) -> Result<(async_nats::Client, mpsc::UnboundedReceiver<String>), async_nats::ConnectError> {
    let (tx, rx) = mpsc::unbounded_channel::<String>();
    let client = async_nats::ConnectOptions::with_user_and_password(
        creds.user.clone(),
        creds.password.clone(),
    )
    .custom_inbox_prefix(creds.inbox_prefix())
    .event_callback(move |event| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(event.to_string());
        }
    })
    .max_reconnects(Some(1))
    .connect(server.url())
    .await?;
    Ok((client, rx))
}

/// Waits for the server's `Permissions Violation for <kind> to "<subject>"` (async-nats
/// 0.51 surfaces the server's `-ERR` as `Event::ServerError(ServerError::Other(..))` to the
/// event callback; nothing is returned from `publish`/`subscribe` themselves).
async fn violation(
    events: &mut mpsc::UnboundedReceiver<String>,
    kind: &str,
    subject: &str,
) -> Result<String, String> {
    let wanted = format!("\"{subject}\"").to_lowercase();
    let mut seen = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(ev) = events.recv().await {
            let l = ev.to_lowercase();
            if l.contains("permissions violation") && l.contains(kind) && l.contains(&wanted) {
                return Some(ev);
            }
            seen.push(ev);
        }
        None
    })
    .await;
    match found {
        Ok(Some(ev)) => Ok(ev),
        _ => Err(format!(
            "no permissions violation for {kind} to {subject}; events seen: {seen:?}"
        )),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_credentials_are_refused_everything_but_their_generate_subject() {
    let server = start_server();
    let admin = admin(&server).await;
    let alice = admin.create("alice", Quota::default()).await.unwrap();
    let bob = admin.create("bob", Quota::default()).await.unwrap();
    assert_eq!(
        (alice.user.as_str(), bob.user.as_str()),
        ("tenant-alice", "tenant-bob")
    );
    let rendered = std::fs::read_to_string(admin.runtime().path()).unwrap();
    assert!(
        rendered.contains("user: \"tenant-alice\"") && rendered.contains("user: \"tenant-bob\""),
        "{rendered}"
    );

    // Internal users: a responder on both tenants' generate subjects, and a spy on every
    // subject alice must not reach (nothing she publishes there may arrive).
    // (The controller may not publish to generate subjects: the tenants fence the responders.)
    let controller = connect_as(&server, dev_users::CONTROLLER).await;
    let (client, mut events) = tokio::time::timeout(T, connect_tenant(&server, &alice))
        .await
        .unwrap()
        .expect("alice's generated credentials are accepted");
    let (bob_client, _bob_events) = connect_tenant(&server, &bob).await.unwrap();
    echo_responder_fenced_by(
        &controller,
        &client,
        "faasmoe.v1.generate.alice",
        "gen-alice:",
    )
    .await
    .unwrap();
    echo_responder_fenced_by(
        &controller,
        &bob_client,
        "faasmoe.v1.generate.bob",
        "gen-bob:",
    )
    .await
    .unwrap();
    // (No role may listen to all of faasmoe.v1.>: one spy per role on what it may hear.)
    let spy = connect_as(&server, dev_users::BROKER).await;
    let spy_worker = connect_as(&server, dev_users::WORKER).await;
    let mut spied = futures::stream::select_all([
        spy.subscribe("faasmoe.v1.activate.>").await.unwrap(),
        spy.subscribe("faasmoe.v1.admin.>").await.unwrap(),
        spy_worker
            .queue_subscribe("faasmoe.v1.expert.>", "faasmoe.v1.fn.m.all".into())
            .await
            .unwrap(),
        controller.subscribe("faasmoe.v1.generate.*").await.unwrap(),
    ]);
    spy.flush().await.unwrap();
    spy_worker.flush().await.unwrap();
    controller.flush().await.unwrap();
    // flush only writes the socket; give the server a moment to register the spies.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Her own generate subject works, reply included (allow_responses for the responder).
    let r = tokio::time::timeout(
        T,
        client.request("faasmoe.v1.generate.alice", "prompt".into()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(&r.payload[..], b"gen-alice:prompt");

    // Publishes the server refuses.
    for subject in [
        "faasmoe.v1.expert.m.0.0",
        "faasmoe.v1.generate.bob",
        "faasmoe.v1.activate.m",
        "faasmoe.v1.admin.x",
    ] {
        client.publish(subject, "sneaky".into()).await.unwrap();
        client.flush().await.unwrap();
        let v = violation(&mut events, "publish", subject).await;
        assert!(
            v.is_ok(),
            "publish to {subject} by alice: {}",
            v.unwrap_err()
        );
    }
    // A request on bob's subject is refused too (the publish never reaches his responder).
    let stolen = tokio::time::timeout(
        Duration::from_millis(500),
        client.request("faasmoe.v1.generate.bob", "steal".into()),
    )
    .await;
    assert!(
        !matches!(stolen, Ok(Ok(_))),
        "alice got a reply on bob's generate subject"
    );
    let v = violation(&mut events, "publish", "faasmoe.v1.generate.bob").await;
    assert!(
        v.is_ok(),
        "request on bob's generate subject: {}",
        v.unwrap_err()
    );

    // Subscriptions the server refuses.
    let mut subs = Vec::new();
    for subject in [
        "faasmoe.v1.expert.>",
        "faasmoe.v1.generate.bob",
        "faasmoe.v1.activate.>",
    ] {
        subs.push(client.subscribe(subject).await.unwrap());
        client.flush().await.unwrap();
        let v = violation(&mut events, "subscription", subject).await;
        assert!(
            v.is_ok(),
            "subscribe to {subject} by alice: {}",
            v.unwrap_err()
        );
    }

    // Nothing alice published outside her subject arrived anywhere; her own request did.
    spy.flush().await.unwrap();
    spy_worker.flush().await.unwrap();
    let mut arrived = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), spied.next()).await {
        arrived.push(m.subject.to_string());
    }
    assert_eq!(
        arrived,
        ["faasmoe.v1.generate.alice"],
        "messages that reached internal subscribers"
    );

    // Bob's credentials work for his own subject; the static tenant-demo user still works.
    let r = tokio::time::timeout(
        T,
        bob_client.request("faasmoe.v1.generate.bob", "hi".into()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(&r.payload[..], b"gen-bob:hi");
    let demo = connect_as(&server, dev_users::TENANT_DEMO).await;
    echo_responder_fenced_by(&controller, &demo, "faasmoe.v1.generate.demo", "gen-demo:")
        .await
        .unwrap();
    let r = tokio::time::timeout(T, demo.request("faasmoe.v1.generate.demo", "x".into()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&r.payload[..], b"gen-demo:x");
    // The server logs each refusal too (`... "FAASMOE/user:tenant-alice" - Publish Violation - Subject "..."`).
    let log = server.log_tail(usize::MAX);
    let logged = |kind: &str| {
        log.lines()
            .filter(|l| l.contains("user:tenant-alice") && l.contains(kind))
            .count()
    };
    assert_eq!(
        (
            logged("Publish Violation"),
            logged("Subscription Violation")
        ),
        (5, 3),
        "violations in the server log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_tenant_revokes_its_credentials_and_keeps_the_others() {
    let server = start_server();
    let admin = admin(&server).await;
    let carol = admin
        .create(
            "carol",
            Quota {
                max_concurrent: Some(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let dave = admin.create("dave", Quota::default()).await.unwrap();
    assert!(connect_tenant(&server, &carol).await.is_ok());
    admin.delete("carol").await.unwrap();
    assert!(
        connect_tenant(&server, &carol).await.is_err(),
        "carol's credentials still accepted after delete"
    );
    assert!(matches!(
        admin.store().get("carol").await,
        Err(faasmoe_broker::TenantError::UnknownTenant(_))
    ));
    assert!(
        connect_tenant(&server, &dave).await.is_ok(),
        "dave lost access when carol was deleted"
    );
    assert!(connect_as(&server, dev_users::TENANT_DEMO)
        .await
        .publish("faasmoe.v1.generate.demo", "x".into())
        .await
        .is_ok());
    // A duplicate create changes nothing (the first password keeps working).
    assert!(matches!(
        admin.create("dave", Quota::default()).await,
        Err(faasmoe_broker::TenantError::AlreadyExists(_))
    ));
    assert!(connect_tenant(&server, &dave).await.is_ok());
    // Re-created, carol gets new credentials that work.
    let carol2 = admin.create("carol", Quota::default()).await.unwrap();
    assert_ne!(carol2.password, carol.password);
    assert!(connect_tenant(&server, &carol2).await.is_ok());
}
