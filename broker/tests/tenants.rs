//! Tenant records and atomic admission against a real nats-server with JetStream.

use faasmoe_broker::{Quota, QuotaError, QuotaKind, TenantError, TenantStore};
use faasmoe_e2e::{dev_users, NatsServer};

async fn store(server: &NatsServer, who: (&str, &str)) -> TenantStore {
    TenantStore::open_default(server.connect_as(who).await.unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_racing_for_one_budget_never_overspend_or_lose_updates() {
    let server = NatsServer::start_project_config();
    let admin = store(&server, dev_users::BROKER).await;
    let budget = 1500;
    admin
        .create(
            "race",
            Quota {
                total_tokens: Some(budget),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // Two controllers: separate connections, separate handles.
    let a = store(&server, dev_users::CONTROLLER).await;
    let b = TenantStore::open_default(server.connect_as(dev_users::CONTROLLER).await.unwrap())
        .await
        .unwrap();
    let run = |s: TenantStore, salt: u64| async move {
        let (mut charged, mut admitted, mut refused) = (0u64, 0u32, 0u32);
        for i in 0..50u64 {
            match s.admit("race", 10, 40).await {
                Ok(adm) => {
                    admitted += 1;
                    let actual = 10 + (i + salt) % 4 * 10; // 10..=40 of the 50 reserved
                    s.settle(adm, actual).await.unwrap();
                    charged += actual;
                }
                Err(QuotaError::QuotaExceeded {
                    which: QuotaKind::TotalTokens,
                    ..
                }) => refused += 1,
                Err(e) => panic!("unexpected admission error: {e}"),
            }
        }
        (charged, admitted, refused)
    };
    let (ra, rb) = tokio::join!(tokio::spawn(run(a, 0)), tokio::spawn(run(b, 1)));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    let usage = admin.usage("race").await.unwrap();
    // Demand: 100 requests × 25 tokens on average = 2500 > budget.
    assert!(
        ra.2 + rb.2 > 0,
        "the budget should have refused some requests: {ra:?} {rb:?}"
    );
    assert_eq!(
        usage.total_tokens,
        ra.0 + rb.0,
        "stored total equals the sum of charges (no lost update)"
    );
    assert!(
        usage.total_tokens <= budget,
        "charged {} > budget {budget}",
        usage.total_tokens
    );
    assert_eq!(usage.in_flight, 0);
    assert_eq!(usage.reserved_tokens, 0);
    // A reservation that fits must still be admitted after the race: the budget is used to
    // within one reservation (50) or refusals would be spurious.
    assert!(usage.total_tokens + 50 > budget || admin.admit("race", 10, 40).await.is_ok());
}

#[tokio::test]
async fn unknown_tenant_concurrency_and_rate_limits_are_typed() {
    let server = NatsServer::start_project_config();
    let s = store(&server, dev_users::BROKER).await;
    assert!(
        matches!(s.admit("nobody", 1, 1).await, Err(QuotaError::UnknownTenant(n)) if n == "nobody")
    );

    s.create(
        "acme",
        Quota {
            max_concurrent: Some(2),
            tokens_per_minute: Some(200),
            total_tokens: None,
        },
    )
    .await
    .unwrap();
    let a1 = s.admit("acme", 10, 50).await.unwrap();
    let a2 = s.admit("acme", 10, 50).await.unwrap();
    match s.admit("acme", 1, 1).await {
        Err(QuotaError::QuotaExceeded {
            which: QuotaKind::Concurrency,
            message,
        }) => assert!(message.contains("2 of 2"), "{message}"),
        other => panic!("expected concurrency refusal, got {other:?}"),
    }
    assert_eq!(s.usage("acme").await.unwrap().in_flight, 2);
    // 120 of 200 tokens/min reserved; settling a1 with 20 refunds 40 to the window.
    let u = s.settle(a1, 20).await.unwrap();
    assert_eq!((u.in_flight, u.total_tokens, u.window_tokens), (1, 20, 80));
    match s.admit("acme", 100, 50).await {
        Err(QuotaError::QuotaExceeded {
            which: QuotaKind::TokensPerMinute,
            ..
        }) => {}
        other => panic!("expected tokens_per_minute refusal, got {other:?}"),
    }
    let a3 = s.admit("acme", 60, 60).await.unwrap(); // 80 + 120 = 200: fits exactly
                                                     // A failed request charges only what it got processed.
    s.settle(a2, 0).await.unwrap();
    let u = s.settle(a3, 500).await.unwrap(); // clamped to the reservation
    assert_eq!(
        (u.in_flight, u.total_tokens, u.reserved_tokens),
        (0, 20 + 120, 0)
    );
    assert_eq!(
        QuotaError::QuotaExceeded {
            which: QuotaKind::Concurrency,
            message: String::new()
        }
        .to_wire()
        .code,
        faasmoe_proto::ErrorCode::QuotaExceeded
    );
}

#[tokio::test]
async fn tenant_administration_round_trips_through_the_kv() {
    let server = NatsServer::start_project_config();
    let s = store(&server, dev_users::BROKER).await;
    let creds = s
        .create(
            "t1",
            Quota {
                max_concurrent: Some(4),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(creds.user, "tenant-t1");
    assert!(creds.password.len() >= 32);
    let entry = creds.nats_user_entry();
    assert!(
        entry.contains("faasmoe.v1.generate.t1")
            && entry.contains("\"_INBOX.tenant-t1.>\"")
            && !entry.contains("allow_responses"),
        "{entry}"
    );
    assert!(
        !entry.contains(&creds.password) && entry.contains("password: \"$2a$06$"),
        "the entry holds the bcrypt hash only: {entry}"
    );
    assert!(matches!(
        s.create("t1", Quota::default()).await,
        Err(TenantError::AlreadyExists(_))
    ));
    assert!(matches!(
        s.create("a.b", Quota::default()).await,
        Err(TenantError::InvalidName(_))
    ));
    s.create("t0", Quota::default()).await.unwrap();
    let names: Vec<String> = s
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, ["t0", "t1"]);
    let r = s
        .set_quota(
            "t1",
            Quota {
                total_tokens: Some(10),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(r.quota.total_tokens, Some(10));
    assert_eq!(s.get("t1").await.unwrap().quota.max_concurrent, None);
    s.delete("t1").await.unwrap();
    assert!(matches!(
        s.get("t1").await,
        Err(TenantError::UnknownTenant(_))
    ));
    assert!(matches!(
        s.delete("t1").await,
        Err(TenantError::UnknownTenant(_))
    ));
    assert_eq!(s.list().await.unwrap().len(), 1);
    // Re-creating a deleted tenant works and starts from zero usage.
    s.create("t1", Quota::default()).await.unwrap();
    assert_eq!(s.usage("t1").await.unwrap().total_tokens, 0);
}
