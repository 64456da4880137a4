//! The serving runtime: one single-threaded tokio runtime per worker thread, each accepting
//! on its own `SO_REUSEPORT` socket so the kernel spreads connections across them. On two
//! shared cores this shape beat the work-stealing runtime by ~50% (PERFORMANCE.md): no
//! cross-thread wake-ups on the hot path. Shared state lives behind `Arc`s.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;

use axum::Router;
use axum::serve::ListenerExt;
use keyward_core::SystemClock;
use secrecy::ExposeSecret;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::watch;

use crate::config::{Config, RateLimitBackend};
use crate::limits::LimitBackend;
use crate::state::AppState;
use crate::{bootstrap, internal_app};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// One listener per worker, all on the same address (the first fixes an ephemeral port).
/// Public for `examples/http_floor.rs`, which must bind exactly as keyward does.
pub fn bind_workers(
    addr: SocketAddr,
    workers: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let first = bind_reuseport(addr)?;
    let bound = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..workers {
        listeners.push(bind_reuseport(bound)?);
    }
    Ok(listeners)
}

/// Starts one worker thread per listener, each on a current-thread runtime of its own and,
/// when `cores` are given, pinned to one of them (unpinned, the scheduler stacked both workers
/// on one core in some runs: PERFORMANCE.md). Public for the benchmark floors in `examples/`,
/// which must run exactly as keyward does.
pub fn spawn_workers<F, Fut>(
    listeners: Vec<std::net::TcpListener>,
    cores: Option<Vec<core_affinity::CoreId>>,
    serve: F,
) -> std::io::Result<Vec<thread::JoinHandle<std::io::Result<()>>>>
where
    F: Fn(tokio::net::TcpListener) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = std::io::Result<()>>,
{
    let mut handles = Vec::with_capacity(listeners.len());
    for (i, listener) in listeners.into_iter().enumerate() {
        let core = cores
            .as_ref()
            .and_then(|c| c.get(i % c.len().max(1)).copied());
        let serve = serve.clone();
        let handle = thread::Builder::new()
            .name(format!("keyward-worker-{i}"))
            .spawn(move || -> std::io::Result<()> {
                if let Some(core) = core {
                    core_affinity::set_for_current(core);
                }
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(
                        async move { serve(tokio::net::TcpListener::from_std(listener)?).await },
                    )
            })?;
        handles.push(handle);
    }
    Ok(handles)
}

async fn shutdown_requested(mut rx: watch::Receiver<bool>) {
    // An error means the sender is gone, which is a shutdown too.
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn termination_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn serve_on(
    listener: tokio::net::TcpListener,
    app: Router,
    stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown_requested(stop))
    .await
}

/// `keyward serve`: open and migrate the store, bootstrap an empty one, serve until SIGTERM
/// or SIGINT, then drain connections and return.
pub fn run(config: Config) -> Result<(), BoxError> {
    let main_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let workers = match config.server.workers {
        0 => thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        n => n,
    };
    let mut master_key = None;
    let mut feed_head = 0;
    let state = main_rt.block_on(async {
        let store = keyward_store::open(&config.store_url).await?;
        store.migrate().await?;
        // Before anything is cached: older changes concern nothing this node holds.
        feed_head = store.key_changes_head().await?;
        let mut state = AppState::new(config, store, Arc::new(SystemClock));
        if state.config.ratelimit.backend == RateLimitBackend::Redis {
            let url = state.config.ratelimit.url.clone().unwrap_or_default();
            let backend = crate::redis_limits::RedisBackend::new(&url)
                .map_err(|e| format!("ratelimit.url: {e}"))?;
            state = state.with_limit_backend(Arc::new(backend));
            tracing::info!("rate limits shared through redis");
        }
        let master = crate::master_key::MasterKey::load(&state.config.server.data_dir)?;
        let tokens = crate::tokens::TokenService::load(
            &state.config.tokens,
            state.config.auth.proxy_jwt_secret.as_deref(),
            &*state.store,
            Some(&master),
            state.clock.now(),
        )
        .await?;
        state = state.with_tokens(Arc::new(tokens));
        master_key = Some(master);
        if let Some((key, secret)) = bootstrap::ensure_bootstrapped(&state).await? {
            // Printed, never logged: the one time this secret leaves the process. One write, so
            // a reader of the pipe never sees half of it.
            let notice = secrecy::SecretString::from(format!(
                "\nkeyward: first start — created the default organisation and project, and a management key ({}).\nStore it now; it is shown only this once:\n{}\n\n",
                key.id,
                secret.expose_secret()
            ));
            let _ = std::io::Write::write_all(
                &mut std::io::stderr().lock(),
                notice.expose_secret().as_bytes(),
            );
        }
        Ok::<_, BoxError>(state)
    })?;

    let public = bind_workers(state.config.server.listen, workers)?;
    let public_addr = public[0].local_addr()?;
    let internal = std::net::TcpListener::bind(state.config.server.internal_listen)?;
    internal.set_nonblocking(true)?;
    let internal_addr = internal.local_addr()?;
    tracing::info!(public = %public_addr, internal = %internal_addr, workers, "keyward listening");

    let (stop_tx, stop_rx) = watch::channel(false);
    // Before the workers start: they keep the metric handles they first look up.
    let metrics = crate::metrics::install();
    let metrics_upkeep = metrics.clone();
    let front = Arc::new(crate::front::Front::new(state.clone()));
    let cores = state
        .config
        .server
        .pin_workers
        .then(core_affinity::get_core_ids)
        .flatten();
    let worker_stop = stop_rx.clone();
    let handles = spawn_workers(public, cores, move |listener| {
        crate::front::serve(listener, front.clone(), worker_stop.clone())
    })?;

    main_rt.block_on(async {
        let internal = tokio::net::TcpListener::from_std(internal)?;
        let internal_server = tokio::spawn(serve_on(
            internal,
            internal_app(state.clone(), metrics),
            stop_rx.clone(),
        ));
        tokio::spawn(crate::cache::follow_changes(
            state.keys.clone(),
            state.store.clone(),
            state.clock.clone(),
            feed_head,
            stop_rx.clone(),
        ));
        tokio::spawn(flush_usage_periodically(state.clone(), stop_rx.clone()));
        if let Some(metrics) = metrics_upkeep {
            tokio::spawn(drain_metrics_periodically(metrics, stop_rx.clone()));
        }
        tokio::spawn(reload_signing_keys(
            state.clone(),
            master_key,
            stop_rx.clone(),
        ));
        termination_signal().await;
        tracing::info!("shutting down: draining connections");
        let _ = stop_tx.send(true);
        let _ = internal_server.await;
        Ok::<_, BoxError>(())
    })?;
    for handle in handles {
        match handle.join() {
            Ok(result) => result?,
            Err(_) => return Err("a worker thread panicked".into()),
        }
    }
    // Every connection is closed: no request can count anything any more.
    main_rt.block_on(flush_usage(&state));
    tracing::info!("keyward stopped");
    Ok(())
}

/// Picks up signing-key rotations made elsewhere (the CLI, another node) every 10 s.
async fn reload_signing_keys(
    state: AppState,
    master: Option<crate::master_key::MasterKey>,
    stop: watch::Receiver<bool>,
) {
    let Some(tokens) = state.tokens.clone() else {
        return;
    };
    let mut interval = tokio::time::interval(std::time::Duration::from_secs(10));
    interval.tick().await;
    let stopped = shutdown_requested(stop);
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = interval.tick() => {
                if let Err(e) = tokens.reload(&*state.store, master.as_ref(), state.clock.now()).await {
                    tracing::warn!(error = %e, "cannot reload the signing keys");
                }
            }
            _ = &mut stopped => return,
        }
    }
}

/// Writes usage counts and live credit counts; drops idle limiter state.
async fn flush_usage(state: &AppState) {
    let now = state.clock.now();
    match state.usage.flush(&*state.store, now).await {
        Ok(0) => {}
        Ok(rows) => tracing::debug!(rows, "usage written"),
        Err(e) => tracing::warn!(error = %e, "cannot write usage; kept in memory for the next try"),
    }
    let mut credits = state.limiter.backend().dirty_credits();
    credits.extend(state.limiter.local().dirty_credits());
    if !credits.is_empty()
        && let Err(e) = state.store.store_credits(&credits).await
    {
        tracing::warn!(error = %e, "cannot write credit counts; the limiter keeps them");
    }
    if let Some(tokens) = &state.tokens {
        tokens.evict_identities(now);
    }
    state.limiter.backend().evict_idle(now);
    state.limiter.local().evict_idle(now);
}

/// Folds recorded latency samples into the histograms every 5 s. The recorder keeps every
/// sample until then: without this, memory grew with each request until `/metrics` was read.
async fn drain_metrics_periodically(
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    stop: watch::Receiver<bool>,
) {
    let mut interval = tokio::time::interval(std::time::Duration::from_secs(5));
    let stopped = shutdown_requested(stop);
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = interval.tick() => metrics.run_upkeep(),
            _ = &mut stopped => return,
        }
    }
}

async fn flush_usage_periodically(state: AppState, stop: watch::Receiver<bool>) {
    let period = std::time::Duration::from_secs(state.config.usage.flush_seconds);
    let mut interval = tokio::time::interval(period);
    interval.tick().await;
    let stopped = shutdown_requested(stop);
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = interval.tick() => flush_usage(&state).await,
            _ = &mut stopped => return,
        }
    }
}
