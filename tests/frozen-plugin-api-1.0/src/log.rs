//! Forwarding of a plugin's `tracing` events to the host. Each cdylib links its own copy of
//! `tracing`, so without this a plugin's logs would go to a subscriber nobody installed.

use crate::LogSink;
use abi_stable::std_types::RStr;
use std::fmt::Write as _;
use std::sync::OnceLock;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata};

static SINK: OnceLock<LogSink> = OnceLock::new();

/// Level code used across the boundary: 0 error, 1 warn, 2 info, 3 debug, 4 trace.
pub fn level_code(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 0,
        Level::WARN => 1,
        Level::INFO => 2,
        Level::DEBUG => 3,
        Level::TRACE => 4,
    }
}

struct Forwarder {
    sink: LogSink,
}

#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.rest, " {}={value}", field.name());
        }
    }
}

impl tracing::Subscriber for Forwarder {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        level_code(metadata.level()) <= self.sink.max_level
    }
    fn new_span(&self, _span: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _span: &Id, _values: &Record<'_>) {}
    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let text = format!("{}{}", fields.message, fields.rest);
        (self.sink.log)(
            level_code(event.metadata().level()),
            RStr::from_str(event.metadata().target()),
            RStr::from_str(&text),
        );
    }
    fn enter(&self, _span: &Id) {}
    fn exit(&self, _span: &Id) {}
}

/// Installs the host's sink as this library's `tracing` subscriber. Called by the host once
/// per library; later calls are ignored.
pub extern "C" fn set_log_sink(sink: LogSink) {
    if SINK.set(sink).is_ok() {
        // Fails only when this library already has a global subscriber (e.g. linked into a
        // test binary with the host): then events already reach the host's subscriber.
        let _ = tracing::subscriber::set_global_default(Forwarder { sink });
    }
}
