//! Function activation with a real nats-server (project `nats.conf`) and real
//! `faasmoe-expert-worker` processes on a generated tiny checkpoint.
//!
//! Build the worker first: `cargo build -p faasmoe-expert-worker`.

use faasmoe_proto::connection::NatsArgs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use faasmoe_broker::{ActivationConfig, Activator, Deployment, InstanceState, LocalProcessBackend};
use faasmoe_e2e::{cargo_bin, dev_users, NatsServer};
use faasmoe_proto::activation::{ActivateReply, ActivateRequest, ActivateResult};
use faasmoe_proto::events::{EventKind, FunctionEvent};
use faasmoe_proto::{subject, ErrorCode};
use futures::StreamExt;

const MODEL: &str = "tiny";

fn checkpoint() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("tiny");
    let g = faasmoe_model::random_checkpoint::preset("tiny").unwrap();
    faasmoe_model::random_checkpoint::write_checkpoint(
        &model_dir,
        &g,
        7,
        faasmoe_model::random_checkpoint::DEFAULT_MAX_SHARD_BYTES,
        |_, _| {},
    )
    .unwrap();
    (dir, model_dir)
}

struct Setup {
    server: NatsServer,
    activator: Activator,
    function_id: String,
    layer: u32,
    _dir: tempfile::TempDir,
}

async fn setup(max_instances: u32, idle_timeout_ms: u64, worker_bin: Option<PathBuf>) -> Setup {
    let (dir, model_dir) = checkpoint();
    let server = NatsServer::start_project_config();
    let mut d = Deployment::new(&model_dir);
    d.model_id = Some(MODEL.into());
    d.granularity = 4;
    let layout = d.layout().unwrap();
    let f = layout.functions[0].clone();
    let backend = LocalProcessBackend {
        worker_bin: worker_bin.unwrap_or_else(|| cargo_bin("faasmoe-expert-worker")),
        nats: NatsArgs::with_user(server.url(), dev_users::WORKER.0, dev_users::WORKER.1),
        model_dir,
        model_id: MODEL.into(),
        idle_timeout_ms,
        log_dir: Some(dir.path().join("logs")),
        env: vec![],
    };
    let cfg = ActivationConfig {
        max_instances_per_function: max_instances,
        ready_timeout: Duration::from_secs(30),
        ..ActivationConfig::new(MODEL, layout)
    };
    let client = server.connect_as(dev_users::BROKER).await.unwrap();
    let activator = Activator::start(client, cfg, Arc::new(backend))
        .await
        .unwrap();
    Setup {
        server,
        activator,
        function_id: f.id,
        layer: f.layer,
        _dir: dir,
    }
}

fn request(function_id: &str, layer: u32, by: usize) -> ActivateRequest {
    ActivateRequest {
        version: faasmoe_proto::PROTOCOL_VERSION,
        model: MODEL.into(),
        function_id: function_id.into(),
        layer,
        experts: vec![0],
        requested_by: format!("test-{by}"),
        wait_ms: None,
    }
}

async fn activate_over_nats(client: &async_nats::Client, req: &ActivateRequest) -> ActivateResult {
    let msg = tokio::time::timeout(
        Duration::from_secs(40),
        client.request(subject::activate(MODEL).unwrap(), req.encode()),
    )
    .await
    .expect("activation reply in time")
    .expect("activation request");
    ActivateReply::decode(&msg.payload).unwrap().result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_activations_start_one_instance_that_scales_to_zero() {
    let s = setup(2, 1500, None).await;
    let controller = s.server.connect_as(dev_users::CONTROLLER).await.unwrap();
    // Events are the broker's to read (the controller may not subscribe to them).
    let watcher = s.server.connect_as(dev_users::BROKER).await.unwrap();
    let mut events = watcher
        .subscribe(subject::events(MODEL).unwrap())
        .await
        .unwrap();
    watcher.flush().await.unwrap();

    let replies = futures::future::join_all((0..8).map(|i| {
        let c = controller.clone();
        let req = request(&s.function_id, s.layer, i);
        async move { activate_over_nats(&c, &req).await }
    }))
    .await;
    let mut ids = Vec::new();
    for r in &replies {
        match r {
            ActivateResult::Ok {
                instance_id,
                cold_start_ms,
                already_running,
            } => {
                assert!(!already_running, "{r:?}");
                assert!(*cold_start_ms > 0.0, "{r:?}");
                ids.push(instance_id.clone());
            }
            ActivateResult::Err(e) => panic!("activation failed: {e:?}"),
        }
    }
    ids.dedup();
    assert_eq!(
        ids.len(),
        1,
        "all eight waiters get the same instance: {replies:?}"
    );
    let instance_id = ids.pop().unwrap();
    assert_eq!(s.activator.spawn_count(), 1, "exactly one spawn");
    assert_eq!(s.activator.peak_alive(&s.function_id), 1);
    let live = s.activator.instances();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].state, InstanceState::Ready);

    // A ready, subscribed instance: the next activation is answered without a spawn.
    match activate_over_nats(&controller, &request(&s.function_id, s.layer, 9)).await {
        ActivateResult::Ok {
            instance_id: id,
            already_running: true,
            cold_start_ms,
        } => {
            assert_eq!(id, instance_id);
            assert_eq!(cold_start_ms, 0.0);
        }
        other => panic!("expected already_running, got {other:?}"),
    }
    assert_eq!(s.activator.spawn_count(), 1);

    // Scale to zero: the worker exits after its idle timeout and the broker records it.
    let mut started = 0;
    let mut broker_stopped = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while broker_stopped.is_none() {
        let msg = tokio::time::timeout_at(deadline, events.next())
            .await
            .expect("stopped event in time")
            .unwrap();
        let ev = FunctionEvent::decode(&msg.payload).unwrap();
        assert_eq!(ev.instance_id, instance_id);
        match ev.kind {
            EventKind::Started => started += 1,
            // Only the broker publishes `stopped`, once the process is reaped (the worker's own
            // last event is `draining`).
            // The broker queues it just before it records the exit: give the record a moment.
            EventKind::Stopped => {
                let t0 = tokio::time::Instant::now();
                while !(s.activator.instances().is_empty() && s.activator.exited().len() == 1) {
                    assert!(
                        t0.elapsed() < Duration::from_secs(2),
                        "stopped, yet the exit is not recorded: {ev:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                broker_stopped = Some(ev)
            }
            EventKind::SpawnFailed => panic!("spawn failed: {ev:?}"),
            _ => {}
        }
    }
    assert_eq!(started, 1, "one started event");
    assert_eq!(broker_stopped.unwrap().exit_status, Some(0));
    let exited = s.activator.exited();
    assert_eq!(exited[0].instance_id, instance_id);
    assert_eq!(exited[0].state, InstanceState::Exited);
    assert!(exited[0].exit.unwrap().success(), "{:?}", exited[0].exit);
    assert!(exited[0].cold_start_ms.unwrap() > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activations_never_exceed_the_instance_cap() {
    let s = setup(2, 60_000, None).await;
    let a = &s.activator;
    let first = match a.activate(&request(&s.function_id, s.layer, 0)).await {
        ActivateResult::Ok { instance_id, .. } => instance_id,
        other => panic!("{other:?}"),
    };
    // A second instance on request (busy function), up to the cap of 2 ...
    let second = match a.scale_up(&s.function_id).await {
        ActivateResult::Ok {
            instance_id,
            already_running: false,
            ..
        } => instance_id,
        other => panic!("{other:?}"),
    };
    assert_ne!(first, second);
    // ... and no further: concurrent demands for more all fail with `unavailable`.
    let more = futures::future::join_all((0..4).map(|_| a.scale_up(&s.function_id))).await;
    for r in &more {
        match r {
            ActivateResult::Err(e) => assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}"),
            other => panic!("a third instance was started: {other:?}"),
        }
    }
    // Plain activations at the cap are answered by a running instance.
    assert!(matches!(
        a.activate(&request(&s.function_id, s.layer, 1)).await,
        ActivateResult::Ok {
            already_running: true,
            ..
        }
    ));
    assert_eq!(a.alive(&s.function_id), 2);
    assert_eq!(a.peak_alive(&s.function_id), 2);
    assert_eq!(a.spawn_count(), 2);

    // Typed errors for what is not in the layout.
    let mut bad = request("l99-e0-3", s.layer, 2);
    assert!(
        matches!(a.activate(&bad).await, ActivateResult::Err(e) if e.code == ErrorCode::UnknownExpert)
    );
    bad = request(&s.function_id, s.layer, 3);
    bad.model = "other".into();
    assert!(
        matches!(a.activate(&bad).await, ActivateResult::Err(e) if e.code == ErrorCode::BadRequest)
    );
    let c = s.server.connect_as(dev_users::CONTROLLER).await.unwrap();
    let reply = c
        .request(subject::activate(MODEL).unwrap(), "{".into())
        .await
        .unwrap();
    assert!(
        matches!(ActivateReply::decode(&reply.payload).unwrap().result, ActivateResult::Err(e) if e.code == ErrorCode::Malformed)
    );

    // Shutdown drains both instances (SIGTERM → exit 0) and records them.
    a.shutdown(Duration::from_secs(10)).await;
    assert!(a.instances().is_empty());
    let exited = a.exited();
    assert_eq!(exited.len(), 2);
    assert!(
        exited.iter().all(|i| i.exit.unwrap().success()),
        "{exited:?}"
    );
    assert!(
        matches!(a.activate(&request(&s.function_id, s.layer, 4)).await, ActivateResult::Err(e) if e.code == ErrorCode::Unavailable)
    );
}

#[tokio::test]
async fn a_worker_that_cannot_be_spawned_is_unavailable_with_a_spawn_failed_event() {
    let s = setup(
        1,
        1000,
        Some(PathBuf::from("/nonexistent/faasmoe-expert-worker")),
    )
    .await;
    let c = s.server.connect_as(dev_users::CONTROLLER).await.unwrap();
    let watcher = s.server.connect_as(dev_users::BROKER).await.unwrap();
    let mut events = watcher
        .subscribe(subject::events(MODEL).unwrap())
        .await
        .unwrap();
    watcher.flush().await.unwrap();
    match activate_over_nats(&c, &request(&s.function_id, s.layer, 0)).await {
        ActivateResult::Err(e) => {
            assert_eq!(e.code, ErrorCode::Unavailable);
            assert!(e.message.contains("spawn failed"), "{e:?}");
        }
        other => panic!("{other:?}"),
    }
    let msg = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        FunctionEvent::decode(&msg.payload).unwrap().kind,
        EventKind::SpawnFailed
    );
    assert_eq!(s.activator.spawn_count(), 0);
    assert!(s.activator.instances().is_empty());
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a child process id the activator reported; no memory is involved.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// Tells the broker, as the worker would, that `instance` has unsubscribed (its `draining`
/// event): the broker then counts it as draining until the process exits.
async fn announce_draining(s: &Setup, instance: &faasmoe_broker::InstanceInfo) {
    let broker = s.server.connect_as(dev_users::BROKER).await.unwrap();
    let ev = FunctionEvent {
        kind: EventKind::Draining,
        model: MODEL.into(),
        function_id: instance.function_id.clone(),
        instance_id: instance.instance_id.clone(),
        pid: instance.pid,
        at_unix_ms: 0,
        cold_start_ms: None,
        exit_status: Some(0),
    };
    broker
        .publish(subject::events(MODEL).unwrap(), ev.encode())
        .await
        .unwrap();
    broker.flush().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while s
        .activator
        .instances()
        .iter()
        .any(|i| i.instance_id == instance.instance_id && i.state != InstanceState::Draining)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the broker did not record the draining event"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn first_instance(s: &Setup) -> faasmoe_broker::InstanceInfo {
    match s
        .activator
        .activate(&request(&s.function_id, s.layer, 0))
        .await
    {
        ActivateResult::Ok {
            already_running: false,
            ..
        } => {}
        other => panic!("{other:?}"),
    }
    let live = s.activator.instances();
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0].state, InstanceState::Ready);
    live[0].clone()
}

/// At the cap (1), with the only instance draining, an activation is not refused: it waits
/// until that instance has exited, then starts a new one and replies with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_an_activation_waits_for_the_draining_instance_then_gets_a_new_one() {
    let s = setup(1, 60_000, None).await;
    let a = first_instance(&s).await;
    announce_draining(&s, &a).await;
    // The draining instance exits 1 s from now.
    let pid = a.pid.expect("local process");
    let killer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        signal(pid, libc::SIGKILL);
    });
    let c = s.server.connect_as(dev_users::CONTROLLER).await.unwrap();
    let t0 = std::time::Instant::now();
    let mut req = request(&s.function_id, s.layer, 1);
    req.wait_ms = Some(20_000);
    let r = activate_over_nats(&c, &req).await;
    let waited = t0.elapsed();
    killer.await.unwrap();
    match &r {
        ActivateResult::Ok {
            instance_id,
            already_running: false,
            ..
        } => assert_ne!(instance_id, &a.instance_id),
        other => panic!("expected a new instance after the draining one exited, got {other:?}"),
    }
    assert!(
        waited >= Duration::from_millis(900),
        "replied before the draining instance exited: {waited:?}"
    );
    assert_eq!(s.activator.spawn_count(), 2);
    assert_eq!(s.activator.peak_alive(&s.function_id), 1, "the cap held");
    eprintln!(
        "activation at the cap waited {waited:?} for the draining instance, then got a new one"
    );
    s.activator.shutdown(Duration::from_secs(5)).await;
}

/// The wait at the cap ends within the requester's `wait_ms`, with a typed `unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wait_at_the_cap_ends_within_the_requesters_wait_ms() {
    let s = setup(1, 60_000, None).await;
    let a = first_instance(&s).await;
    announce_draining(&s, &a).await;
    let c = s.server.connect_as(dev_users::CONTROLLER).await.unwrap();
    let mut req = request(&s.function_id, s.layer, 1);
    req.wait_ms = Some(1_500);
    let t0 = std::time::Instant::now();
    let r = activate_over_nats(&c, &req).await;
    let took = t0.elapsed();
    match &r {
        ActivateResult::Err(e) => {
            assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
            assert!(e.message.contains("cap"), "{e:?}");
        }
        other => panic!("expected unavailable, got {other:?}"),
    }
    assert!(
        took >= Duration::from_millis(1_000) && took < Duration::from_millis(1_500),
        "replied after {took:?} for wait_ms 1500"
    );
    assert_eq!(s.activator.spawn_count(), 1);
    s.activator.shutdown(Duration::from_secs(5)).await;
}

/// An instance that answers nothing (stopped with SIGSTOP: the extreme of a busy or starved
/// worker) is still taken as running: `already_running`, nothing spawned, nothing marked
/// draining; first when the broker does not know its service id yet, then by the direct ping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_answers_nothing_is_not_taken_for_a_missing_one() {
    let s = setup(1, 60_000, None).await;
    let a = first_instance(&s).await;
    let pid = a.pid.expect("local process");
    let c = s.server.connect_as(dev_users::CONTROLLER).await.unwrap();
    for round in ["unknown service id", "direct ping"] {
        signal(pid, libc::SIGSTOP);
        let t0 = std::time::Instant::now();
        let r = activate_over_nats(&c, &request(&s.function_id, s.layer, 1)).await;
        let took = t0.elapsed();
        signal(pid, libc::SIGCONT);
        match &r {
            ActivateResult::Ok {
                instance_id,
                already_running: true,
                ..
            } => assert_eq!(instance_id, &a.instance_id),
            other => panic!("{round}: a frozen instance was not taken as running: {other:?}"),
        }
        assert!(took < Duration::from_secs(3), "{round}: {took:?}");
        assert_eq!(
            s.activator.instances()[0].state,
            InstanceState::Ready,
            "{round}"
        );
        eprintln!("{round}: frozen instance answered already_running in {took:?}");
        // Now that it runs again it answers the pings (and the broker learns its id).
        match activate_over_nats(&c, &request(&s.function_id, s.layer, 2)).await {
            ActivateResult::Ok {
                already_running: true,
                ..
            } => {}
            other => panic!("{round}: {other:?}"),
        }
    }
    assert_eq!(s.activator.spawn_count(), 1);
    s.activator.shutdown(Duration::from_secs(5)).await;
}
