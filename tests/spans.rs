//! The `publish` and `handle` spans and their fields, captured by a small
//! `tracing_subscriber` layer installed as the thread's default subscriber
//! around a current-thread runtime (so parallel tests cannot interfere).
#![cfg(not(feature = "loom"))]

mod common;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{fast_config, Progress};
use eventbus::envelope::{HEADER_AGGREGATE_ID, HEADER_CORRELATION_ID, HEADER_EVENT_TYPE, HEADER_TRACE_ID};
use eventbus::{Delivery, Envelope, EventBus, MemoryBroker};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

type Fields = BTreeMap<String, String>;

struct FieldsVisitor<'a>(&'a mut Fields);

impl Visit for FieldsVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.0.insert(field.name().to_string(), format!("{value:?}"));
    }
}

/// Closed spans (name, fields) and log events (message, fields of the spans
/// they were logged in, outermost first, inner ones overriding).
#[derive(Clone, Default)]
struct Capture {
    spans: Arc<Mutex<Vec<(String, Fields)>>>,
    events: Arc<Mutex<Vec<(String, Fields)>>>,
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::new();
        attrs.record(&mut FieldsVisitor(&mut fields));
        ctx.span(id).expect("new span").extensions_mut().insert(fields);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(fields) = span.extensions_mut().get_mut::<Fields>() {
                values.record(&mut FieldsVisitor(fields));
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut own = Fields::new();
        event.record(&mut FieldsVisitor(&mut own));
        let message = own.remove("message").unwrap_or_default();
        let mut span_fields = Fields::new();
        for span in ctx.event_scope(event).into_iter().flat_map(|scope| scope.from_root()) {
            if let Some(fields) = span.extensions().get::<Fields>() {
                span_fields.extend(fields.clone());
            }
        }
        self.events.lock().unwrap().push((message, span_fields));
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(&id) {
            let fields = span.extensions_mut().remove::<Fields>().unwrap_or_default();
            self.spans.lock().unwrap().push((span.name().to_string(), fields));
        }
    }
}

impl Capture {
    fn span(&self, name: &str, topic: &str) -> Fields {
        let spans = self.spans.lock().unwrap();
        let found: Vec<&Fields> = spans
            .iter()
            .filter(|(n, f)| n == name && f.get("topic").map(String::as_str) == Some(topic))
            .map(|(_, f)| f)
            .collect();
        assert_eq!(found.len(), 1, "one {name} span of {topic}: {spans:?}");
        found[0].clone()
    }
}

fn fields(pairs: &[(&str, &str)]) -> Fields {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn publish_and_handle_spans_carry_position_identity_attempt_and_trace_ids() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone());
    let _default = tracing::subscriber::set_default(subscriber);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let broker = MemoryBroker::default();
        eventbus::Broker::ensure_topic(&broker, "orders", 1).await.unwrap();
        eventbus::Broker::ensure_topic(&broker, "notes", 1).await.unwrap();
        let bus = EventBus::builder(broker).config(fast_config("spans")).build().unwrap();
        let progress = Arc::new(Progress::default());
        let calls = Arc::new(AtomicU32::new(0));
        {
            let (progress, calls) = (progress.clone(), calls.clone());
            bus.subscribe_envelope("orders", move |_: Envelope| {
                let (progress, calls) = (progress.clone(), calls.clone());
                async move {
                    tracing::info!("handling an order");
                    if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                        return Err("first attempt fails".into());
                    }
                    progress.bump();
                    Ok(())
                }
            })
            .await
            .unwrap();
        }
        {
            let progress = progress.clone();
            bus.subscribe("notes", move |_: Delivery| {
                let progress = progress.clone();
                async move {
                    progress.bump();
                    Ok(())
                }
            })
            .await
            .unwrap();
        }
        bus.start().await.unwrap();
        let mut env = Envelope::new("order-42", "OrderPlaced", 1, &serde_json::json!({})).unwrap();
        env.trace_id = Some("trace-1".into());
        env.correlation_id = Some("corr-1".into());
        bus.publish_envelope("orders", &env).await.unwrap();
        bus.publish_envelope("orders", &env).await.unwrap(); // offset 1: the second event
        let headers = vec![
            (HEADER_AGGREGATE_ID.to_string(), b"note-7".to_vec()),
            (HEADER_EVENT_TYPE.to_string(), b"NoteAdded".to_vec()),
            (HEADER_TRACE_ID.to_string(), b"trace-2".to_vec()),
            (HEADER_CORRELATION_ID.to_string(), b"corr-2".to_vec()),
        ];
        bus.publish("notes", None, headers, b"raw".to_vec()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), progress.wait_for(3)).await.expect("three events handled");
        bus.close().await;
    });

    let publish = |offset: &str| {
        fields(&[
            ("topic", "orders"),
            ("partition", "0"),
            ("offset", offset),
            ("aggregate_id", "order-42"),
            ("event_type", "OrderPlaced"),
            ("trace_id", "trace-1"),
            ("correlation_id", "corr-1"),
        ])
    };
    let spans = capture.spans.lock().unwrap().clone();
    let publishes: Vec<&Fields> =
        spans.iter().filter(|(n, f)| n == "publish" && f["topic"] == "orders").map(|(_, f)| f).collect();
    assert_eq!(publishes, vec![&publish("0"), &publish("1")]);
    assert_eq!(capture.span("publish", "notes"), fields(&[("topic", "notes"), ("partition", "0"), ("offset", "0")]));

    let handles: Vec<&Fields> =
        spans.iter().filter(|(n, f)| n == "handle" && f["topic"] == "orders").map(|(_, f)| f).collect();
    let handle = |offset: &str, attempt: &str| {
        fields(&[
            ("topic", "orders"),
            ("partition", "0"),
            ("offset", offset),
            ("delivery_attempt", "1"),
            ("attempt", attempt),
            ("aggregate_id", "order-42"),
            ("event_type", "OrderPlaced"),
            ("trace_id", "trace-1"),
            ("correlation_id", "corr-1"),
        ])
    };
    assert_eq!(handles, vec![&handle("0", "2"), &handle("1", "1")], "the first event succeeded on its second attempt");
    assert_eq!(
        capture.span("handle", "notes"),
        fields(&[
            ("topic", "notes"),
            ("partition", "0"),
            ("offset", "0"),
            ("delivery_attempt", "1"),
            ("attempt", "1"),
            ("aggregate_id", "note-7"),
            ("event_type", "NoteAdded"),
            ("trace_id", "trace-2"),
            ("correlation_id", "corr-2"),
        ])
    );

    // The handler's own log lines are inside its span, IDs included.
    let events = capture.events.lock().unwrap();
    let in_handler: Vec<&Fields> = events.iter().filter(|(m, _)| m == "handling an order").map(|(_, f)| f).collect();
    let seen: Vec<(&str, &str, &str, &str)> = in_handler
        .iter()
        .map(|f| (f["offset"].as_str(), f["attempt"].as_str(), f["trace_id"].as_str(), f["correlation_id"].as_str()))
        .collect();
    assert_eq!(
        seen,
        vec![("0", "1", "trace-1", "corr-1"), ("0", "2", "trace-1", "corr-1"), ("1", "1", "trace-1", "corr-1")],
        "two attempts of the first event, one of the second, each in its attempt span"
    );
}
